"""Conversion between `QuantizedWeight` and bitsandbytes' 4-bit ``QuantState`` / QLoRA checkpoints.

The storage is the same (packed NF4/FP4 codes, fp32 absmax or nested 8-bit constants), so the
conversion only re-labels tensors; it never re-quantizes. What bitsandbytes records but we do not
(the code tables) is checked against ours: a state whose ``quant_map`` / ``nested_quant_map`` is not
the standard NF4/FP4/dynamic table is rejected rather than decoded wrongly.

:func:`from_bnb_state_dict` and :func:`to_bnb_state_dict` read and write the serialized form
(``Linear4bit.state_dict()``, safetensors QLoRA checkpoints) without importing bitsandbytes;
:func:`from_bnb` and :func:`to_bnb` work with live ``QuantState`` objects and need it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from .codebooks import code_table
from .nested import NestedConstants
from .qweight import QuantizedWeight
from .scheme import BNB_BLOCKSIZES, FormatError, Scheme

_QUANT_TYPES = ("nf4", "fp4")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PACKED_KEY = "quant_state.bitsandbytes__"


def _require_bnb() -> Any:
    try:
        # bitsandbytes is optional: needed only to call into it
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional as bnb_f
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this conversion needs bitsandbytes (pip install 'qbackend[test]' or pip install bitsandbytes); "
            "from_bnb_state_dict/to_bnb_state_dict work without it"
        ) from e
    return bnb_f


def _check_table(name: str, key: str, got: torch.Tensor | None, table: str) -> None:
    """Reject a code table that is not exactly ours (decoding with ours would be silently wrong)."""
    if got is None:  # bitsandbytes decodes 4-bit codes by quant_type; nothing else to check against
        return
    want = code_table(table)
    if not isinstance(got, torch.Tensor) or got.numel() != want.numel():
        raise FormatError(f"{name}.{key}: expected the {want.numel()}-entry {table} code table")
    want = want.to(got.device)
    if not torch.equal(got.detach().reshape(-1).to(torch.float32), want):
        raise FormatError(
            f"{name}.{key}: not the standard bitsandbytes {table} table; a custom code table is not "
            "supported (its values would be decoded wrongly)"
        )


def _as_codes(packed: torch.Tensor, name: str) -> torch.Tensor:
    """bitsandbytes' packed weight ([bytes, 1], maybe stored as another dtype) as flat uint8 bytes."""
    if not isinstance(packed, torch.Tensor):
        raise FormatError(f"{name}: expected the packed weight tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        if packed.is_floating_point() or packed.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
            packed = packed.contiguous().view(torch.uint8)  # quant_storage != uint8: same bytes
        else:
            raise FormatError(f"{name}: packed weight has dtype {packed.dtype}; expected uint8 bytes")
    return packed.reshape(-1)


# Our entry names -> bitsandbytes' (relative to the weight's key), for error messages.
_BNB_NAMES = {"codes": "", "scale": ".absmax", "nested_codes": ".absmax", "nested_absmax": ".nested_absmax",
              "nested_offset": ".nested_offset"}  # fmt: skip


def _build(
    name: str,
    codes: torch.Tensor,
    quant_type: Any,
    blocksize: Any,
    shape: Any,
    dtype: torch.dtype,
    absmax: Any,
    nested: tuple[Any, Any, Any] | None,
) -> QuantizedWeight:
    """Common checks and assembly. ``nested`` is (nested_absmax, nested_blocksize, offset)."""
    if quant_type not in _QUANT_TYPES:
        raise FormatError(f"{name}: quant_type {quant_type!r} is not supported; supported: {_QUANT_TYPES}")
    if blocksize not in BNB_BLOCKSIZES:
        raise FormatError(f"{name}: block size {blocksize!r} is not supported; supported: {BNB_BLOCKSIZES}")
    if dtype not in _DTYPES.values():
        raise FormatError(f"{name}: dtype {dtype} is not supported; supported: float32, float16, bfloat16")
    if not isinstance(shape, (list, tuple)) or any(not isinstance(d, int) or isinstance(d, bool) for d in shape):
        raise FormatError(f"{name}: bad or missing shape {shape!r} in the quant state")
    shape = tuple(shape)
    if not isinstance(absmax, torch.Tensor):
        raise FormatError(f"{name}.absmax: expected a tensor, got {type(absmax).__name__}")
    if nested is None:
        if absmax.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise FormatError(f"{name}.absmax: expected fp32 block constants, got {absmax.dtype}")
        # A 16-bit absmax (seen after some conversions) widens exactly; bitsandbytes widens it too.
        scheme = Scheme(quant_type, blocksize=blocksize)
        qw = QuantizedWeight(scheme, shape, dtype, codes, scale=absmax.reshape(-1).to(torch.float32))
    else:
        absmax2, nbs, offset = nested
        if nbs not in BNB_BLOCKSIZES:
            raise FormatError(f"{name}: nested block size {nbs!r} is not supported; supported: {BNB_BLOCKSIZES}")
        if absmax.dtype != torch.uint8:
            raise FormatError(f"{name}.absmax: nested constants must be uint8 codes, got {absmax.dtype}")
        if not isinstance(absmax2, torch.Tensor) or absmax2.dtype != torch.float32:
            got = getattr(absmax2, "dtype", absmax2)
            raise FormatError(f"{name}.nested_absmax: expected an fp32 tensor, got {got!r}")
        if isinstance(offset, bool) or not isinstance(offset, (int, float, torch.Tensor)):
            raise FormatError(f"{name}.nested_offset: expected a number, got {offset!r}")
        off = torch.as_tensor(offset, dtype=torch.float32).to(codes.device).reshape(())
        if not bool(torch.isfinite(off)):
            raise FormatError(f"{name}.nested_offset: not finite ({float(off)})")
        scheme = Scheme(quant_type, blocksize=blocksize, nested=True, nested_blocksize=nbs)
        nc = NestedConstants(absmax.reshape(-1), absmax2.reshape(-1), off, nbs)
        qw = QuantizedWeight(scheme, shape, dtype, codes, nested=nc)
    try:
        qw.validate("\0")
    except FormatError as e:  # re-label our entry names with bitsandbytes' keys
        msg = str(e)
        for ours, theirs in _BNB_NAMES.items():
            msg = msg.replace(f"\0.{ours}:", f"{name}{theirs}:")
        raise FormatError(msg.replace("\0", name)) from None
    return qw


def from_bnb(packed: torch.Tensor, quant_state: Any, name: str = "weight") -> QuantizedWeight:
    """A `QuantizedWeight` sharing the tensors of a bitsandbytes 4-bit weight and its ``QuantState``.

    ``packed`` is the ``[(n + 1) // 2, 1]`` tensor ``quantize_4bit`` returns (any ``quant_storage``).
    Raises `FormatError` for states we cannot decode exactly (non-standard code tables, a weight
    already repacked for bitsandbytes' CPU kernel, unsupported block sizes or dtypes).
    """
    qs = quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        raise FormatError(
            f"{name}: this QuantState was repacked for bitsandbytes' CPU kernel by a Linear4bit forward pass "
            "(absmax rounded to bf16); convert the state from before that forward, or take "
            "module.state_dict() and use from_bnb_state_dict (its undo re-quantizes, so it is not exact)"
        )
    for attr in ("absmax", "blocksize", "quant_type", "dtype", "shape", "code"):
        if not hasattr(qs, attr):
            raise FormatError(f"{name}: not a bitsandbytes QuantState (no {attr!r})")
    if qs.quant_type not in _QUANT_TYPES:
        raise FormatError(f"{name}: quant_type {qs.quant_type!r} is not supported; supported: {_QUANT_TYPES}")
    _check_table(name, "quant_map", qs.code, qs.quant_type)
    nested = None
    if getattr(qs, "nested", False):
        s2 = qs.state2
        if s2.dtype != torch.float32:
            raise FormatError(f"{name}: nested constants of dtype {s2.dtype} are not supported (bnb writes fp32)")
        _check_table(name, "nested_quant_map", s2.code, "dynamic")
        nested = (s2.absmax, s2.blocksize, qs.offset)
    shape = None if qs.shape is None else tuple(qs.shape)
    return _build(name, _as_codes(packed, name), qs.quant_type, qs.blocksize, shape, qs.dtype, qs.absmax, nested)


def to_bnb(qw: QuantizedWeight) -> tuple[torch.Tensor, Any]:
    """(packed ``[(n + 1) // 2, 1]`` uint8, ``QuantState``) for bitsandbytes' ``dequantize_4bit`` / ``matmul_4bit``.

    Tensors are shared, not copied. Only NF4/FP4 weights have a bitsandbytes form.
    """
    bnb_f = _require_bnb()
    s = qw.scheme
    if s.kind not in _QUANT_TYPES:
        raise FormatError(f"{s.name}: bitsandbytes 4-bit states hold nf4 or fp4 only")
    dev = qw.device
    state2, offset = None, None
    if qw.nested is not None:
        state2 = bnb_f.QuantState(
            absmax=qw.nested.absmax2, blocksize=qw.nested.blocksize, code=code_table("dynamic", dev).clone(),
            dtype=torch.float32,
        )  # fmt: skip
        offset = qw.nested.offset.reshape(())
        absmax = qw.nested.codes
    else:
        absmax = qw.scale
    state = bnb_f.QuantState(
        absmax=absmax, shape=torch.Size(qw.shape), code=code_table(s.kind, dev).clone(), blocksize=s.blocksize,
        quant_type=s.kind, dtype=qw.dtype, offset=offset, state2=state2,
    )  # fmt: skip
    return qw.codes.reshape(-1, 1), state


def _dtype_from_str(name: str, key: str, value: Any) -> torch.dtype:
    if value not in _DTYPES:
        raise FormatError(f"{name}.{key}: dtype {value!r} is not supported; supported: {', '.join(_DTYPES)}")
    return _DTYPES[value]


def from_bnb_state_dict(state_dict: Mapping[str, Any], prefix: str = "") -> QuantizedWeight:
    """Load a 4-bit weight from bitsandbytes' serialized form (no bitsandbytes needed).

    ``prefix`` is the module's state-dict prefix (e.g. ``"model.layers.0.mlp.down_proj."``); the
    entries read are ``{prefix}weight``, ``{prefix}weight.absmax``, ``{prefix}weight.quant_map``,
    ``{prefix}weight.nested_absmax``, ``{prefix}weight.nested_quant_map`` and the packed
    ``{prefix}weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``) JSON, as written by
    ``Linear4bit.state_dict()`` / ``QuantState.as_dict(packed=True)``. Unpacked entries
    (``weight.quant_type``, ``weight.blocksize``, ...) are accepted too.
    """
    base = prefix + "weight"
    if base not in state_dict and prefix and not prefix.endswith(".") and prefix + ".weight" in state_dict:
        base = prefix + ".weight"  # forgiving about the trailing dot
    name = base
    if base not in state_dict:
        raise FormatError(f"{base}: missing; not a bitsandbytes 4-bit checkpoint entry")
    packed_keys = [k for k in state_dict if k.startswith(base + "." + _PACKED_KEY)]
    if len(packed_keys) > 1:
        raise FormatError(f"{name}: several packed quant states {packed_keys}; expected one")
    if packed_keys:
        raw = state_dict[packed_keys[0]]
        try:
            info = json.loads(bytes(torch.as_tensor(raw).reshape(-1).to(torch.uint8).tolist()).decode())
        except (ValueError, UnicodeDecodeError, TypeError) as e:
            raise FormatError(f"{packed_keys[0]}: corrupt packed quant state ({e})") from None
        if not isinstance(info, dict):
            raise FormatError(f"{packed_keys[0]}: corrupt packed quant state (not a JSON object)")
        suffix = packed_keys[0].rsplit("__", 1)[-1]
        info.setdefault("quant_type", suffix)
        if info["quant_type"] != suffix:
            raise FormatError(f"{packed_keys[0]}: quant_type {info['quant_type']!r} contradicts the key")
    else:
        keys = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
        info = {k: state_dict[f"{base}.{k}"] for k in keys if f"{base}.{k}" in state_dict}
        if "quant_type" not in info:
            raise FormatError(f"{name}.{_PACKED_KEY}nf4: missing (no packed or unpacked quant state for {base})")

    def get(key: str) -> Any:
        if f"{base}.{key}" not in state_dict:
            raise FormatError(f"{name}.{key}: missing; the checkpoint is incomplete")
        return state_dict[f"{base}.{key}"]

    for key in ("blocksize", "dtype", "shape"):
        if key not in info:
            raise FormatError(f"{name}: quant state has no {key!r}")
    quant_type = info["quant_type"]
    if quant_type not in _QUANT_TYPES:
        raise FormatError(f"{name}: quant_type {quant_type!r} is not supported; supported: {_QUANT_TYPES}")
    dtype = _dtype_from_str(name, "dtype", info["dtype"])
    _check_table(name, "quant_map", get("quant_map"), quant_type)
    absmax = get("absmax")
    nested = None
    if f"{base}.nested_absmax" in state_dict:
        for key in ("nested_blocksize", "nested_offset"):
            if key not in info:
                raise FormatError(f"{name}: nested quant state has no {key!r}")
        if _dtype_from_str(name, "nested_dtype", info.get("nested_dtype", "float32")) != torch.float32:
            raise FormatError(f"{name}.nested_dtype: {info['nested_dtype']!r} is not supported (bnb writes float32)")
        _check_table(name, "nested_quant_map", get("nested_quant_map"), "dynamic")
        nested = (get("nested_absmax"), info["nested_blocksize"], info["nested_offset"])
    codes = _as_codes(state_dict[base], name)
    return _build(name, codes, quant_type, info["blocksize"], info["shape"], dtype, absmax, nested)


def to_bnb_state_dict(qw: QuantizedWeight, prefix: str = "") -> dict[str, torch.Tensor]:
    """The entries ``Linear4bit.state_dict()`` writes for its weight (no bitsandbytes needed).

    Byte-identical to bitsandbytes' own output for the same quantization, so QLoRA loaders
    (``Params4bit.from_prequantized``, transformers) read it.
    """
    s = qw.scheme
    if s.kind not in _QUANT_TYPES:
        raise FormatError(f"{s.name}: bitsandbytes 4-bit checkpoints hold nf4 or fp4 only")
    dev = qw.device
    base = prefix + "weight"
    out = {base: qw.codes.reshape(-1, 1)}
    info: dict[str, Any] = {
        "quant_type": s.kind,
        "blocksize": s.blocksize,
        "dtype": str(qw.dtype).removeprefix("torch."),
        "shape": list(qw.shape),
    }
    if qw.nested is not None:
        out[base + ".absmax"] = qw.nested.codes
        out[base + ".quant_map"] = code_table(s.kind, dev).clone()
        out[base + ".nested_absmax"] = qw.nested.absmax2
        out[base + ".nested_quant_map"] = code_table("dynamic", dev).clone()
        info.update(nested_blocksize=qw.nested.blocksize, nested_dtype="float32", nested_offset=float(qw.nested.offset))
    else:
        out[base + ".absmax"] = qw.scale
        out[base + ".quant_map"] = code_table(s.kind, dev).clone()
    # Same key order and JSON text as QuantState.as_dict(packed=True), so the bytes match.
    out[f"{base}.{_PACKED_KEY}{s.kind}"] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    return out
