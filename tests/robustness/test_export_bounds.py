"""The torch-mlir export runs bounded (memory, time), refuses data-dependent shapes up front, and
``MLIRModule.execute`` checks its inputs against the exported signature."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qbackend
from qbackend.export import MLIRExportError, MLIRModule
from qbackend.export.mlir import InputSpec, input_specs

pytest.importorskip("torch_mlir")


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y[y > 0]  # a boolean mask: the output's shape depends on the values


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32)).eval()


X = torch.randn(4, 64)


def test_a_data_dependent_shape_is_refused_before_torch_mlir():
    fragment = (r"the model \(line `return y\[y > 0\]`\) computes a tensor whose shape depends on its values "
                r"\(aten.index.Tensor\); torch-mlir cannot lower")
    with pytest.raises(MLIRExportError, match=fragment):
        qbackend.export_mlir(Masked().eval(), X, min_params=0)


def test_the_memory_limit_stops_the_worker_with_a_clear_error():
    with pytest.raises(MLIRExportError, match=r"ran out of its memory limit \(0.5 GiB of address space; memory_limit=\)"
                                              r" and was stopped. The graph's ops: aten\."):  # fmt: skip
        qbackend.export_mlir(_small(), X, min_params=0, memory_limit=512 << 20)
    assert torch.ones(2).sum() == 2  # the caller is unaffected


def test_the_time_limit_stops_the_worker_with_a_clear_error():
    with pytest.raises(MLIRExportError, match=r"took longer than the time limit \(0.5 s; timeout=\) and was stopped"):
        qbackend.export_mlir(_small(), X, min_params=0, timeout=0.5)


@pytest.mark.parametrize(
    ("limits", "message"),
    [({"timeout": 0}, "timeout must be a number of seconds > 0"), ({"memory_limit": True}, "memory_limit must be"),
     ({"memory_limit": 1000}, "memory_limit must be a number of bytes >= 256 MiB")],  # fmt: skip
)
def test_bad_limits(limits, message):
    with pytest.raises(ValueError, match=message):
        qbackend.export_mlir(_small(), X, min_params=0, **limits)


def test_the_exported_signature_is_recorded():
    program = torch.export.export(_small(), (X,))
    assert input_specs(program) == (InputSpec((4, 64), torch.float32),)


# The checks run before any worker: a module with a known signature is enough.
EXPORTED = MLIRModule("module {}", "linalg-on-tensors", inputs=(InputSpec((4, 64), torch.float32),))


@pytest.mark.parametrize(
    ("inputs", "exc", "message"),
    [
        ((X, X), ValueError, r"the module takes 1 input\(s\); got 2"),
        ((), ValueError, r"the module takes 1 input\(s\); got 0"),
        ((torch.randn(5, 64),), ValueError, r"input 0 is float32\[5, 64\]; the module was exported for float32\[4, "),
        ((torch.randn(4, 64, 1),), ValueError, r"input 0 is float32\[4, 64, 1\]"),
        ((X.double(),), TypeError, r"input 0 is float64\[4, 64\]; the module was exported for float32\[4, 64\]"),
        ((3,), TypeError, "execute.. takes tensors; input 0 is a int"),
    ],
    ids=["two", "none", "rows", "rank", "dtype", "not-a-tensor"],
)
def test_execute_checks_its_inputs(inputs, exc, message):
    with pytest.raises(exc, match=message):
        EXPORTED.execute(*inputs)


def test_a_dynamic_dimension_accepts_any_size():
    spec = InputSpec((None, 64), torch.float32)
    assert spec.accepts(torch.randn(7, 64)) and not spec.accepts(torch.randn(7, 63)) and str(spec) == "float32[?, 64]"
