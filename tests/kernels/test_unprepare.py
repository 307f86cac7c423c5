"""`weight_from_kernel_tensors` inverts `prepare_weight`: the kernel tensors give back the weight they came from."""

from __future__ import annotations

import pytest
import torch

from qbackend.formats import FormatError, Scheme, quantize
from qbackend.kernels import prepare_weight, weight_from_kernel_tensors

SCHEMES = [
    Scheme("nf4", blocksize=64),
    Scheme("nf4", blocksize=64, nested=True),
    Scheme("fp4", blocksize=128, nested=True),
    Scheme("int", 4, True, "block", blocksize=32),
    Scheme("int", 4, False, "block", blocksize=64),
    Scheme("int", 4, True, "block", blocksize=32, nested=True),
    Scheme("int", 4, False, "channel"),
    Scheme("int", 4, False, "tensor"),
    Scheme("int", 8, True, "channel"),
    Scheme("int", 8, True, "tensor"),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=[s.name for s in SCHEMES])
def test_kernel_tensors_give_back_the_weight(scheme):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    qw = quantize(w, scheme)
    kw = prepare_weight(qw)
    tensors = {n: t for n, t in zip(kw.names, kw.tensors, strict=True) if t is not None}
    back = weight_from_kernel_tensors(scheme, 48, 128, tensors.get, "layer")
    assert back.shape == qw.shape and torch.equal(back.codes, qw.codes)
    assert torch.equal(back.dequantize(torch.float32), qw.dequantize(torch.float32))
    if not (scheme.kind == "int" and scheme.nested):  # nested int4 constants are held decoded: they come back plain
        assert back.scheme == scheme
    again = prepare_weight(back)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(kw.tensors, again.tensors, strict=True))


def test_a_missing_tensor_is_named():
    kw = prepare_weight(quantize(torch.randn(8, 64), Scheme("nf4", blocksize=64)))
    tensors = {n: t for n, t in zip(kw.names, kw.tensors, strict=True) if t is not None and n != "absmax"}
    with pytest.raises(FormatError, match=r"layer.absmax: missing \(needed by nf4"):
        weight_from_kernel_tensors(Scheme("nf4", blocksize=64), 8, 64, tensors.get, "layer")
