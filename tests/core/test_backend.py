"""torch.compile(backend="qbackend") end to end through Inductor (each compile costs seconds: keep them few)."""

import copy
import functools
import gc
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache, run_and_get_code

import qbackend
from qbackend import QuantConfig
from qbackend.core.backend import StaleWeightError, inductor_patches
from qbackend.core.backend import qbackend as qbackend_fn
from qbackend.core.config import ConfigError


class MLP(nn.Module):
    def __init__(self, d=128, h=256):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)
        self.head = nn.Linear(d, 64)

    def forward(self, x):
        return self.head(self.down(F.gelu(self.up(x))))


def counting(**options):
    return CompileCounterWithBackend(functools.partial(qbackend_fn, options=options))


def quantized_reference(model, config):
    """The same model with its linears swapped for QuantizedLinear: the eager quantized numerics."""
    ref = copy.deepcopy(model)
    qbackend.quantize_(ref, config)
    return ref


@pytest.fixture(scope="module")
def int8_compiled():
    """One compile (no_grad, then a dynamic-batch recompile) shared by the cheap assertions below."""
    torch.manual_seed(0)
    model = MLP().eval()
    opts = {"preset": "int8", "exclude": ["head"], "min_params": 0}
    counter = counting(**opts)
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, torch.randn(2, 5, 128))
        for b, s in ((3, 5), (4, 5), (7, 6), (9, 11), (2, 3), (16, 7)):  # batch, then sequence, vary
            compiled(torch.randn(b, s, 128))
    return model, compiled, counter, QuantConfig.from_options(opts), out, codes


def test_linears_run_the_quantized_op_and_excluded_stays_float(int8_compiled):
    model, compiled, counter, config, out, codes = int8_compiled
    code = "\n".join(codes)
    assert code.count("_qbackend_kernels['int8_linear'](") == 2
    assert "nf4_linear" not in code and "fp4_linear" not in code
    x = torch.randn(6, 5, 128)
    with torch.no_grad():
        got = compiled(x)
        want = quantized_reference(model, config)(x)
        floats = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, floats, atol=1e-6)  # really quantized...
    assert F.cosine_similarity(got.flatten(), floats.flatten(), 0) > 0.999  # ...within int8's error


def test_dynamic_batch_does_not_recompile_per_size(int8_compiled):
    _, _, counter, *_ = int8_compiled
    # the first (static) call, one graph with a dynamic batch, one with dynamic batch and sequence; no more
    assert counter.frame_count == 3


def test_grad_enabled_call_gives_input_gradients_through_the_op(int8_compiled):
    model, compiled, counter, config, *_ = int8_compiled
    x = torch.randn(3, 5, 128, requires_grad=True)
    compiled(x).square().sum().backward()
    ref = quantized_reference(model, config)
    x2 = x.detach().clone().requires_grad_()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    assert model.up.weight.grad is None  # quantized weights are frozen
    assert model.head.weight.grad is not None  # the float (excluded) layer still trains


def test_no_second_float_copy_of_quantized_weights(int8_compiled):
    model, compiled, *_ = int8_compiled
    gc.collect()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(model.up.weight.shape), tuple(model.down.weight.shape)}
    copies = [
        t
        for t in gc.get_objects()
        if issubclass(type(t), torch.Tensor)  # (type(): no __class__ lookups on arbitrary objects)
        and not issubclass(type(t), torch._subclasses.FakeTensor)
        and t.dtype == torch.float32
        and tuple(t.shape) in shapes | {s[::-1] for s in shapes}
        and t.device.type == "cpu"
        and t.untyped_storage().data_ptr() not in params
    ]
    assert copies == []


def test_weight_changed_in_place_is_requantized():
    torch.manual_seed(1)
    model = MLP().eval()
    compiled = torch.compile(model, backend="qbackend", options={"min_params": 0})
    x = torch.randn(4, 128)
    with torch.no_grad():
        before = compiled(x)
        model.up.weight.mul_(-0.5)  # e.g. an optimizer step or a loaded checkpoint
        after = compiled(x)
        want = quantized_reference(model, QuantConfig(min_params=0))(x)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, after)


def test_weight_changed_in_place_raises_when_asked():
    model = MLP().eval()
    compiled = torch.compile(model, backend="qbackend", options={"on_weight_change": "error", "min_params": 0})
    x = torch.randn(4, 128)
    with torch.no_grad():
        compiled(x)
        model.down.weight.add_(1.0)
        with pytest.raises(StaleWeightError, match="weight of layer 'down' was changed in place"):
            compiled(x)


def test_cold_and_warm_caches_give_the_same_lowering(caplog):
    lin = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).eval()
    x = torch.randn(2, 64)
    with fresh_cache(), torch.no_grad():
        counters.clear()
        with caplog.at_level(logging.INFO, logger="qbackend"):
            cold, cold_code = run_and_get_code(torch.compile(lin, backend="qbackend", options={"min_params": 0}), x)
        assert counters["aot_autograd"]["autograd_cache_miss"] == 1
        assert "quantized 1/1 linear layers to nf4-b64-nested" in caplog.text
        torch._dynamo.reset()
        warm, warm_code = run_and_get_code(torch.compile(lin, backend="qbackend", options={"min_params": 0}), x)
        assert counters["aot_autograd"]["autograd_cache_hit"] == 1
    assert "_qbackend_kernels['nf4_linear'](" in cold_code[0]
    assert "_qbackend_kernels['nf4_linear'](" in warm_code[0]
    torch.testing.assert_close(cold, warm, rtol=0, atol=0)
    torch.testing.assert_close(warm, quantized_reference(lin, QuantConfig(min_params=0))(x))


def test_graph_breaks_and_fullgraph():
    model = MLP().eval()

    def broken(m, x):
        h = F.gelu(m.up(x))
        torch._dynamo.graph_break()
        return m.head(m.down(h))

    counter = counting(min_params=0)
    x = torch.randn(2, 128)
    with torch.no_grad():
        got = torch.compile(broken, backend=counter)(model, x)
        full = torch.compile(model, backend="qbackend", fullgraph=True, options={"min_params": 0})(x)
        want = quantized_reference(model, QuantConfig(min_params=0))(x)
    assert counter.frame_count == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full, want, rtol=1e-4, atol=1e-5)


def test_mode_max_autotune_no_cudagraphs():
    model = MLP().eval()
    x = torch.randn(2, 128)
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, backend="qbackend", mode="max-autotune-no-cudagraphs"), x)
    assert "_qbackend_kernels['nf4_linear'](" in "\n".join(codes)
    assert out.shape == (2, 64)


def test_mode_and_inductor_patches():
    cfg = QuantConfig(inductor={"max_autotune": False, "epilogue_fusion": False})
    assert inductor_patches("max-autotune-no-cudagraphs", QuantConfig()) == {
        "max_autotune": True,
        "coordinate_descent_tuning": True,
    }
    assert inductor_patches("max-autotune-no-cudagraphs", cfg)["max_autotune"] is False  # explicit wins
    assert inductor_patches(None, QuantConfig()) == {} == inductor_patches("default", QuantConfig())
    # mode as an option (torch.compile refuses mode= with options=): same patches, inductor= still on top
    assert inductor_patches(None, QuantConfig(mode="reduce-overhead")) == {"triton.cudagraphs": True}
    assert inductor_patches(None, QuantConfig(mode="reduce-overhead", inductor={"triton.cudagraphs": False})) == {
        "triton.cudagraphs": False
    }
    with pytest.raises(RuntimeError, match="Unrecognized mode"):
        inductor_patches("fastest", QuantConfig())


def test_bad_option_is_a_clear_error_through_torch_compile():
    model = MLP()
    with pytest.raises(Exception, match=r"unknown qbackend option\(s\) 'formt'.*valid: preset, format"):
        torch.compile(model, backend="qbackend", options={"formt": "int8"})(torch.randn(2, 128))
    with pytest.raises(ConfigError, match="unknown preset"):
        QuantConfig.from_options({"preset": "int5"})


def test_freezing_never_gives_stale_results():
    """Inductor freezing bakes weights (float and quantized) into the compiled code: a change raises."""
    model = MLP().eval()
    x = torch.randn(3, 128)
    cfg = QuantConfig(exclude=["head"], min_params=0)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(model, backend="qbackend", options=cfg)
        torch.testing.assert_close(compiled(x), quantized_reference(model, cfg)(x), rtol=1e-4, atol=1e-5)
        model.head.weight.add_(1.0)  # float, folded by freezing
        with pytest.raises(StaleWeightError, match="'head.weight'.*freezing"):
            compiled(x)
        model.head.weight.sub_(1.0)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="qbackend", options=cfg)
        compiled(x)
        model.up.weight.mul_(2.0)  # quantized
        with pytest.raises(StaleWeightError, match="layer 'up'.*freezing"):
            compiled(x)


def test_compute_option_reaches_the_compiled_op_without_recompiles(cpu_compute):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP().eval()
    opts = {"preset": "nf4", "compute": "int8", "min_params": 0}
    counter = counting(**opts)
    compiled = torch.compile(model, backend=counter, dynamic=False)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
        for _ in range(3):
            compiled(torch.randn(2, 5, 128))
        want = quantized_reference(model, QuantConfig.from_options(opts))(x)
        exact = quantized_reference(model, QuantConfig.from_options({**opts, "compute": "fp32"}))(x)
    code = "\n".join(codes)
    assert code.count("_qbackend_kernels['nf4_linear'](") == 3
    assert code.count("'int8')") >= 3  # the op's trailing compute argument
    assert counter.frame_count == 1
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)  # the module form computes the same
    assert not torch.allclose(out, exact, atol=1e-6)  # int8 arithmetic really ran
