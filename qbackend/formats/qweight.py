"""`QuantizedWeight`: one container for a quantized weight in any of our formats.

Holds the codes, the block/channel constants (plain or nested), the original shape and dtype and
the `Scheme`. Two serialised forms: ``as_dict``/``from_dict`` (a versioned record: JSON fields plus
named tensors, in the spirit of bitsandbytes' ``QuantState.as_dict``; what ``qbackend.save`` stores
per layer) and ``to_tensors``/``from_tensors`` (the same tensors plus the JSON as a uint8 ``meta``
tensor, so a weight travels through ``state_dict``). Converts to/from bitsandbytes' QuantState in
:mod:`qbackend.formats.bnb_interop`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from .blockwise import blockwise_absmax_packed, blockwise_decode_packed
from .integer import int_decode, int_quantize, scale_shape
from .nested import NestedConstants, nest_constants
from .packing import pack_4bit, unpack_4bit
from .scheme import FormatError, Scheme, check_record, check_weight

FORMAT_VERSION = 1  # of the ``meta`` tensor of ``to_tensors``
#: version of :meth:`QuantizedWeight.as_dict`'s layout
QWEIGHT_DICT_VERSION = 1
#: the named tensors of a quantized weight (each present or not, by scheme)
TENSOR_KEYS = ("codes", "scale", "zero_point", "nested_codes", "nested_absmax", "nested_offset")
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
            flat = blockwise_decode_packed(self.codes, self.block_constants(), s.blocksize, s.kind, self.numel)
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
        """Flat dict of tensors (for state_dict / safetensors); metadata rides as JSON bytes in ``meta``."""
        meta = {
            "version": FORMAT_VERSION,
            "scheme": asdict(self.scheme),
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        named = self._named_tensors()
        meta_bytes = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        return {"codes": named.pop("codes"), "meta": meta_bytes, **named}  # the order buffers have always had

    def as_dict(self) -> dict[str, Any]:
        """A versioned record: ``version``, ``scheme`` (:meth:`Scheme.as_dict`), ``shape``, ``dtype`` (JSON)
        and the named tensors of :data:`TENSOR_KEYS` this weight has (:meth:`from_dict` rebuilds it)."""
        out: dict[str, Any] = {
            "version": QWEIGHT_DICT_VERSION,
            "scheme": self.scheme.as_dict(),
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        out.update(self._named_tensors())
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str = "weight") -> QuantizedWeight:
        """Inverse of :meth:`as_dict`; a `FormatError` naming ``name`` (and the entry) on bad input."""
        check_record(d, "quantized-weight record", QWEIGHT_DICT_VERSION, name)
        unknown = sorted(k for k in d if k not in ("version", "scheme", "shape", "dtype", *TENSOR_KEYS))
        if unknown:
            raise FormatError(f"{name}: unknown entries {unknown} in a quantized-weight record")
        _check_shape_dtype(d.get("shape"), d.get("dtype"), name)
        scheme = Scheme.from_dict(d.get("scheme"), name=f"{name}.scheme")  # type: ignore[arg-type]
        tensors = {k: d[k] for k in TENSOR_KEYS if k in d}
        return cls._from_parts(scheme, tuple(d["shape"]), _DTYPES[d["dtype"]], tensors, name)

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes}
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
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], name: str = "weight") -> QuantizedWeight:
        """Inverse of :meth:`to_tensors`; a clear `FormatError` naming ``name`` (and the entry) on bad input."""
        meta = _read_meta(tensors, name)
        try:
            scheme = Scheme(**meta["scheme"])
        except TypeError as e:
            raise FormatError(f"{name}.meta: corrupt quantized-weight metadata (scheme: {e})") from None
        except FormatError as e:
            raise FormatError(f"{name}.meta: {e}") from None
        rest = {k: v for k, v in tensors.items() if k != "meta"}
        return cls._from_parts(scheme, tuple(meta["shape"]), _DTYPES[meta["dtype"]], rest, name)

    @classmethod
    def _from_parts(
        cls, scheme: Scheme, shape: tuple[int, ...], dtype: torch.dtype, tensors: Mapping[str, Any], name: str
    ) -> QuantizedWeight:
        """A validated weight from its scheme, shape, dtype and named tensors (shared by both forms)."""
        for key in _required_keys(scheme):
            if key not in tensors:
                raise FormatError(f"{name}.{key}: missing (required by {scheme.name}); the checkpoint is incomplete")
        for key in tensors:
            if key not in _required_keys(scheme):
                raise FormatError(f"{name}.{key}: unexpected entry for {scheme.name}")
        for key in _required_keys(scheme):
            if not isinstance(tensors[key], torch.Tensor):
                raise FormatError(f"{name}.{key}: expected a tensor, got {type(tensors[key]).__name__}")
        nested = None
        if scheme.nested:
            nested = NestedConstants(
                tensors["nested_codes"].reshape(-1), tensors["nested_absmax"].reshape(-1),
                tensors["nested_offset"].reshape(()), scheme.nested_blocksize,
            )  # fmt: skip
        qw = cls(
            scheme=scheme,
            shape=shape,
            dtype=dtype,
            codes=tensors["codes"].reshape(-1),
            scale=tensors.get("scale"),
            zero_point=tensors.get("zero_point"),
            nested=nested,
        )
        qw.validate(name)
        # Constants come back in the shapes the decoder indexes with (a file may store them flat).
        cshape = qw._constant_shape()
        if qw.scale is not None:
            qw.scale = qw.scale.reshape(cshape)
        if qw.zero_point is not None:
            qw.zero_point = qw.zero_point.reshape(cshape)
        return qw

    def _constant_shape(self) -> tuple[int, ...]:
        if self.scheme.kind in ("nf4", "fp4"):
            return (-(-self.numel // self.scheme.blocksize),)
        return scale_shape(self.shape, self.scheme)

    def validate(self, name: str = "weight") -> None:
        """Check dtypes and sizes of codes and constants against the scheme and shape.

        Raises a `FormatError` naming the offending entry, e.g. ``layer.weight.scale``.
        """
        s = self.scheme
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in self.shape):
            raise FormatError(f"{name}.meta: bad shape {self.shape!r}")
        if self.dtype not in _DTYPES.values():
            raise FormatError(f"{name}.meta: dtype {self.dtype} is not supported; supported: {', '.join(_DTYPES)}")
        want_codes = (self.numel + 1) // 2 if s.bits == 4 else self.numel
        code_dtype = torch.int8 if (s.bits == 8 and s.symmetric and s.kind == "int") else torch.uint8
        _check(name, "codes", self.codes, code_dtype, want_codes, f"for shape {self.shape} in {s.name}")
        if (self.scale is None) == (self.nested is None):
            raise FormatError(f"{name}: needs exactly one of plain ('scale') or nested ('nested_*') constants")
        n_const = 1
        for d in self._constant_shape():
            n_const *= d
        if self.scale is not None:
            _check(name, "scale", self.scale, torch.float32, n_const, f"(constants) for shape {self.shape} in {s.name}")
        if self.nested is not None:
            nb = self.nested.blocksize
            if nb != s.nested_blocksize:
                raise FormatError(f"{name}: nested block size {nb} differs from the scheme's {s.nested_blocksize}")
            _check(name, "nested_codes", self.nested.codes, torch.uint8, n_const, f"for shape {self.shape} in {s.name}")
            _check(name, "nested_absmax", self.nested.absmax2, torch.float32, -(-n_const // nb), f"in {s.name}")
            _check(name, "nested_offset", self.nested.offset, torch.float32, 1, "")
        if s.kind == "int" and not s.symmetric:
            if self.zero_point is None:
                raise FormatError(f"{name}.zero_point: missing (required by {s.name})")
            _check(name, "zero_point", self.zero_point, torch.uint8, n_const, f"for shape {self.shape} in {s.name}")
        elif self.zero_point is not None:
            raise FormatError(f"{name}.zero_point: unexpected for {s.name}")

    # ---- state_dict / safetensors --------------------------------------------------------------
    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """:meth:`to_tensors` with every key prefixed (``prefix`` usually ends with ``'.'``)."""
        return {prefix + k: v for k, v in self.to_tensors().items()}

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> QuantizedWeight:
        """Read the entries written by :meth:`to_state_dict` (other keys of ``state_dict`` are ignored)."""
        tensors = {k: state_dict[prefix + k] for k in _ALL_KEYS if prefix + k in state_dict}
        return cls.from_tensors(tensors, name=prefix.rstrip(".") or "weight")


_ALL_KEYS = ("meta", "codes", "scale", "zero_point", "nested_codes", "nested_absmax", "nested_offset")


def _required_keys(scheme: Scheme) -> tuple[str, ...]:
    keys: tuple[str, ...] = ("codes",)
    keys += ("nested_codes", "nested_absmax", "nested_offset") if scheme.nested else ("scale",)
    if scheme.kind == "int" and not scheme.symmetric:
        keys += ("zero_point",)
    return keys


def _read_meta(tensors: Mapping[str, torch.Tensor], name: str) -> dict:
    raw = tensors.get("meta")
    if raw is None:
        raise FormatError(f"{name}.meta: missing; not a qbackend quantized weight")
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise FormatError(f"{name}.meta: corrupt quantized-weight metadata (expected uint8 JSON bytes)")
    try:
        meta = json.loads(bytes(raw.reshape(-1).tolist()).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{name}.meta: corrupt quantized-weight metadata ({e})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{name}.meta: corrupt quantized-weight metadata (not a JSON object)")
    if meta.get("version") != FORMAT_VERSION:
        raise FormatError(
            f"{name}.meta: quantized-weight format version {meta.get('version')!r} is not supported "
            f"(this qbackend reads version {FORMAT_VERSION}); re-quantize with this version"
        )
    if not isinstance(meta.get("scheme"), dict):
        raise FormatError(f"{name}.meta: corrupt quantized-weight metadata (no scheme)")
    _check_shape_dtype(meta.get("shape"), meta.get("dtype"), f"{name}.meta")
    return meta


def _check_shape_dtype(shape: Any, dtype: Any, where: str) -> None:
    if not isinstance(shape, list) or any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise FormatError(f"{where}: corrupt quantized-weight metadata (bad shape {shape!r})")
    if dtype not in _DTYPES:
        raise FormatError(f"{where}: dtype {dtype!r} is not supported; supported: {', '.join(_DTYPES)}")


def _check(name: str, key: str, t: torch.Tensor, dtype: torch.dtype, numel: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{name}.{key}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise FormatError(f"{name}.{key}: dtype {t.dtype}, expected {dtype}")
    if t.numel() != numel:
        raise FormatError(f"{name}.{key}: {t.numel()} elements {what}; expected {numel}".replace("  ", " "))


class QuantizedWeightModule(torch.nn.Module):
    """A `QuantizedWeight` held as buffers, so it travels with ``state_dict()``/``load_state_dict()``,
    ``.to(device)`` and safetensors like any module state.

    Loading accepts any sizes (the codes of a different weight replace the current ones) and
    validates them: a corrupt entry raises a `FormatError` naming it. Dtype casts such as
    ``.half()`` leave the buffers alone (codes and fp32 constants must keep their dtypes).
    """

    def __init__(self, qweight: QuantizedWeight | None = None) -> None:
        super().__init__()
        if qweight is not None:
            self.set(qweight)

    def set(self, qweight: QuantizedWeight) -> None:
        """Replace the held weight."""
        for k in list(self._buffers):
            del self._buffers[k]
        for k, t in qweight.to_tensors().items():
            self.register_buffer(k, t)

    @property
    def qweight(self) -> QuantizedWeight:
        """The held weight (tensors shared with the buffers)."""
        return QuantizedWeight.from_tensors({k: v for k, v in self._buffers.items() if v is not None}, "qweight")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:  # noqa: ANN001 - torch's signature
        present = {k: state_dict[prefix + k] for k in _ALL_KEYS if prefix + k in state_dict}
        for k in state_dict:
            if k.startswith(prefix) and "." not in k[len(prefix) :] and k[len(prefix) :] not in _ALL_KEYS:
                unexpected_keys.append(k)
        if not present:
            missing_keys.extend(prefix + k for k in self._buffers)
            return
        qw = QuantizedWeight.from_tensors(present, name=prefix.rstrip(".") or "weight")
        old = self._buffers.get("codes")
        self.set(qw.to(old.device) if old is not None else qw)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        dtypes = {n: b.dtype for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for n, dt in dtypes.items():  # device moves apply; dtype casts do not
            b = self._buffers[n]
            if b is not None and b.dtype != dt:
                self._buffers[n] = b.to(dt)
        return self

    def extra_repr(self) -> str:
        try:
            qw = self.qweight
        except FormatError:
            return "invalid"
        return f"shape={qw.shape}, format={qw.scheme.name}, bits_per_param={qw.bits_per_param():.3f}"


def quantize(w: torch.Tensor, scheme: Scheme, name: str = "weight") -> QuantizedWeight:
    """Quantize ``w`` (fp32/fp16/bf16, any shape) to ``scheme``. ``name`` appears in every error message.

    NF4/FP4 results are bit-identical to ``bitsandbytes.functional.quantize_4bit`` (codes, absmax and,
    when nested, the nested constants of ``compress_statistics=True``).
    """
    codebook = scheme.kind in ("nf4", "fp4")
    # The codebook path sees NaN/Inf in its block maxima, which saves a full pass over the weight.
    check_weight(w, name, check_finite=not codebook)
    if scheme.kind == "int" and scheme.granularity == "channel" and w.dim() == 0:
        raise FormatError(f"{name}: per-channel quantization needs at least one dimension")
    w = w.detach()
    if codebook:
        try:
            packed, scale = blockwise_absmax_packed(w, scheme.blocksize, scheme.kind)
        except FormatError:
            check_weight(w, name)  # raises the full message, naming the tensor
            raise
        zp = None
    else:
        q, scale, zp = int_quantize(w, scheme)
        if scheme.bits == 4:
            u = (q.to(torch.int16) + 8).to(torch.uint8) if scheme.symmetric else q
            packed = pack_4bit(u)
        else:
            packed = q
    nested = None
    if scheme.nested:
        try:
            nested = nest_constants(scale, scheme.nested_blocksize)
        except FormatError as e:
            raise FormatError(f"{name}: {e}") from None
        scale = None
    return QuantizedWeight(scheme, tuple(w.shape), w.dtype, packed, scale, zp, nested)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Functional form of :meth:`QuantizedWeight.dequantize`."""
    return qw.dequantize(dtype)
