"""`Scheme`: which numeric format a weight is stored in (pure description, no tensors)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch

Kind = Literal["nf4", "fp4", "int"]
Granularity = Literal["tensor", "channel", "block"]

#: version of :meth:`Scheme.as_dict`'s layout (bump when a field is added, removed or changes meaning)
SCHEME_DICT_VERSION = 1
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FormatError(ValueError):
    """Bad input for a quantized format; the message names the tensor and what to do."""


def check_record(d: Any, what: str, version: int, name: str) -> None:
    """``d`` must be a record of ``what`` (a dict) at ``version``; else a `FormatError` naming ``name``."""
    if not isinstance(d, Mapping):
        raise FormatError(f"{name}: expected a {what} (dict), got {type(d).__name__}")
    if d.get("version") != version:
        raise FormatError(
            f"{name}: {what} version {d.get('version')!r} is not supported (this qbackend reads version "
            f"{version}); upgrade qbackend or re-save with this one"
        )


@dataclass(frozen=True)
class Scheme:
    """A quantized storage format.

    kind: "nf4" / "fp4" (4-bit codebooks, absmax per block, bitsandbytes-compatible) or "int".
    bits: 4 or 8 (codebooks are always 4).
    symmetric: int only; absmax scaling (True) or scale + zero-point (False).
    granularity: "tensor", "channel" (one scale per index of ``axis``) or "block".
        Codebook blocks run over the row-major flattened weight (as bitsandbytes); int blocks
        ("groups") run along the last (reduction) axis of each row, with a shorter tail group.
    blocksize: elements per block/group.
    axis: the channel axis for per-channel scales (0: output channels of a linear weight).
    nested: quantize the per-block fp32 constants again (QLoRA "double quantization": 8-bit
        dynamic map in blocks of ``nested_blocksize``, fp32 second-level absmax, fp32 offset).
    """

    kind: Kind = "nf4"
    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "block"
    blocksize: int = 64
    axis: int = 0
    nested: bool = False
    nested_blocksize: int = 256

    def __post_init__(self) -> None:
        # Metadata read back from a file can hold anything: check types before values.
        for field in ("bits", "blocksize", "axis", "nested_blocksize"):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool):
                raise FormatError(f"Scheme.{field} must be an int; got {v!r}")
        for field in ("symmetric", "nested"):
            if not isinstance(getattr(self, field), bool):
                raise FormatError(f"Scheme.{field} must be a bool; got {getattr(self, field)!r}")
        if self.kind not in ("nf4", "fp4", "int"):
            raise FormatError(f"unknown format kind {self.kind!r}; supported: 'nf4', 'fp4', 'int'")
        if self.kind in ("nf4", "fp4"):
            if self.bits != 4:
                raise FormatError(f"{self.kind} is a 4-bit format; got bits={self.bits} (use bits=4)")
            if self.granularity != "block":
                raise FormatError(f"{self.kind} is block-wise only; got granularity={self.granularity!r}")
            if not self.symmetric:
                raise FormatError(f"{self.kind} is symmetric (absmax); symmetric=False is for kind='int'")
            if self.blocksize not in BNB_BLOCKSIZES:
                raise FormatError(
                    f"{self.kind} block size {self.blocksize} is not supported; supported: {BNB_BLOCKSIZES}"
                )
        else:
            if self.bits not in (4, 8):
                raise FormatError(f"int formats support bits 4 or 8; got bits={self.bits}")
            if self.granularity not in ("tensor", "channel", "block"):
                raise FormatError(f"unknown granularity {self.granularity!r}; supported: 'tensor', 'channel', 'block'")
            if self.granularity == "block" and (self.blocksize < 2 or self.blocksize % 2):
                raise FormatError(f"int group size must be an even number >= 2; got {self.blocksize}")
        if self.nested:
            if self.granularity != "block":
                raise FormatError("nested constants need granularity='block' (there is one scale per block)")
            if self.kind == "int" and not self.symmetric:
                raise FormatError("nested constants are supported for symmetric formats only")
            if self.nested_blocksize not in BNB_BLOCKSIZES:
                raise FormatError(
                    f"nested block size {self.nested_blocksize} is not supported; supported: {BNB_BLOCKSIZES}"
                )

    @property
    def name(self) -> str:
        """Short human-readable name, e.g. ``nf4-b64-nested`` or ``int4-affine-g128``."""
        if self.kind in ("nf4", "fp4"):
            base = f"{self.kind}-b{self.blocksize}"
        else:
            sym = "sym" if self.symmetric else "affine"
            gran = {"tensor": "tensor", "channel": f"ch{self.axis}", "block": f"g{self.blocksize}"}
            base = f"int{self.bits}-{sym}-{gran[self.granularity]}"
        return base + ("-nested" if self.nested else "")

    def as_dict(self) -> dict[str, Any]:
        """The scheme as a JSON-ready dict with a ``version`` key (what checkpoints store)."""
        return {"version": SCHEME_DICT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str = "scheme") -> Scheme:
        """Inverse of :meth:`as_dict`; a `FormatError` naming ``name`` on an unknown version or keys."""
        check_record(d, "scheme", SCHEME_DICT_VERSION, name)
        valid = [f.name for f in fields(cls)]
        unknown = sorted(k for k in d if k not in valid and k != "version")
        missing = [k for k in valid if k not in d]
        if unknown or missing:
            what = f"unknown field(s) {unknown}" if unknown else f"missing field(s) {missing}"
            raise FormatError(f"{name}: {what} in a version-{SCHEME_DICT_VERSION} scheme; valid: {', '.join(valid)}")
        try:
            return cls(**{k: d[k] for k in valid})
        except FormatError as e:
            raise FormatError(f"{name}: {e}") from None

    @property
    def format(self) -> str:
        """The format's one name across config, kernels and ops: "nf4", "fp4", "int4" or "int8"."""
        return self.kind if self.kind in ("nf4", "fp4") else f"int{self.bits}"

    @property
    def qmin(self) -> int:
        """Smallest integer code (int formats)."""
        if self.symmetric:
            return -(2 ** (self.bits - 1) - 1)
        return 0

    @property
    def qmax(self) -> int:
        """Largest integer code (int formats)."""
        if self.symmetric:
            return 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1


def check_weight(w: torch.Tensor, name: str, check_finite: bool = True) -> None:
    """Raise a `FormatError` naming ``name`` if ``w`` cannot be quantized (dtype, empty, NaN/Inf).

    ``check_finite=False`` skips the full NaN/Inf scan for callers that detect non-finite values
    more cheaply themselves (the codebook path sees them in the block maxima).
    """
    if not isinstance(w, torch.Tensor):
        raise FormatError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise FormatError(
            f"{name}: dtype {w.dtype} is not supported; supported: float32, float16, bfloat16 "
            "(convert the weight first, e.g. w.float())"
        )
    if w.device.type == "meta":
        raise FormatError(
            f"{name}: is on the meta device (shape only, no values); materialise the model's weights first "
            "(load them, or model.to_empty(device=...) and initialise) before quantizing"
        )
    if w.numel() == 0:
        raise FormatError(f"{name}: cannot quantize an empty tensor (shape {tuple(w.shape)})")
    if check_finite and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise FormatError(
            f"{name}: contains {bad} NaN/Inf value(s) (shape {tuple(w.shape)}); "
            "fix or exclude this layer before quantizing"
        )
