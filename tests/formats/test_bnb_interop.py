"""Bit-exactness against the real bitsandbytes (the oracle for NF4/FP4 and the QLoRA format) and the
QuantState / checkpoint conversions.

bitsandbytes' ``dequantize_4bit`` runs a torch.compile'd helper for some shapes; the tests run it
under ``torch.compiler.set_stance("force_eager")`` so that no compilation (and no recompile limit)
is involved.

Known bitsandbytes 0.50 CPU behaviour the tests work around (not our bugs):
* its native CPU ``dequantize_4bit`` kernel indexes the absmax per row, so it is wrong whenever the
  last dimension is not a multiple of the block size (2-D and up); its own portable implementation
  (``backends/default``), which the other devices use, is right. We compare with the native kernel
  where it is right and with the portable one everywhere.
* the native kernel decodes FP4 code 8 as -0.0, its code table (``quant_map``) and its portable
  implementation as +0.0, as we do; and it returns 1-D weights as [1, n].
* for weights whose fp32 mean of block maxima overflows (values near the fp32 maximum) it stores
  an inf offset and NaN constants; we store a finite offset (float64 mean) or refuse.
"""

from __future__ import annotations

import contextlib
import json
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

from qbackend.formats import (  # noqa: E402
    BNB_BLOCKSIZES,
    FormatError,
    QuantizedWeight,
    Scheme,
    code_table,
    from_bnb,
    from_bnb_state_dict,
    quantize,
    to_bnb,
    to_bnb_state_dict,
)
from qbackend.formats._strategies import weights  # noqa: E402

QUANT_TYPES = ("nf4", "fp4")


@contextlib.contextmanager
def _eager():
    with torch.compiler.set_stance("force_eager"):
        yield


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Same-size integer view, so comparisons are bitwise (-0.0 != 0.0)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _bnb_dequant(packed: torch.Tensor, state) -> torch.Tensor:
    with _eager():
        return F.dequantize_4bit(packed, state)


def _bnb_portable_dequant(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' device-independent implementation (backends/default), eagerly."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        with _eager():
            absmax = F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = _get_4bit_code(state.quant_type, packed.device)
    with _eager():
        return fn(packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape, state.dtype)


def _native_kernel_is_right(shape: tuple[int, ...], blocksize: int) -> bool:
    """Where bitsandbytes' CPU dequantize kernel agrees with its own quantization (see module doc)."""
    return len(shape) <= 1 or shape[-1] % blocksize == 0


def _quantize_both(w: torch.Tensor, quant_type: str, bs: int, nested: bool):
    """(ours or None if we refuse, bnb packed, bnb state)."""
    packed, state = F.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type=quant_type)
    try:
        ours = quantize(w, Scheme(quant_type, blocksize=bs, nested=nested))
    except FormatError as e:
        assert nested and "overflow fp32" in str(e)
        ours = None
    return ours, packed, state


# ---- tables -----------------------------------------------------------------------------------------
def test_dynamic_map_matches_create_dynamic_map():
    assert torch.equal(_bits(code_table("dynamic")), _bits(F.create_dynamic_map(signed=True)))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_tables_match(quant_type):
    assert torch.equal(_bits(code_table(quant_type)), _bits(F.get_4bit_type(quant_type, device="cpu")))


# ---- quantize: bit-exact -----------------------------------------------------------------------------
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("bs", BNB_BLOCKSIZES)
@settings(max_examples=6)
@given(data=st.data())
def test_quantize_4bit_bit_exact(bs, quant_type, nested, data):
    w = data.draw(weights(blocksize=bs, table=quant_type, max_numel=3 * bs + 700))
    ours, packed, state = _quantize_both(w, quant_type, bs, nested)
    assert state.shape == w.shape and state.dtype == w.dtype and state.blocksize == bs
    if nested and not bool(torch.isfinite(state.offset)):
        # bitsandbytes' fp32 mean overflowed (inf offset, NaN constants): we keep a finite one or refuse.
        assert ours is None or torch.isfinite(ours.block_constants()).all()
        return
    assert ours is not None
    assert packed.shape == (ours.codes.numel(), 1) and packed.dtype == torch.uint8
    assert torch.equal(packed.view(-1), ours.codes)
    if nested:
        assert torch.equal(state.absmax, ours.nested.codes)
        assert torch.equal(_bits(state.state2.absmax), _bits(ours.nested.absmax2))
        assert torch.equal(_bits(state.offset.reshape(1)), _bits(ours.nested.offset.reshape(1)))
        assert state.state2.blocksize == ours.nested.blocksize == 256
    else:
        assert torch.equal(_bits(state.absmax), _bits(ours.scale))
    # Dequantize: ours of their weight == theirs, bit for bit, in the weight's dtype.
    mine = from_bnb(packed, state).dequantize()
    assert mine.dtype == w.dtype and mine.shape == w.shape
    assert torch.equal(_bits(mine), _bits(_bnb_portable_dequant(packed, state).reshape(w.shape)))
    if _native_kernel_is_right(tuple(w.shape), bs):
        # Equal values; the native kernel decodes FP4 code 8 as -0.0 where its table (and we) say +0.0.
        assert torch.equal(mine, _bnb_dequant(packed, state).reshape(w.shape))


@pytest.mark.parametrize("threads", [1, 2])
def test_nested_offset_matches_with_many_blocks(threads):
    """From 262144 blocks on, torch's fp32 mean (bitsandbytes' offset) rounds differently with a
    different intra-op thread count; with the same count, ours and theirs agree bit for bit."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = torch.randn(262144 * 32 + 17, generator=torch.Generator().manual_seed(threads))
        ours = quantize(w, Scheme("nf4", blocksize=32, nested=True))
        packed, state = F.quantize_4bit(w, blocksize=32, compress_statistics=True, quant_type="nf4")
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(_bits(state.offset.reshape(1)), _bits(ours.nested.offset.reshape(1)))
    assert torch.equal(state.absmax, ours.nested.codes)
    assert torch.equal(packed.view(-1), ours.codes)


def test_quantize_blockwise_nested_codes_match_on_degenerate_constants():
    """The nested 8-bit stage reproduces bitsandbytes' CPU library also where 1/absmax overflows
    (all-zero and subnormal blocks)."""
    from qbackend.formats.blockwise import blockwise_dynamic_codes

    g = torch.Generator().manual_seed(0)
    cases = [torch.zeros(300), torch.randn(300, generator=g) * 1e-40, torch.randn(700, generator=g) * 1e-45]
    cases.append(torch.cat([torch.zeros(256), torch.randn(100, generator=g)]))
    for x in cases:
        codes, absmax = F.quantize_blockwise(x, blocksize=256)
        mine, mine_absmax = blockwise_dynamic_codes(x, 256)
        assert torch.equal(codes, mine) and torch.equal(_bits(absmax.absmax), _bits(mine_absmax))


# ---- QuantState conversion ------------------------------------------------------------------------------
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@settings(max_examples=10)
@given(data=st.data(), bs=st.sampled_from(BNB_BLOCKSIZES))
def test_to_bnb_and_back(quant_type, nested, data, bs):
    w = data.draw(weights(blocksize=bs, table=quant_type, patterns=("normal", "zero_blocks", "uniform")))
    qw = quantize(w, Scheme(quant_type, blocksize=bs, nested=nested))
    packed, state = to_bnb(qw)
    their_packed, their_state = F.quantize_4bit(w, blocksize=bs, compress_statistics=nested, quant_type=quant_type)
    assert torch.equal(packed, their_packed)
    assert state.as_dict(packed=False).keys() == their_state.as_dict(packed=False).keys()
    assert state == their_state  # bitsandbytes' own comparison (allclose on tensors)
    assert torch.equal(
        _bits(_bnb_portable_dequant(packed, state)), _bits(_bnb_portable_dequant(their_packed, their_state))
    )
    back = from_bnb(packed, state)
    assert back.scheme == qw.scheme and torch.equal(_bits(back.dequantize()), _bits(qw.dequantize()))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int32])
def test_from_bnb_reads_other_quant_storage(storage):
    w = torch.randn(64, 128)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=storage)
    assert packed.dtype == storage
    ours = quantize(w, Scheme("nf4", blocksize=64, nested=True))
    assert torch.equal(from_bnb(packed, state).codes, ours.codes)


# ---- serialized checkpoints -------------------------------------------------------------------------------
def _bnb_sd(packed, state, prefix="layer."):
    return {prefix + "weight": packed, **{prefix + "weight." + k: v for k, v in state.as_dict(packed=True).items()}}


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_state_dict_byte_identical_both_ways(quant_type, nested, dtype):
    w = torch.randn(96, 130, generator=torch.Generator().manual_seed(1)).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=128, compress_statistics=nested, quant_type=quant_type)
    theirs = _bnb_sd(packed, state)
    ours = to_bnb_state_dict(quantize(w, Scheme(quant_type, blocksize=128, nested=nested)), "layer.")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(_bits(ours[k]), _bits(theirs[k])), k
    loaded = from_bnb_state_dict(theirs, "layer.")
    assert torch.equal(_bits(loaded.dequantize()), _bits(_bnb_portable_dequant(packed, state)))
    # The unpacked form (QuantState.as_dict(packed=False)) loads too.
    plain = {"layer.weight": packed, **{"layer.weight." + k: v for k, v in state.as_dict(packed=False).items()}}
    assert torch.equal(from_bnb_state_dict(plain, "layer.").codes, loaded.codes)


def test_linear4bit_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    q = bnb.nn.Linear4bit(128, 64, compress_statistics=True, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # Params4bit quantizes on its first move to a device
    assert q.weight.bnb_quantized
    sd = q.state_dict()
    qw = from_bnb_state_dict(sd, "")
    ref = quantize(lin.weight.detach(), Scheme("nf4", blocksize=64, nested=True))
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.nested.codes, ref.nested.codes)
    assert torch.equal(_bits(qw.nested.offset.reshape(1)), _bits(ref.nested.offset.reshape(1)))
    # ... through safetensors, as QLoRA checkpoints are stored
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "adapter.safetensors"))
    again = from_bnb_state_dict(load_file(str(tmp_path / "adapter.safetensors")), "")
    assert torch.equal(_bits(again.dequantize()), _bits(qw.dequantize()))
    # ... and ours goes back into a Linear4bit (the way loaders do it) computing the same layer.
    from bitsandbytes.nn import Params4bit

    entries = to_bnb_state_dict(ref, "")
    data = entries.pop("weight")
    stats = {k.removeprefix("weight."): v for k, v in entries.items()}
    q2 = bnb.nn.Linear4bit(128, 64, compress_statistics=True, quant_type="nf4")
    q2.weight = Params4bit.from_prequantized(data, stats, device="cpu", module=q2)
    q2.bias = torch.nn.Parameter(lin.bias.detach().clone())
    assert torch.equal(_bits(_bnb_dequant(q2.weight.data, q2.weight.quant_state)), _bits(ref.dequantize()))
    x = torch.randn(3, 128)
    q2.train()  # eval mode on CPU would repack the weight for bitsandbytes' own CPU kernel
    with torch.no_grad():
        y = q2(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, ref.dequantize(), lin.bias), rtol=1e-5, atol=1e-5)


def test_prefix_without_trailing_dot_is_accepted():
    w = torch.randn(32, 64)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="fp4")
    sd = _bnb_sd(packed, state, "model.proj.")
    assert torch.equal(from_bnb_state_dict(sd, "model.proj").codes, from_bnb_state_dict(sd, "model.proj.").codes)


# ---- rejections -----------------------------------------------------------------------------------------------
def _sample(nested=True, quant_type="nf4"):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    return F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)


@pytest.mark.parametrize("key", ["weight.quant_map", "weight.nested_quant_map"])
def test_custom_code_table_is_rejected(key):
    packed, state = _sample()
    sd = _bnb_sd(packed, state, "")
    sd[key] = sd[key].clone()
    sd[key][3] += 1e-3
    with pytest.raises(FormatError, match=rf"^{key}: not the standard bitsandbytes .* table"):
        from_bnb_state_dict(sd)


def test_wrong_table_for_the_type_is_rejected():
    packed, state = _sample(quant_type="fp4")
    state.code = F.get_4bit_type("nf4", device="cpu")
    with pytest.raises(FormatError, match=r"weight\.quant_map: not the standard bitsandbytes fp4 table"):
        from_bnb(packed, state)
    packed, state = _sample()
    state.state2.code = torch.linspace(-1, 1, 256)
    with pytest.raises(FormatError, match=r"weight\.nested_quant_map: not the standard bitsandbytes dynamic table"):
        from_bnb(packed, state)


def test_cpu_repacked_state_is_rejected():
    packed, state = _sample()
    state.packing_format_for_cpu = True  # what Linear4bit.forward in eval mode on CPU leaves behind
    with pytest.raises(FormatError, match=r"repacked for bitsandbytes' CPU kernel"):
        from_bnb(packed, state)


def test_unsupported_states_are_rejected():
    packed, state = _sample()
    state.state2.dtype = torch.float16
    with pytest.raises(FormatError, match=r"nested constants of dtype torch.float16 are not supported"):
        from_bnb(packed, state)
    packed, state = _sample(nested=False)
    state.quant_type = "int4"
    with pytest.raises(FormatError, match=r"quant_type 'int4' is not supported; supported: \('nf4', 'fp4'\)"):
        from_bnb(packed, state)
    packed, state = _sample(nested=False)
    state.blocksize = 48
    with pytest.raises(FormatError, match=r"block size 48 is not supported; supported: \(32, 64"):
        from_bnb(packed, state)
    packed, state = _sample(nested=False)
    with pytest.raises(FormatError, match=r"^w: 1023 elements for shape \(32, 64\) in nf4-b64; expected 1024"):
        from_bnb(packed[:-1], state, name="w")
    with pytest.raises(FormatError, match=r"^w\.absmax: 31 elements"):
        state.absmax = state.absmax[:-1]
        from_bnb(packed, state, name="w")
    with pytest.raises(FormatError, match=r"bitsandbytes 4-bit states hold nf4 or fp4 only"):
        to_bnb(quantize(torch.randn(8, 64), Scheme("int", 8, True, "channel")))


@pytest.mark.parametrize(
    "drop", ["weight.absmax", "weight.quant_map", "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]
)
def test_incomplete_checkpoint_names_the_entry(drop):
    sd = _bnb_sd(*_sample(), "m.")
    del sd["m." + drop]
    missing = drop if "quant_state" not in drop else "weight.quant_state.bitsandbytes__nf4"
    with pytest.raises(FormatError, match=rf"m\.{missing.replace('.', r'.')}: missing"):
        from_bnb_state_dict(sd, "m.")


def test_corrupt_packed_quant_state():
    sd = _bnb_sd(*_sample(), "")
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor([0xFF, 0x00], dtype=torch.uint8)
    with pytest.raises(FormatError, match=r"weight\.quant_state\.bitsandbytes__nf4: corrupt packed quant state"):
        from_bnb_state_dict(sd)
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(
        list(json.dumps({"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [32, 64]}).encode()),
        dtype=torch.uint8,
    )
    with pytest.raises(FormatError, match=r"quant_type 'fp4' contradicts the key"):
        from_bnb_state_dict(sd)
    with pytest.raises(FormatError, match=r"^x\.weight: missing; not a bitsandbytes 4-bit checkpoint entry"):
        from_bnb_state_dict(sd, "x.")


def test_checkpoints_load_without_bitsandbytes(monkeypatch):
    packed, state = _sample()
    sd = _bnb_sd(packed, state, "")
    expect = from_bnb_state_dict(sd)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of it now fails
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    loaded = from_bnb_state_dict(sd)
    assert torch.equal(_bits(loaded.dequantize()), _bits(expect.dequantize()))
    assert to_bnb_state_dict(loaded).keys() == sd.keys()
    with pytest.raises(
        ImportError, match=r"needs bitsandbytes .*from_bnb_state_dict/to_bnb_state_dict work without it"
    ):
        to_bnb(loaded)
    assert isinstance(loaded, QuantizedWeight)


def test_gptq_nf4_weight_loads_into_linear4bit_with_the_same_outputs():
    """GPTQ chooses other codes than bitsandbytes would, in the same format: a Linear4bit built from
    its state dict computes our layer."""
    from bitsandbytes.nn import Params4bit

    from qbackend.formats.gptq import gptq_quantize
    from qbackend.kernels import prepare_weight

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    x_cal = torch.randn(1024, 256, generator=g) * (0.2 + 3 * torch.rand(256, generator=g))
    out = gptq_quantize(lin.weight.detach(), x_cal.t() @ x_cal / 1024, Scheme("nf4", blocksize=64, nested=True))
    qw = out.qweight
    assert not out.kept_rtn and not torch.equal(qw.codes, quantize(lin.weight.detach(), qw.scheme).codes)
    entries = to_bnb_state_dict(qw, "")
    data = entries.pop("weight")
    stats = {k.removeprefix("weight."): v for k, v in entries.items()}
    q = bnb.nn.Linear4bit(256, 96, compress_statistics=True, quant_type="nf4")
    q.weight = Params4bit.from_prequantized(data, stats, device="cpu", module=q)
    q.bias = torch.nn.Parameter(lin.bias.detach().clone())
    assert torch.equal(_bits(_bnb_dequant(q.weight.data, q.weight.quant_state)), _bits(qw.dequantize()))
    x = torch.randn(5, 256, generator=g)
    q.train()  # eval mode on CPU would repack the weight for bitsandbytes' own CPU kernel
    kw = prepare_weight(qw)
    with torch.no_grad():
        ours = kw.op(x, *kw.tensors, lin.bias.detach(), *kw.statics)
        theirs = q(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
