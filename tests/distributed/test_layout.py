"""The row layout: same bytes and outputs as QuantizedLinear, and the whole-block rule."""

import pytest
import torch
from torch import nn

from qbackend.distributed import ShardableQuantizedLinear, ShardingError, from_row_layout, to_row_layout
from qbackend.formats import Scheme
from qbackend.workflows.weight_only.linear import QuantizedLinear

SCHEMES = {
    "nf4-nested": Scheme("nf4", 4, blocksize=64, nested=True),
    "fp4": Scheme("fp4", 4, blocksize=32),
    "int4-groups": Scheme("int", 4, granularity="block", blocksize=32),
    "int4-affine": Scheme("int", 4, symmetric=False, granularity="block", blocksize=32),
    "int8": Scheme("int", 8, granularity="channel"),
}


@pytest.mark.parametrize("label", SCHEMES)
def test_row_layout_same_output_and_round_trip(label):
    torch.manual_seed(0)
    q = QuantizedLinear.from_weight(torch.randn(48, 128), torch.randn(48), SCHEMES[label])
    model = nn.Sequential(q)
    x = torch.randn(5, 128)
    want = model(x)
    assert to_row_layout(model) == ["0"]
    row = model[0]
    assert isinstance(row, ShardableQuantizedLinear)
    for name, p in row.quantized_tensors():
        assert isinstance(p, nn.Parameter) and not p.requires_grad
        assert p.dtype in (torch.uint8, torch.int8, torch.int32), name  # never cast by mixed precision
        if name in ("codes", "absmax", "scale", "nested_codes", "zero_point"):
            assert p.shape[0] == 48, name  # dim 0 is whole output rows
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    from_row_layout(model)
    assert type(model[0]) is QuantizedLinear
    for n, b in q.named_buffers():
        assert torch.equal(getattr(model[0], n), b), n
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_a_row_that_would_split_a_block_is_refused_naming_the_layer():
    model = nn.Sequential(QuantizedLinear.from_weight(torch.randn(8, 96), None, Scheme("nf4", 4, blocksize=64)))
    with pytest.raises(ShardingError, match=r"^0: in_features=96 is not a multiple of the block size 64"):
        to_row_layout(model)
    assert type(model[0]) is QuantizedLinear  # nothing changed


def test_odd_int4_rows_are_refused():
    q = QuantizedLinear.from_weight(torch.randn(8, 33), None, Scheme("int", 4, granularity="channel"))
    model = nn.Sequential(q)
    with pytest.raises(ShardingError, match="in_features=33 is odd"):
        to_row_layout(model)


def test_dtype_casts_leave_codes_constants_and_tables_alone():
    torch.manual_seed(0)
    model = nn.Sequential(QuantizedLinear.from_weight(torch.randn(16, 64), None, Scheme("nf4", 4, nested=True)))
    to_row_layout(model)
    x = torch.randn(2, 64)
    want = model(x)
    model.to(torch.bfloat16)
    assert {t.dtype for t in model[0].buffers()} == {torch.float32}
    # bf16 activations: within bf16 rounding of the fp32 output (inputs and output rounded: ~1% of |y| or of |x||w|)
    torch.testing.assert_close(model(x.bfloat16()).float(), want, rtol=2e-2, atol=0.1)


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_row_layout_keeps_the_layers_compute_mode(mode):
    torch.manual_seed(0)
    q = QuantizedLinear.from_weight(torch.randn(48, 128), None, SCHEMES["nf4-nested"])
    q.set_compute(mode)
    model = nn.Sequential(q)
    x = torch.randn(3, 128)
    want = model(x)
    to_row_layout(model)
    assert model[0].compute == mode
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # the same arithmetic, not fp32
    from_row_layout(model)
    assert model[0].compute == mode
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
