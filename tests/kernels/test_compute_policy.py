"""The ``compute`` option resolved per layer: CPU features, fast kernels, the measured error bound."""

import logging

import pytest
import torch

from qbackend.kernels import compute_policy
from qbackend.kernels import compute_policy as cp

INTS = {"out_features": 1536, "in_features": 384, "blocksize": 64, "nested_blocksize": 256}


@pytest.fixture
def cpu(cpu_compute):
    return cpu_compute


def test_fp32_always_and_auto_is_fp32_without_fast_kernels(cpu):
    cpu(fast=())
    for fam in cp.COMPUTE_FAMILIES:
        assert cp.resolve("fp32", fam, INTS).mode == "fp32"
        assert cp.resolve("auto", fam, INTS).mode == "fp32"


def test_auto_picks_the_fastest_mode_within_the_bound(cpu):
    cpu(fast=[(m, f) for m in ("int8", "bf16") for f in cp.COMPUTE_FAMILIES])
    assert cp.resolve("auto", "int4", {**INTS, "groupsize": 128}).mode == "int8"
    assert cp.resolve("auto", "fp4", INTS).mode == "int8"
    # nf4's int8 path adds about a tenth of its own error (0.101); int8 weights: any faster mode adds too much
    assert cp.resolve("auto", "nf4", INTS).mode == "int8"
    assert cp.resolve("auto", "int8", INTS).mode == "fp32"
    cpu(fast=[("bf16", "nf4")])  # no int8 kernel for this nf4 layer: bf16 is within the bound too
    assert cp.resolve("auto", "nf4", INTS).mode == "bf16"
    cpu(fast=[("bf16", "int4")])  # no int8 kernel for this layer: the next allowed mode
    assert cp.resolve("auto", "int4", INTS).mode == "bf16"


def test_auto_keeps_fp32_for_int8_weights_where_int16_is_no_faster(cpu, monkeypatch):
    from qbackend.kernels.cpu import int16_compute

    cpu(features={"avx2"}, fast=[("int16", "int8")])
    monkeypatch.setattr(int16_compute, "_lib", lambda: (None, int16_compute.ISA_AVX2))  # the AVX2 width
    r = cp.resolve("auto", "int8", INTS)
    assert r.mode == "fp32" and "int16: no faster than fp32" in r.note
    assert cp.resolve("int16", "int8", INTS).mode == "int16"  # asked for explicitly: it runs
    monkeypatch.setattr(int16_compute, "_lib", lambda: (None, int16_compute.ISA_AVX512_VNNI))
    assert cp.resolve("auto", "int8", INTS).mode == "int16"


def test_auto_skips_modes_the_cpu_lacks_and_logs_the_fallback_once(cpu, caplog):
    cpu(features={"avx512f", "avx2"}, fast=[("int8", "int4"), ("bf16", "int4")])
    with caplog.at_level(logging.INFO, logger="qbackend"):
        r = cp.resolve("auto", "int4", INTS)
        cp.resolve("auto", "int4", INTS)
    assert r.mode == "fp32" and "VNNI" in r.note and "BF16" in r.note
    assert sum("compute='auto' runs int4 layers in fp32" in m for m in caplog.messages) == 1
    cpu(features={"avx512_bf16"}, fast=[("int8", "int4"), ("bf16", "int4")])
    assert cp.resolve("auto", "int4", INTS).mode == "bf16"


def test_explicit_mode_the_cpu_lacks_names_what_is_missing(cpu):
    cpu(features={"avx512f", "avx512_vnni"})
    with pytest.raises(cp.ComputeUnavailable, match=r"compute='bf16' needs AVX512-BF16.*lacks.*auto, fp32, int8$"):
        cp.resolve("bf16", "nf4", INTS)
    cpu(features={"avx2"})
    with pytest.raises(cp.ComputeUnavailable, match=r"AVX512-VNNI or AVX-VNNI.*supports compute = auto, fp32, int16$"):
        cp.resolve("int8", "int4", INTS)


def test_explicit_mode_without_fast_kernel_runs_the_reference_and_warns_once(cpu, caplog):
    cpu(fast=())
    with caplog.at_level(logging.WARNING, logger="qbackend"):
        assert cp.resolve("int8", "nf4", INTS) == cp.Resolved("int8", "no fast kernel: reference numerics")
        cp.resolve("int8", "nf4", INTS)
    assert sum("has no fast kernel" in m for m in caplog.messages) == 1
    cpu(fast=[("int8", "nf4")])
    assert cp.resolve("int8", "nf4", INTS) == cp.Resolved("int8")


def test_cuda_auto_is_fp32_and_explicit_modes_pass(cpu):
    cpu(features=set())  # CPU features do not matter on CUDA
    assert cp.resolve("auto", "nf4", INTS, "cuda").mode == "fp32"
    assert cp.resolve("bf16", "nf4", INTS, "cuda").mode == "bf16"


def test_bad_option_and_non_weight_only_family():
    with pytest.raises(ValueError, match="compute must be one of auto, fp32, bf16, int8, int16; got 'fast'"):
        cp.resolve("fast", "nf4", INTS)
    with pytest.raises(ValueError, match="weight-only formats"):
        cp.resolve("auto", "w8a8", INTS)


def test_resolve_weight_reads_the_family_from_the_op_name(cpu):
    cpu(fast=[("int8", "int4")])
    assert cp.resolve_weight("auto", "int4_linear", (1536, 384, 128), "cpu").mode == "int8"
    assert cp.resolve_weight("auto", "nf4_linear", (1536, 384, 64, 256), "cpu").mode == "fp32"


@pytest.mark.auto_compute
def test_auto_modes_follow_from_the_measured_ratios():
    for fam, modes in cp.AUTO_MODES.items():
        for m in cp.FAST_MODES:
            assert (m in modes) == (cp.MEASURED_RATIO[(fam, m)] <= cp.ERROR_BOUND)
        assert list(modes) == [m for m in cp.FAST_MODES if m in modes]  # fastest first


def test_cpu_features_are_the_flags_that_matter():
    feats = cp.cpu_features()
    assert isinstance(feats, frozenset)
    wanted = {f for alts, _ in cp.REQUIRED_FEATURES.values() for f in alts} | {"avx512f", "avx2"}
    assert feats <= wanted
    assert "fp32" in cp.cpu_modes()
    assert cp.cpu_modes(frozenset({"avx_vnni"})) == ("fp32", "int8")


@pytest.mark.auto_compute
@pytest.mark.parametrize("preset", ["nf4", "int4", "int8"])
def test_auto_on_this_machine_runs_the_mode_it_reports(preset):
    """End to end with the real policy: the layer's resolved mode is the one its kernel computes in."""
    import torch

    import qbackend
    from qbackend.kernels import family_of
    from qbackend.kernels.cpu import compute

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 96))
    qbackend.quantize_(model, {"preset": preset})
    layer = model[0]
    fam = family_of(layer.op)
    ints = dict(zip(fam.ints, layer.statics, strict=True))
    expected = next((m for m in cp.AUTO_MODES[fam.name] if cp._has(m, cp.cpu_features())
                     and compute.has_fast_kernel(m, fam.name, ints)), "fp32")  # fmt: skip
    assert layer.compute == expected
    tensors = [None if n is None else getattr(layer, n) for n in layer._arg_names]
    x = torch.randn(5, 256)
    with torch.no_grad():
        y = layer(x)
        exact = layer.op(x, *tensors, layer.bias, *layer.statics, "fp32")
        in_mode = layer.op(x, *tensors, layer.bias, *layer.statics, expected)
    assert torch.equal(y, in_mode)
    rel = float((y - exact).norm() / exact.norm())
    assert rel < (1e-6 if expected == "fp32" else 1e-2), (expected, rel)


def test_auto_runs_slow_row_counts_in_fp32_and_explicit_modes_never(monkeypatch):
    monkeypatch.setattr(compute_policy, "AUTO_FP32_ROWS", {("int8", "int8"): (3, 15)})
    assert compute_policy.fp32_rows("auto", "int8", "int8") == (3, 15)
    assert [compute_policy.call_mode("auto", "int8", "int8", m) for m in (1, 2, 3, 15, 16)] == \
        ["int8", "int8", "fp32", "fp32", "int8"]  # fmt: skip
    assert compute_policy.call_mode("int8", "int8", "int8", 8) == "int8"  # explicit: as asked
    assert compute_policy.call_mode("auto", "nf4", "int8", 8) == "int8"  # not listed
    assert compute_policy.fp32_rows("auto", "int8", "fp32") is None


@pytest.mark.auto_compute
def test_per_call_row_choice_in_the_module_and_the_compiled_graph(monkeypatch):
    """A layer under "auto" in int8 runs the listed row counts in exact fp32, eagerly and compiled."""
    from torch._inductor.utils import run_and_get_code

    import qbackend
    from qbackend.workflows.weight_only import QuantizedLinear

    if "int8" not in compute_policy.cpu_modes() or not compute_policy._fast("int8", "nf4", {
            "out_features": 64, "in_features": 256, "blocksize": 64, "nested_blocksize": 256}):  # fmt: skip
        pytest.skip("no int8 compute kernel on this CPU")
    monkeypatch.setattr(compute_policy, "AUTO_FP32_ROWS", {("nf4", "int8"): (3, 15)})
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 64))
    qbackend.quantize_(m, {"preset": "nf4", "compute": "auto", "min_params": 0})
    q = m[0]
    assert isinstance(q, QuantizedLinear) and q.compute == "int8"
    tensors = [None if n is None else getattr(q, n) for n in q._arg_names]

    def op(x, mode):
        return q.op(x, *tensors, q.bias, *q.statics, mode)

    with torch.no_grad():
        for rows, mode in ((2, "int8"), (8, "fp32"), (16, "int8")):
            x = torch.randn(rows, 256)
            assert torch.equal(m(x), op(x, mode)), rows
            assert not torch.equal(op(x, "int8"), op(x, "fp32"))  # the modes really differ
        f = torch.nn.Sequential(torch.nn.Linear(256, 64))
        f.load_state_dict({"0.weight": torch.randn(64, 256), "0.bias": torch.randn(64)})
        _, codes = run_and_get_code(torch.compile(f, backend="qbackend", dynamic=False,
                                                  options={"preset": "nf4", "min_params": 0}), torch.randn(8, 256))
        assert "'fp32')" in "\n".join(codes) and "'int8')" not in "\n".join(codes)
        torch._dynamo.reset()
        _, codes = run_and_get_code(torch.compile(f, backend="qbackend", dynamic=False,
                                                  options={"preset": "nf4", "min_params": 0}), torch.randn(16, 256))
        assert "'int8')" in "\n".join(codes)
