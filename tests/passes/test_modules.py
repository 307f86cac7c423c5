"""passes.modules and passes.weight_cache.version_of: the helpers every module form shares."""

from __future__ import annotations

import torch
from torch import nn

from qbackend.passes.modules import apply_keeping_dtypes, is_conv1d, linear_modules
from qbackend.passes.weight_cache import version_of


class Conv1D(nn.Module):  # transformers' Conv1D, duck-typed by name and shape
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.zeros(nx, nf))


def test_linear_modules_finds_linears_and_conv1d_but_not_mha_out_proj():
    model = nn.ModuleDict({"fc": nn.Linear(4, 4), "c": Conv1D(6, 4), "mha": nn.MultiheadAttention(4, 2)})
    names = [name for name, *_ in linear_modules(model)]
    assert names == ["fc", "c"]
    assert is_conv1d(model["c"]) and not is_conv1d(model["fc"])


def test_apply_keeping_dtypes_keeps_named_buffers():
    m = nn.Module()
    m.register_buffer("codes", torch.zeros(3, dtype=torch.int8))
    m.register_buffer("scale", torch.ones(3))
    m.register_buffer("other", torch.ones(3))
    apply_keeping_dtypes(m, m._apply, lambda t: t.half() if t.is_floating_point() else t, True, ("codes", "scale"))
    assert (m.codes.dtype, m.scale.dtype, m.other.dtype) == (torch.int8, torch.float32, torch.float16)


def test_version_of():
    t = torch.zeros(2)
    v = version_of(t)
    t.add_(1)
    assert version_of(t) == v + 1 and version_of(None) == 0
    with torch.inference_mode():
        assert version_of(torch.zeros(2)) == -1
