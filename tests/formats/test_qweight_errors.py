"""Bad input to the formats: every error is a FormatError that names the tensor and says what is
supported."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.formats import BNB_BLOCKSIZES, FormatError, Scheme, quantize

SCHEMES = [
    Scheme("nf4"),
    Scheme("nf4", blocksize=32, nested=True),
    Scheme("fp4", blocksize=4096),
    Scheme("int", 8, True, "channel"),
    Scheme("int", 4, False, "block", blocksize=32),
    Scheme("int", 4, True, "block", blocksize=32, nested=True),
    Scheme("int", 8, False, "tensor"),
]
IDS = [s.name for s in SCHEMES]


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@settings(max_examples=8)
@given(data=st.data())
def test_non_finite_names_the_tensor(scheme, bad, dtype, data):
    rows = data.draw(st.integers(1, 40))
    cols = data.draw(st.integers(1, 300))
    w = torch.randn(rows, cols).to(dtype)
    pos = data.draw(st.sampled_from(["first", "last", "random"]))
    i = {"first": 0, "last": w.numel() - 1}.get(pos, data.draw(st.integers(0, w.numel() - 1)))
    w.view(-1)[i] = bad
    with pytest.raises(FormatError, match=r"^model\.layers\.3\.mlp\.up_proj\.weight: contains 1 NaN/Inf value\(s\)"):
        quantize(w, scheme, name="model.layers.3.mlp.up_proj.weight")


def test_non_finite_in_a_later_chunk_of_a_large_weight():
    w = torch.randn(2**19 + 64)
    w[-70] = float("nan")
    w[2**18 + 5] = float("inf")
    with pytest.raises(FormatError, match=r"^big: contains 2 NaN/Inf"):
        quantize(w, Scheme("nf4"), name="big")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("scheme", SCHEMES[:4], ids=IDS[:4])
def test_unsupported_dtype_lists_supported(dtype, scheme):
    w = torch.zeros(8, 64, dtype=dtype)
    with pytest.raises(
        FormatError, match=rf"^lin\.weight: dtype {dtype} is not supported; supported: float32, float16, bfloat16"
    ):
        quantize(w, scheme, name="lin.weight")


def test_not_a_tensor_and_empty():
    with pytest.raises(FormatError, match=r"^w: expected a torch.Tensor, got list"):
        quantize([1.0, 2.0], Scheme(), name="w")
    with pytest.raises(FormatError, match=r"^w: cannot quantize an empty tensor \(shape \(0, 64\)\)"):
        quantize(torch.zeros(0, 64), Scheme(), name="w")
    with pytest.raises(FormatError, match=r"^w: per-channel quantization needs at least one dimension"):
        quantize(torch.tensor(1.0), Scheme("int", 8, True, "channel"), name="w")


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6, 7, 16, 32])
def test_unsupported_int_bits(bits):
    with pytest.raises(FormatError, match=rf"int formats support bits 4 or 8; got bits={bits}"):
        Scheme("int", bits)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("bits", [2, 8])
def test_codebooks_are_4_bit(kind, bits):
    with pytest.raises(FormatError, match=rf"{kind} is a 4-bit format; got bits={bits} \(use bits=4\)"):
        Scheme(kind, bits)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [0, 1, 16, 48, 96, 100, 8192])
def test_unsupported_block_size_lists_supported(kind, blocksize):
    supported = str(BNB_BLOCKSIZES).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(FormatError, match=rf"{kind} block size {blocksize} is not supported; supported: {supported}"):
        Scheme(kind, blocksize=blocksize)


@pytest.mark.parametrize("nbs", [100, 16, 8192])
def test_unsupported_nested_block_size(nbs):
    with pytest.raises(FormatError, match=rf"nested block size {nbs} is not supported; supported: \(32, 64, 128"):
        Scheme("nf4", nested=True, nested_blocksize=nbs)


def test_other_scheme_errors_say_what_is_supported():
    with pytest.raises(FormatError, match=r"unknown format kind 'nf3'; supported: 'nf4', 'fp4', 'int'"):
        Scheme("nf3")
    with pytest.raises(FormatError, match=r"unknown granularity 'row'; supported: 'tensor', 'channel', 'block'"):
        Scheme("int", 8, granularity="row")
    with pytest.raises(FormatError, match=r"nf4 is block-wise only"):
        Scheme("nf4", granularity="channel")
    with pytest.raises(FormatError, match=r"nf4 is symmetric"):
        Scheme("nf4", symmetric=False)
    with pytest.raises(FormatError, match=r"int group size must be an even number >= 2; got 33"):
        Scheme("int", 4, granularity="block", blocksize=33)
    with pytest.raises(FormatError, match=r"nested constants need granularity='block'"):
        Scheme("int", 8, granularity="channel", nested=True)
    with pytest.raises(FormatError, match=r"nested constants are supported for symmetric formats only"):
        Scheme("int", 4, symmetric=False, granularity="block", nested=True)
    with pytest.raises(FormatError, match=r"Scheme.blocksize must be an int; got 64.0"):
        Scheme("nf4", blocksize=64.0)
    with pytest.raises(FormatError, match=r"Scheme.nested must be a bool"):
        Scheme("nf4", nested="yes")


def test_nested_constants_that_overflow_fp32_are_refused_with_the_name():
    # Block maxima at the fp32 maximum: the nested decode (dynamic code * absmax2 + offset) overflows.
    w = torch.full((3, 64), torch.finfo(torch.float32).max)
    w[0] = 0.5
    with pytest.raises(FormatError, match=r"^huge: block constants up to 3.4e\+38 overflow fp32 .*nested=False"):
        quantize(w, Scheme("nf4", nested=True), name="huge")
    assert torch.isfinite(quantize(w, Scheme("nf4"), name="huge").dequantize()).all()


def test_formaterror_is_a_valueerror():
    with pytest.raises(ValueError):
        quantize(torch.zeros(3, dtype=torch.float64), Scheme())
