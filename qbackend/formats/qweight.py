"""`QuantizedWeight`: one container for a quantized weight in any of our formats.

Holds the codes, the block/channel constants (plain or nested), the original shape and dtype and
the `Scheme`. Serialises to a flat dict of tensors (``to_tensors``/``from_tensors``) so it goes
through ``state_dict`` and safetensors unchanged; converts to/from bitsandbytes' QuantState in
:mod:`qbackend.formats.bnb_interop`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import torch

from .blockwise import blockwise_absmax_codes, blockwise_decode
from .codebooks import nearest_code
from .integer import int_decode, int_quantize
from .nested import NestedConstants, nest_constants
from .packing import pack_4bit, unpack_4bit
from .scheme import FormatError, Scheme, check_weight

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class QuantizedWeight:
    """A quantized tensor.

    codes: 4-bit formats: uint8, two codes per byte over the row-major flattened tensor, first
        element in the high nibble, ``(numel + 1) // 2`` bytes (bitsandbytes layout). Int4
        codes are stored unsigned (symmetric: q + 8). 8-bit formats: one byte per element,
        int8 (symmetric) or uint8 (affine), flattened.
    scale: fp32 constants (codebooks: absmax per block; int: scale per tensor/channel/group);
        None when ``nested`` holds them.
    zero_point: uint8, same shape as the scale (int affine only).
    nested: the nested 8-bit form of the per-block constants, when ``scheme.nested``.
    """

    scheme: Scheme
    shape: tuple[int, ...]
    dtype: torch.dtype
    codes: torch.Tensor
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    nested: NestedConstants | None = None

    # ---- facts -------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def block_constants(self) -> torch.Tensor:
        """The fp32 per-block/channel scales (de-nested if nested)."""
        if self.nested is not None:
            c = self.nested.decode()
            if self.scheme.kind == "int":
                from .integer import scale_shape

                c = c.reshape(scale_shape(self.shape, self.scheme))
            return c
        assert self.scale is not None
        return self.scale

    def storage_bits(self) -> int:
        """Bits actually stored for this weight (codes and constants; shared code tables excluded)."""
        bits = self.codes.numel() * self.codes.element_size() * 8
        if self.scale is not None:
            bits += self.scale.numel() * self.scale.element_size() * 8
        if self.zero_point is not None:
            bits += self.zero_point.numel() * 8
        if self.nested is not None:
            bits += self.nested.storage_bits()
        return bits

    def bits_per_param(self) -> float:
        """Real storage per weight element, e.g. 4.127 for NF4, blocks of 64, nested 256."""
        return self.storage_bits() / self.numel

    def nbytes(self) -> int:
        return (self.storage_bits() + 7) // 8

    # ---- decode ------------------------------------------------------------------------------
    def codes_unpacked(self) -> torch.Tensor:
        """Flat per-element codes: uint8 table indices (codebooks), int8/uint8 integers (int)."""
        if self.scheme.bits == 4:
            u = unpack_4bit(self.codes, self.numel)
            if self.scheme.kind == "int" and self.scheme.symmetric:
                return (u.to(torch.int16) - 8).to(torch.int8)
            return u
        return self.codes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight these codes stand for, in ``dtype`` (default: the original dtype)."""
        dtype = dtype or self.dtype
        s = self.scheme
        if s.kind in ("nf4", "fp4"):
            flat = blockwise_decode(
                unpack_4bit(self.codes, self.numel), self.block_constants(), s.blocksize, s.kind, self.numel
            )
            return flat.view(self.shape).to(dtype)
        w = int_decode(self.codes_unpacked(), self.block_constants(), self.zero_point, self.shape, s)
        return w.to(dtype)

    # ---- movement and serialisation ------------------------------------------------------------
    def to(self, device: torch.device | str) -> QuantizedWeight:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        nested = None
        if self.nested is not None:
            n = self.nested
            nested = NestedConstants(mv(n.codes), mv(n.absmax2), mv(n.offset), n.blocksize)  # type: ignore[arg-type]
        return replace(self, codes=mv(self.codes), scale=mv(self.scale), zero_point=mv(self.zero_point), nested=nested)  # type: ignore[arg-type]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict of tensors (for state_dict / safetensors); metadata rides as JSON bytes."""
        meta = {
            "version": FORMAT_VERSION,
            "scheme": asdict(self.scheme),
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        out = {"codes": self.codes, "meta": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}
        if self.scale is not None:
            out["scale"] = self.scale
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        if self.nested is not None:
            out["nested_codes"] = self.nested.codes
            out["nested_absmax"] = self.nested.absmax2
            out["nested_offset"] = self.nested.offset.reshape(1)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str = "weight") -> QuantizedWeight:
        """Inverse of :meth:`to_tensors`; a clear `FormatError` naming ``name`` on bad input."""
        try:
            meta = json.loads(bytes(tensors["meta"].tolist()).decode())
        except KeyError:
            raise FormatError(f"{name}: not a qbackend quantized weight (no 'meta' entry)") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"{name}: corrupt quantized-weight metadata ({e})") from None
        if meta.get("version") != FORMAT_VERSION:
            raise FormatError(
                f"{name}: quantized-weight format version {meta.get('version')!r} is not supported "
                f"(this qbackend reads version {FORMAT_VERSION}); re-quantize with this version"
            )
        scheme = Scheme(**meta["scheme"])
        nested = None
        if scheme.nested:
            try:
                nested = NestedConstants(
                    tensors["nested_codes"], tensors["nested_absmax"],
                    tensors["nested_offset"].reshape(()), scheme.nested_blocksize,
                )  # fmt: skip
            except KeyError as e:
                raise FormatError(f"{name}: nested format but {e.args[0]!r} is missing") from None
        qw = cls(
            scheme=scheme,
            shape=tuple(meta["shape"]),
            dtype=_DTYPES[meta["dtype"]],
            codes=tensors["codes"],
            scale=tensors.get("scale"),
            zero_point=tensors.get("zero_point"),
            nested=nested,
        )
        qw.validate(name)
        return qw

    def validate(self, name: str = "weight") -> None:
        """Check that codes and constants have the sizes the scheme and shape require."""
        s = self.scheme
        want_codes = (self.numel + 1) // 2 if s.bits == 4 else self.numel
        if self.codes.numel() != want_codes:
            raise FormatError(
                f"{name}: {self.codes.numel()} code bytes for shape {self.shape} in {s.name}; expected {want_codes}"
            )
        if (self.scale is None) == (self.nested is None):
            raise FormatError(f"{name}: needs exactly one of plain or nested constants")
        n_const = self.block_constants().numel()
        if s.kind in ("nf4", "fp4"):
            want = -(-self.numel // s.blocksize)
        else:
            from .integer import scale_shape

            want = 1
            for d in scale_shape(self.shape, s):
                want *= d
        if n_const != want:
            raise FormatError(f"{name}: {n_const} block constants for shape {self.shape} in {s.name}; expected {want}")


def quantize(w: torch.Tensor, scheme: Scheme, name: str = "weight") -> QuantizedWeight:
    """Quantize ``w`` to ``scheme``. ``name`` appears in every error message."""
    check_weight(w, name)
    if scheme.kind == "int" and scheme.granularity == "channel" and w.dim() == 0:
        raise FormatError(f"{name}: per-channel quantization needs at least one dimension")
    w = w.detach()
    if scheme.kind in ("nf4", "fp4"):
        codes, absmax = blockwise_absmax_codes(w, scheme.blocksize, scheme.kind)
        packed = pack_4bit(codes, pad_code=int(nearest_code(torch.zeros(1), scheme.kind)))
        scale, zp = absmax, None
    else:
        q, scale, zp = int_quantize(w, scheme)
        if scheme.bits == 4:
            u = (q.to(torch.int16) + 8).to(torch.uint8) if scheme.symmetric else q
            packed = pack_4bit(u)
        else:
            packed = q
    nested = None
    if scheme.nested:
        nested = nest_constants(scale, scheme.nested_blocksize)
        scale = None
    return QuantizedWeight(scheme, tuple(w.shape), w.dtype, packed, scale, zp, nested)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Functional form of :meth:`QuantizedWeight.dequantize`."""
    return qw.dequantize(dtype)
