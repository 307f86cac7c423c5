"""Property tests of the quantized formats (qbackend.formats): error bounds, idempotence, packing,
sign symmetry, zeros, tail blocks, shapes and dtypes, storage size.

Bounds used below (y = w / absmax as the quantizer computes it, t = the code value):
* codebooks (NF4/FP4): nearest-code rounding => |t - y| <= g/2, g the largest gap between adjacent
  codes, so |dequant - w| <= absmax * (g/2 + 2^-21) per block; 2^-21 covers the fp32 roundings of
  y (two) and of t * absmax (one). Blocks whose absmax is below 1e-38 are scaled by 1/1e-38
  (bitsandbytes clamps the divisor) and only satisfy |dequant - w| <= absmax.
* nested constants: the decoded constant c' is off by e_c <= absmax2 * (d/2 + 1/65535) + rounding
  (d the largest gap of the dynamic map; 1/65535 the half-width of the 65536 bins bitsandbytes'
  CPU library rounds through), and each element then by at most absmax * (g/2 + 2^-21) + |t| e_c.
* int: |dequant - w| <= scale / 2 (plus fp32 rounding), symmetric and affine alike.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qbackend.formats import (
    BNB_BLOCKSIZES,
    FormatError,
    QuantizedWeight,
    Scheme,
    code_table,
    dequantize,
    pack_4bit,
    quantize,
    unpack_4bit,
)
from qbackend.formats._strategies import DTYPES, PATTERNS, make_weight, weights
from qbackend.formats.blockwise import blockwise_absmax_codes, blockwise_absmax_packed, blockwise_decode
from qbackend.formats.codebooks import nearest_code
from qbackend.formats.integer import scale_shape

CODEBOOKS = ("nf4", "fp4")
TINY_SCALE = 1e-38  # bitsandbytes divides by max(absmax, 1e-38)
SLOP = 2.0**-21
SUBNORMAL = 2.0**-149


def _q(w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """quantize(), skipping (hypothesis.assume) the documented refusal to nest constants whose fp32
    mean overflows (weights near the fp32 maximum)."""
    try:
        return quantize(w, scheme)
    except FormatError as e:
        if scheme.nested and "overflow fp32" in str(e):
            assume(False)
        raise


def _max_gap(table: str) -> float:
    t = code_table(table).double().sort().values
    return float((t[1:] - t[:-1]).max())


def _blocks(x: torch.Tensor, bs: int) -> torch.Tensor:
    """Flat fp64 ``x`` as [nblocks, bs] with a zero-padded tail (for per-block reductions only)."""
    flat = x.reshape(-1).double()
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % bs)).view(-1, bs)


def _per_element(v: torch.Tensor, bs: int, n: int) -> torch.Tensor:
    return v.double().repeat_interleave(bs)[:n]


def _scaled(w: torch.Tensor, bs: int) -> torch.Tensor:
    """y = w / absmax exactly as the quantizer computes it (reciprocal-multiply; the tail divides)."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % bs
    body = flat[:full].view(-1, bs)
    inv = 1.0 / body.abs().amax(dim=1).clamp(min=TINY_SCALE)
    parts = [(body * inv[:, None]).reshape(-1)]
    if n % bs:
        tail = flat[full:]
        parts.append(tail / tail.abs().amax().clamp(min=TINY_SCALE))
    return torch.cat(parts)


# ---- codebook formats: error bound, nested constants ---------------------------------------------
@settings(max_examples=60)
@given(
    data=st.data(),
    table=st.sampled_from(CODEBOOKS),
    bs=st.sampled_from(BNB_BLOCKSIZES),
    nested=st.booleans(),
)
def test_codebook_roundtrip_error_within_bound(data, table, bs, nested):
    w = data.draw(weights(blocksize=bs, table=table))
    n = w.numel()
    plain = quantize(w, Scheme(table, blocksize=bs))
    absmax = plain.scale.double()  # exact block maxima (bitsandbytes stores the tail's clamped)
    true_absmax = _blocks(w.float(), bs).abs().amax(dim=1)
    if n % bs:
        assert absmax[-1] == max(true_absmax[-1].item(), float(torch.tensor(TINY_SCALE, dtype=torch.float32)))
        absmax = torch.cat([absmax[:-1], true_absmax[-1:]])
    assert torch.equal(absmax[: n // bs], true_absmax[: n // bs])

    qw = _q(w, Scheme(table, blocksize=bs, nested=nested)) if nested else plain
    got = qw.dequantize(torch.float32).reshape(-1).double()
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    err = (got - w.reshape(-1).double()).abs()
    half_gap = _max_gap(table) / 2
    normal = absmax >= TINY_SCALE
    bound = torch.where(normal, absmax * (half_gap + SLOP), absmax) + SUBNORMAL
    if nested:
        const = qw.block_constants().double()
        stored = plain.scale.double()
        e_c = (const - stored).abs()
        dyn_half_gap = _max_gap("dynamic") / 2
        absmax2 = qw.nested.absmax2.double().repeat_interleave(qw.nested.blocksize)[: const.numel()]
        c_bound = absmax2 * (dyn_half_gap + 1 / 65535 + SLOP) + (const.abs() + qw.nested.offset.abs()) * 2.0**-22
        assert (e_c <= c_bound + SUBNORMAL).all(), "nested constant outside its bound"
        bound = torch.where(normal, bound, 2 * torch.maximum(absmax, const.abs())) + e_c + const.abs() * 2.0**-23
    assert (err <= _per_element(bound, bs, n)).all()


@settings(max_examples=40)
@given(data=st.data(), table=st.sampled_from(CODEBOOKS), bs=st.sampled_from(BNB_BLOCKSIZES))
def test_nested_constants_decode_formula(data, table, bs):
    """absmax_i = dynamic[q_i] * absmax2[i // 256] + offset, with offset = mean(absmax)."""
    w = data.draw(weights(blocksize=bs, table=table, max_numel=20000))
    qw = _q(w, Scheme(table, blocksize=bs, nested=True))
    plain = quantize(w, Scheme(table, blocksize=bs))
    nc = qw.nested
    assert nc.blocksize == 256 and nc.codes.dtype == torch.uint8 and nc.absmax2.dtype == torch.float32
    offset = plain.scale.mean()  # bitsandbytes' fp32 mean, bit for bit ...
    if not bool(torch.isfinite(offset)):  # ... unless it overflows (constants near fp32 max): a float64 mean
        offset = plain.scale.double().mean().float()
    assert bool(torch.isfinite(nc.offset))
    assert torch.equal(nc.offset.view(torch.int32), offset.view(torch.int32))
    i = torch.arange(nc.codes.numel())
    expect = code_table("dynamic")[nc.codes.long()] * nc.absmax2[i // 256] + nc.offset
    assert torch.equal(qw.block_constants(), expect)
    # absmax2 is the max |absmax - offset| of each nested block (exact: one fp32 subtraction).
    centred = plain.scale - nc.offset
    assert torch.equal(nc.absmax2, _blocks(centred, 256).abs().amax(dim=1).float())


# ---- int formats: error bound ---------------------------------------------------------------------
@st.composite
def int_schemes(draw: st.DrawFn) -> Scheme:
    bits = draw(st.sampled_from((4, 8)))
    symmetric = draw(st.booleans())
    gran = draw(st.sampled_from(("tensor", "channel", "block")))
    if gran == "block":
        nested = symmetric and draw(st.booleans())
        return Scheme(
            "int", bits, symmetric, "block", blocksize=draw(st.sampled_from((2, 8, 32, 64, 128))), nested=nested
        )
    if gran == "channel":
        return Scheme("int", bits, symmetric, "channel", axis=draw(st.sampled_from((0, -1))))
    return Scheme("int", bits, symmetric, "tensor")


def _expand(c: torch.Tensor, shape: tuple[int, ...], s: Scheme) -> torch.Tensor:
    """Per-element constant of ``c`` (scale-shaped) for a weight of ``shape``."""
    c = c.double()
    if s.granularity == "tensor":
        return c.reshape(()).expand(shape)
    if s.granularity == "channel":
        view = [1] * len(shape)
        ax = s.axis % len(shape)
        view[ax] = shape[ax]
        return c.reshape(view).expand(shape)
    k = shape[-1]
    return c.reshape(-1, c.shape[-1]).repeat_interleave(s.blocksize, dim=1)[:, :k].reshape(shape)


@settings(max_examples=80)
@given(data=st.data(), scheme=int_schemes())
def test_int_roundtrip_error_within_bound(data, scheme):
    w = data.draw(weights(blocksize=scheme.blocksize))
    qw = _q(w, scheme)
    got = qw.dequantize(torch.float32).double()
    assert got.shape == w.shape and torch.isfinite(got).all()
    x = w.double()
    plain = quantize(w, Scheme("int", scheme.bits, scheme.symmetric, scheme.granularity, scheme.blocksize, scheme.axis))
    scale = _expand(plain.scale, tuple(w.shape), scheme)
    q = qw.codes_unpacked().reshape(w.shape)
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    bound = scale * (0.5 + SLOP) + x.abs() * 2.0**-22 + scheme.qmax * SUBNORMAL
    if scheme.nested:
        # Codes were chosen with the exact scale; decoding uses the nested one.
        const = _expand(qw.block_constants(), tuple(w.shape), scheme)
        bound = bound + q.double().abs() * (const - scale).abs() + const.abs() * scheme.qmax * 2.0**-23
    assert ((got - x).abs() <= bound).all()


# ---- re-quantizing a dequantized tensor ------------------------------------------------------------
@settings(max_examples=60)
@given(data=st.data(), table=st.sampled_from(CODEBOOKS), bs=st.sampled_from(BNB_BLOCKSIZES), nested=st.booleans())
def test_codebook_requantize_gives_same_codes(data, table, bs, nested):
    """Same 4-bit codes, in every block scaled normally (absmax >= 1e-38) and, when nested, whose
    decoded constant is positive (a negative one flips the block's signs). FP4 has two zero codes
    (0 = +0, 8 = -0; a tiny positive value rounds to -0): they may swap, both decode to 0."""
    w = data.draw(weights(blocksize=bs, table=table))
    scheme = Scheme(table, blocksize=bs, nested=nested)
    qw = _q(w, scheme)
    again = _q(qw.dequantize(torch.float32), scheme)
    const = qw.block_constants()
    ok = (quantize(w, Scheme(table, blocksize=bs)).scale >= TINY_SCALE) & (const > 0)
    same = _per_element(ok, bs, w.numel()).bool()
    assert torch.equal(_zero_code(again.codes_unpacked(), table)[same], _zero_code(qw.codes_unpacked(), table)[same])
    if not nested:
        assert torch.equal(again.scale[ok], qw.scale[ok])


@settings(max_examples=40)
@given(data=st.data(), table=st.sampled_from(CODEBOOKS), bs=st.sampled_from((32, 64, 256)))
def test_codebook_requantize_in_original_dtype(data, table, bs):
    """Dequantizing to fp16/bf16 (the default: the weight's dtype) keeps the codes too, for blocks
    whose absmax is a normal number of that dtype."""
    w = data.draw(weights(blocksize=bs, table=table, patterns=("normal", "ties", "zero_blocks", "signs", "uniform")))
    scheme = Scheme(table, blocksize=bs)
    qw = quantize(w, scheme)
    deq = qw.dequantize()
    assert deq.dtype == w.dtype and deq.shape == w.shape
    again = quantize(deq, scheme)
    ok = _per_element(qw.scale >= torch.finfo(w.dtype).tiny, bs, w.numel()).bool()
    assert torch.equal(_zero_code(again.codes_unpacked(), table)[ok], _zero_code(qw.codes_unpacked(), table)[ok])


def _zero_code(codes: torch.Tensor, table: str) -> torch.Tensor:
    """FP4's -0 code (8) as its +0 code (0); other codes unchanged."""
    return torch.where(codes == 8, 0, codes) if table == "fp4" else codes


@settings(max_examples=60)
@given(data=st.data(), scheme=int_schemes())
def test_int_requantize_gives_same_codes(data, scheme):
    """Symmetric: always. Affine: in every unit (tensor/channel/group) whose codes reach both 0 and
    qmax; other units (e.g. a group whose maximum rounds to qmax - 1) may re-scale."""
    w = data.draw(weights(blocksize=scheme.blocksize, patterns=("normal", "uniform", "zero_blocks", "signs", "huge")))
    qw = _q(w, scheme)
    again = _q(qw.dequantize(torch.float32), scheme)
    q1, q2 = qw.codes_unpacked().reshape(w.shape), again.codes_unpacked().reshape(w.shape)
    if scheme.symmetric:
        if scheme.nested:  # the nested constants move with the re-centred mean: codes stay close
            assert (q1.int() - q2.int()).abs().max() <= 1
        else:
            assert torch.equal(q1, q2)
        return
    lo = _expand(_unit_reduce(q1, scheme, torch.amin), tuple(w.shape), scheme)
    hi = _expand(_unit_reduce(q1, scheme, torch.amax), tuple(w.shape), scheme)
    full = (lo == 0) & (hi == scheme.qmax)
    assert torch.equal(q1[full], q2[full])


def _unit_reduce(q: torch.Tensor, s: Scheme, fn) -> torch.Tensor:
    x = q.double()
    if s.granularity == "tensor":
        return fn(x).reshape(1)
    if s.granularity == "channel":
        ax = s.axis % x.dim()
        return fn(x.movedim(ax, 0).reshape(x.shape[ax], -1), dim=1)
    k = x.shape[-1]
    pad = (-k) % s.blocksize
    rows = x.reshape(-1, k)
    # Pad with a value of the group so padding cannot change its min/max.
    rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1) if pad else rows
    return fn(rows.reshape(rows.shape[0], -1, s.blocksize), dim=2)


# ---- packing ---------------------------------------------------------------------------------------
@given(codes=st.lists(st.integers(0, 15), min_size=0, max_size=300), pad=st.integers(0, 15))
def test_pack_unpack_lossless(codes, pad):
    c = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_4bit(c, pad_code=pad)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(codes) + 1) // 2
    assert torch.equal(unpack_4bit(packed, len(codes)), c)
    if codes:  # first element in the high nibble (bitsandbytes order)
        assert int(packed[0]) >> 4 == codes[0]
    if len(codes) % 2:
        assert int(packed[-1]) & 0xF == pad


@given(raw=st.binary(min_size=0, max_size=200))
def test_unpack_pack_lossless(raw):
    b = torch.tensor(list(raw), dtype=torch.uint8)
    assert torch.equal(pack_4bit(unpack_4bit(b, 2 * b.numel())), b)


def test_pack_rejects_bad_input():
    with pytest.raises(TypeError, match="uint8"):
        pack_4bit(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="cannot unpack 5 codes from 2 bytes"):
        unpack_4bit(torch.zeros(2, dtype=torch.uint8), 5)


# ---- sign symmetry ---------------------------------------------------------------------------------
@settings(max_examples=60)
@given(data=st.data(), table=st.sampled_from(CODEBOOKS), bs=st.sampled_from(BNB_BLOCKSIZES))
def test_codebook_negation_is_the_mirrored_table(data, table, bs):
    """NF4 is not a symmetric table (7 negative codes, 8 positive), so quantize(-w) != -quantize(w).
    What holds, for NF4 and FP4 alike: the absmax is unchanged, and -dequant(quantize(-w)) is w
    rounded to the mirrored table -T with ties going UP (quantize rounds ties down, and negation
    turns down into up). For FP4, whose table is symmetric, this means quantize(-w) decodes to
    exactly -dequant(quantize(w)) everywhere except at exact ties between two codes."""
    w = data.draw(weights(blocksize=bs, table=table))
    s = Scheme(table, blocksize=bs)
    pos, neg = quantize(w, s), quantize(-w, s)
    assert torch.equal(pos.scale, neg.scale)
    y = _scaled(w, bs)
    mirror = (-code_table(table).double()).sort().values.float()
    mids = (mirror[:-1] + mirror[1:]) / 2
    expect = mirror[torch.bucketize(y, mids, right=True)] * pos.scale.repeat_interleave(bs)[: w.numel()]
    got = -neg.dequantize(torch.float32).reshape(-1)
    assert torch.equal(got, expect)
    if table == "nf4":  # codes mirror as 15 - index in the mirrored table
        idx = torch.bucketize(y, mids, right=True)
        assert torch.equal(neg.codes_unpacked().long(), 15 - idx)
    else:
        tie = torch.isin(y, (code_table("fp4").sort().values[:-1] + code_table("fp4").sort().values[1:]) / 2)
        a, b = pos.dequantize(torch.float32).reshape(-1), neg.dequantize(torch.float32).reshape(-1)
        assert torch.equal(a[~tie], -b[~tie])
        assert (-b[tie] >= a[tie]).all()  # at a tie w rounds down and -w rounds down too


def test_nf4_is_not_sign_symmetric_but_extremes_and_zero_are():
    w = torch.tensor([1.0, -0.5, 0.3, 0.0, -1.0, 0.1, -0.1, 0.6])
    s = Scheme("nf4", blocksize=32)
    pos, neg = dequantize(quantize(w, s)), dequantize(quantize(-w, s))
    assert not torch.equal(pos, -neg)  # e.g. 0.3 -> 0.3379 but -0.3 -> -0.2844
    keep = torch.tensor([0, 3, 4])  # +-absmax and 0 map exactly
    assert torch.equal(pos[keep], -neg[keep])
    assert torch.equal(pos[keep], w[keep])


@settings(max_examples=60)
@given(data=st.data(), scheme=int_schemes())
def test_int_symmetric_is_sign_symmetric(data, scheme):
    assume(scheme.symmetric)
    w = data.draw(weights(blocksize=scheme.blocksize))
    pos, neg = quantize(w, scheme), quantize(-w, scheme)
    assert torch.equal(neg.codes_unpacked(), -pos.codes_unpacked())
    assert torch.equal(neg.dequantize(torch.float32), -pos.dequantize(torch.float32))


# ---- zeros -----------------------------------------------------------------------------------------
ALL_SCHEMES = [
    *(Scheme(t, blocksize=b, nested=n) for t in CODEBOOKS for b in (32, 64, 4096) for n in (False, True)),
    Scheme("int", 8, True, "channel"),
    Scheme("int", 8, False, "channel", axis=1),
    Scheme("int", 4, True, "block", blocksize=32),
    Scheme("int", 4, True, "block", blocksize=32, nested=True),
    Scheme("int", 4, False, "block", blocksize=16),
    Scheme("int", 8, True, "tensor"),
    Scheme("int", 4, False, "tensor"),
]


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.name)
@settings(max_examples=10)
@given(data=st.data())
def test_zero_maps_to_zero(scheme, data):
    w = data.draw(weights(blocksize=scheme.blocksize, max_numel=3000)).clone()
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    zero = torch.rand(w.shape, generator=g) < 0.3
    w[zero] = 0
    w.view(-1)[0] = 0
    got = _q(w, scheme).dequantize(torch.float32)
    assert (got[zero] == 0).all() and got.view(-1)[0] == 0


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (64, 64), (3, 5, 33)], ids=str)
def test_all_zero_weight_gives_exact_zeros(scheme, dtype, shape):
    if scheme.granularity == "channel" and len(shape) < 2:
        shape = (4, *shape)
    w = torch.zeros(shape, dtype=dtype)
    qw = quantize(w, scheme)
    got = qw.dequantize()
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.isfinite(qw.block_constants()).all()
    assert (got == 0).all()


@settings(max_examples=40)
@given(data=st.data(), table=st.sampled_from(CODEBOOKS), bs=st.sampled_from(BNB_BLOCKSIZES), nested=st.booleans())
def test_zero_blocks_decode_to_exact_zeros(data, table, bs, nested):
    w = data.draw(weights(blocksize=bs, table=table, patterns=("zero_blocks",)))
    qw = _q(w, Scheme(table, blocksize=bs, nested=nested))
    got = qw.dequantize(torch.float32).reshape(-1)
    assert torch.isfinite(got).all()
    zero_block = _blocks(w.float(), bs).abs().amax(dim=1) == 0
    mask = _per_element(zero_block, bs, w.numel()).bool()
    assert (got[mask] == 0).all()
    if not nested:  # bitsandbytes' constants: 0 for a full zero block, 1e-38 (clamped) for a zero tail
        full = w.numel() // bs
        assert (qw.scale[:full][zero_block[:full]] == 0).all()


# ---- tail blocks ------------------------------------------------------------------------------------
@settings(max_examples=60)
@given(
    data=st.data(),
    table=st.sampled_from(CODEBOOKS),
    bs=st.sampled_from(BNB_BLOCKSIZES),
    nfull=st.integers(0, 3),
    rem=st.integers(1, 4095),
)
def test_tail_block_is_a_standalone_block(data, table, bs, nfull, rem):
    """A tail block (size % blocksize) is quantized from its own elements only: identical to
    quantizing the tail alone, whatever surrounds it, and the odd last nibble is the code of 0."""
    assume(rem < bs)
    n = nfull * bs + rem
    seed = data.draw(st.integers(0, 2**20))
    pattern = data.draw(st.sampled_from(PATTERNS))
    w = make_weight(seed, (n,), torch.float32, pattern, bs, table)
    s = Scheme(table, blocksize=bs)
    qw = quantize(w, s)
    alone = quantize(w[nfull * bs :].clone(), s)
    assert torch.equal(qw.codes_unpacked()[nfull * bs :], alone.codes_unpacked())
    assert torch.equal(qw.scale[-1:], alone.scale)
    # Changing everything before the tail changes nothing in it.
    other = w.clone()
    other[: nfull * bs] = 1e6
    assert torch.equal(quantize(other, s).codes_unpacked()[nfull * bs :], alone.codes_unpacked())
    if n % 2:
        assert int(qw.codes[-1]) & 0xF == int(nearest_code(torch.zeros(1), table))
    got = qw.dequantize().reshape(-1)
    assert got.numel() == n  # nothing of the padding comes back


@settings(max_examples=40)
@given(data=st.data(), bits=st.sampled_from((4, 8)), symmetric=st.booleans(), g=st.sampled_from((4, 32, 128)))
def test_int_tail_group_uses_its_own_elements(data, bits, symmetric, g):
    rows = data.draw(st.integers(1, 8))
    k = data.draw(st.integers(1, 300))
    assume(k % g)
    w = make_weight(data.draw(st.integers(0, 2**20)), (rows, k), torch.float32, "normal")
    s = Scheme("int", bits, symmetric, "block", blocksize=g)
    qw = quantize(w, s)
    assert qw.scale.shape == scale_shape((rows, k), s) == (rows, -(-k // g))
    tail = w[:, (k // g) * g :]
    alone = quantize(tail.contiguous(), s)
    assert torch.equal(qw.scale[:, -1], alone.scale[:, 0])
    got = qw.dequantize(torch.float32)
    assert got.shape == (rows, k)
    assert torch.equal(got[:, (k // g) * g :], alone.dequantize(torch.float32))


# ---- shapes and dtypes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shapes_and_dtypes_come_back(scheme, dtype):
    for shape in [(5,), (3, 4, 7), (2, 3, 4, 5), (130, 33)]:
        w = make_weight(1, shape, dtype, "normal", scheme.blocksize)
        qw = quantize(w, scheme)
        assert qw.shape == shape and qw.dtype == dtype
        assert qw.dequantize().dtype == dtype and qw.dequantize().shape == shape
        assert qw.dequantize(torch.float32).dtype == torch.float32
        # fp16/bf16 input is quantized from its exact fp32 widening
        assert torch.equal(quantize(w.float(), scheme).codes, qw.codes)


@pytest.mark.parametrize("scheme", [s for s in ALL_SCHEMES if s.granularity != "channel"], ids=lambda s: s.name)
def test_zero_dim_weight(scheme):
    w = torch.tensor(-2.5)
    qw = quantize(w, scheme)
    assert qw.shape == () and qw.dequantize().shape == ()
    assert float(qw.dequantize()) == -2.5  # the block maximum maps exactly


def test_non_contiguous_input_matches_contiguous():
    w = make_weight(3, (96, 130), torch.float32, "normal").t()
    for s in (Scheme("nf4"), Scheme("fp4", nested=True), Scheme("int", 4, True, "block", blocksize=32)):
        assert torch.equal(quantize(w, s).codes, quantize(w.contiguous(), s).codes)


# ---- fast path == reference path ---------------------------------------------------------------------
def _adversarial(table: str) -> torch.Tensor:
    """Values at, just below and just above every midpoint and every bin edge of the fast path."""
    t = code_table(table).sort().values
    mids = (t[:-1] + t[1:]) / 2
    edges = torch.arange(-1024, 1025, dtype=torch.float32) / 1024
    base = torch.cat([mids, edges, t, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38])])
    up = torch.nextafter(base, torch.tensor(2.0))
    down = torch.nextafter(base, torch.tensor(-2.0))
    return torch.cat([base, up, down]).clamp(-1, 1)


@pytest.mark.parametrize("table", CODEBOOKS)
@pytest.mark.parametrize("bs", BNB_BLOCKSIZES)
def test_fast_path_equals_bucketize_on_adversarial_values(table, bs):
    v = _adversarial(table)
    # Blocks whose maximum is exactly 1 (so y == the value) at several power-of-two scales.
    n = v.numel()
    reps = -(-n // (bs - 1))
    chunks = []
    for i in range(reps):
        part = v[i * (bs - 1) : (i + 1) * (bs - 1)]
        chunks.append(torch.cat([torch.ones(1), part]))
    w = torch.cat(chunks)
    for scale in (1.0, 2.0**-60, 2.0**60, 0.75):
        x = w * scale
        codes, absmax = blockwise_absmax_codes(x, bs, table)
        packed, absmax2 = blockwise_absmax_packed(x, bs, table)
        pad = int(nearest_code(torch.zeros(1), table))
        assert torch.equal(packed, pack_4bit(codes, pad_code=pad))
        assert torch.equal(absmax, absmax2)


@settings(max_examples=60)
@given(data=st.data(), table=st.sampled_from(CODEBOOKS), bs=st.sampled_from(BNB_BLOCKSIZES))
def test_fast_path_equals_reference_path(data, table, bs):
    w = data.draw(weights(blocksize=bs, table=table, max_numel=20000))
    codes, absmax = blockwise_absmax_codes(w, bs, table)
    packed, absmax2 = blockwise_absmax_packed(w, bs, table)
    assert torch.equal(packed, pack_4bit(codes, pad_code=int(nearest_code(torch.zeros(1), table))))
    assert torch.equal(absmax.view(torch.int32), absmax2.view(torch.int32))


def test_fast_path_spans_several_chunks():
    w = make_weight(5, (2**18 + 4096 + 100,), torch.float32, "mixed", 64)
    for table in CODEBOOKS:
        codes, absmax = blockwise_absmax_codes(w, 64, table)
        packed, absmax2 = blockwise_absmax_packed(w, 64, table)
        assert torch.equal(packed, pack_4bit(codes, pad_code=int(nearest_code(torch.zeros(1), table))))
        assert torch.equal(absmax, absmax2)


@pytest.mark.parametrize("table", CODEBOOKS)
def test_nearest_code_ties_go_to_the_lower_code(table):
    t = code_table(table)
    s = t.sort().values
    mids = (s[:-1] + s[1:]) / 2
    got = t[nearest_code(mids, table).long()]
    assert torch.equal(got, s[:-1]) or (table == "fp4" and torch.equal(got.abs(), s[:-1].abs()))
    assert torch.equal(t[nearest_code(s, table).long()], s)


# ---- storage --------------------------------------------------------------------------------------------
def test_bits_per_param_qlora_numbers():
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    nested = quantize(w, Scheme("nf4", blocksize=64, nested=True))
    assert round(nested.bits_per_param(), 3) == 4.127
    assert nested.storage_bits() == 4096 * 4096 * 4 + (4096 * 4096 // 64) * 8 + (4096 * 4096 // 64 // 256) * 32 + 32
    assert quantize(w, Scheme("nf4", blocksize=64)).bits_per_param() == 4.5


@pytest.mark.parametrize(
    ("scheme", "shape", "bits"),
    [
        (Scheme("fp4", blocksize=32), (64, 64), 4 + 32 / 32),
        (Scheme("int", 8, True, "channel"), (64, 256), 8 + 32 / 256),
        (Scheme("int", 4, True, "block", blocksize=128), (64, 256), 4 + 32 / 128),
        (Scheme("int", 4, False, "block", blocksize=128), (64, 256), 4 + 40 / 128),
        (Scheme("int", 8, True, "tensor"), (64, 256), 8 + 32 / (64 * 256)),
    ],
    ids=lambda x: x.name if isinstance(x, Scheme) else str(x),
)
def test_bits_per_param_other_formats(scheme, shape, bits):
    qw = quantize(torch.randn(shape), scheme)
    assert math.isclose(qw.bits_per_param(), bits)
    assert qw.nbytes() == math.ceil(qw.storage_bits() / 8)


@settings(max_examples=40)
@given(data=st.data(), table=st.sampled_from(CODEBOOKS), bs=st.sampled_from(BNB_BLOCKSIZES), nested=st.booleans())
def test_dequantize_from_packed_bytes_equals_unpacked_decode(data, table, bs, nested):
    w = data.draw(weights(blocksize=bs, table=table))
    qw = _q(w, Scheme(table, blocksize=bs, nested=nested))
    ref = blockwise_decode(unpack_4bit(qw.codes, qw.numel), qw.block_constants(), bs, table, qw.numel)
    got = qw.dequantize(torch.float32).reshape(-1)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad"])
def test_quantize_under_inference_mode_and_with_parameters(mode):
    """The multi-chunk path runs in worker threads: grad/inference mode is thread-local there."""
    w = torch.nn.Parameter(make_weight(0, (2**19 + 96,), torch.float32, "normal"))
    ref = quantize(w.detach().clone(), Scheme("nf4", nested=True))
    ctx = {"inference": torch.inference_mode(), "no_grad": torch.no_grad()}.get(mode, contextlib.nullcontext())
    with ctx:
        qw = quantize(w, Scheme("nf4", nested=True))
        assert torch.equal(qw.codes, ref.codes) and not qw.codes.requires_grad
        assert torch.equal(qw.dequantize(), ref.dequantize())
