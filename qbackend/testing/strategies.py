"""Hypothesis strategies: models whose linear layers use every form real model code writes.

>>> @given(case=qbackend.testing.linear_models())
... def test_pass(case):
...     graph = capture_graph(case.model, *case.inputs)

A model is a chain of layers described by a `ModelSpec` (printed by hypothesis on failure): random
widths (including ones that are not multiples of any block size), bias or not, 2-D to 4-D inputs,
tied weights (one parameter used by several layers), outlier input channels in the weights and in
the activations, and an activation function between layers.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from ..core.config import QuantConfig

#: form -> True when the parameter is stored [in, out] (the layer's weight is its transpose)
FORMS: dict[str, bool] = {
    "linear_module": False,  # nn.Linear
    "functional": False,  # F.linear(x, w, b)
    "matmul_t": False,  # x @ w.t()
    "matmul_T": False,  # x @ w.T
    "operator_matmul": False,  # operator.matmul(x, w.t())
    "torch_matmul_transpose": False,  # torch.matmul(x, w.transpose(0, 1))
    "method_matmul": False,  # x.matmul(w.t())
    "addmm": False,  # torch.addmm(b, x2d, w.t())
    "mm_permute": False,  # torch.mm(x2d, w.permute(1, 0))
    "kn_param": True,  # x @ w with w [in, out]
    "conv1d": True,  # torch.addmm(b, x2d, w) with w [in, out] (GPT-2's Conv1D)
}
_NEEDS_BIAS = {"addmm", "conv1d"}
WIDTHS = (16, 33, 48, 64, 72, 100, 130)
ACTIVATIONS = ("relu", "gelu", "none")


@dataclass(frozen=True)
class LayerSpec:
    form: str
    in_features: int
    out_features: int
    bias: bool
    tie_to: int | None = None  # index of an earlier layer whose weight parameter this layer reuses
    outlier_cols: tuple[int, ...] = ()  # weight input channels scaled up
    activation: str = "relu"


@dataclass(frozen=True)
class ModelSpec:
    layers: tuple[LayerSpec, ...]
    batch_shape: tuple[int, ...]  # the input is batch_shape + (in_features,)
    input_outliers: tuple[int, ...] = ()  # input channels scaled up
    seed: int = 0


class GeneratedModel(nn.Module):
    """The model a `ModelSpec` describes (deterministic weights from ``spec.seed``)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        self._weights: list[str] = []
        for i, ls in enumerate(spec.layers):
            if ls.tie_to is not None:
                w = self.get_parameter(self._weights[ls.tie_to])
            else:
                w = torch.randn(ls.out_features, ls.in_features, generator=g) / ls.in_features**0.5
                for c in ls.outlier_cols:
                    w[:, c] *= 8.0 + 4.0 * (c % 5)
                w = nn.Parameter(w.t().contiguous() if FORMS[ls.form] else w)
            b = nn.Parameter(0.1 * torch.randn(ls.out_features, generator=g)) if ls.bias else None
            if ls.form == "linear_module":
                lin = nn.Linear(ls.in_features, ls.out_features, bias=ls.bias)
                lin.weight = w
                if b is not None:
                    lin.bias = b
                self.add_module(f"l{i}", lin)
                self._weights.append(f"l{i}.weight")
            else:
                self.register_parameter(f"w{i}", w)
                self.register_parameter(f"b{i}", b)
                self._weights.append(f"w{i}")

    def make_input(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.spec.seed + 1)
        x = torch.randn(*self.spec.batch_shape, self.spec.layers[0].in_features, generator=g)
        for c in self.spec.input_outliers:
            x[..., c] *= 20.0
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, ls in enumerate(self.spec.layers):
            x = self._layer(i, ls, x)
            if ls.activation == "relu":
                x = torch.relu(x)
            elif ls.activation == "gelu":
                x = F.gelu(x)
        return x

    def _layer(self, i: int, ls: LayerSpec, x: torch.Tensor) -> torch.Tensor:
        f = ls.form
        if f == "linear_module":
            return getattr(self, f"l{i}")(x)
        w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}")
        if f == "functional":
            return F.linear(x, w, b)
        lead = x.shape[:-1]
        if f in ("addmm", "mm_permute", "conv1d"):
            x2 = x.reshape(-1, x.shape[-1])
            if f == "addmm":
                y = torch.addmm(b, x2, w.t())
            elif f == "conv1d":
                y = torch.addmm(b, x2, w)
            else:
                y = torch.mm(x2, w.permute(1, 0))
                y = y + b if b is not None else y
            return y.reshape(*lead, ls.out_features)
        if f == "matmul_t":
            y = x @ w.t()
        elif f == "matmul_T":
            y = x @ w.T
        elif f == "operator_matmul":
            y = operator.matmul(x, w.t())
        elif f == "torch_matmul_transpose":
            y = torch.matmul(x, w.transpose(0, 1))
        elif f == "method_matmul":
            y = x.matmul(w.t())
        else:  # kn_param
            y = x @ w
        return y + b if b is not None else y


class ModelCase:
    """A generated model and its example input (``inputs`` is the argument tuple)."""

    def __init__(self, model: GeneratedModel, inputs: tuple[torch.Tensor, ...]) -> None:
        self.model, self.inputs = model, inputs

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    def __repr__(self) -> str:
        return f"ModelCase({self.spec!r})"


@st.composite
def model_specs(
    draw: st.DrawFn,
    max_layers: int = 4,
    forms: tuple[str, ...] = tuple(FORMS),
    max_batch_dims: int = 3,
    outliers: bool = True,
) -> ModelSpec:
    """A `ModelSpec`: 1..max_layers layers in the given forms, ties where shapes allow.

    ``outliers``: some weight input channels and input channels are scaled up (up to 28x / 20x).
    """
    n_outliers = 2 if outliers else 0
    n = draw(st.integers(1, max_layers))
    width = draw(st.sampled_from(WIDTHS))
    layers: list[LayerSpec] = []
    for _ in range(n):
        tie = None
        candidates = [j for j, ls in enumerate(layers) if ls.in_features == width and ls.tie_to is None]
        if candidates and draw(st.booleans()):
            tie = draw(st.sampled_from(candidates))
        if tie is not None:
            target = layers[tie]
            same_layout = [f for f in forms if FORMS[f] == FORMS[target.form]]
            form, out = draw(st.sampled_from(same_layout)), target.out_features
            cols: tuple[int, ...] = ()
        else:
            form = draw(st.sampled_from(forms))
            out = draw(st.sampled_from(WIDTHS))
            cols = tuple(draw(st.lists(st.integers(0, width - 1), max_size=n_outliers, unique=True)))
        bias = True if form in _NEEDS_BIAS else draw(st.booleans())
        act = draw(st.sampled_from(ACTIVATIONS))
        layers.append(LayerSpec(form, width, out, bias, tie, cols, act))
        width = out
    batch = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=max_batch_dims)))
    in0 = layers[0].in_features
    x_outliers = tuple(draw(st.lists(st.integers(0, in0 - 1), max_size=n_outliers, unique=True)))
    return ModelSpec(tuple(layers), batch, x_outliers, draw(st.integers(0, 2**16)))


@st.composite
def linear_models(draw: st.DrawFn, **spec_kwargs) -> ModelCase:
    """A `ModelCase` (model + input) from :func:`model_specs` (same keyword arguments)."""
    model = GeneratedModel(draw(model_specs(**spec_kwargs))).eval()
    return ModelCase(model, (model.make_input(),))


def quant_configs(min_params: int = 0) -> st.SearchStrategy[QuantConfig]:
    """Configs over every format, with block/group sizes that do and do not divide the widths."""
    nf = st.builds(
        QuantConfig,
        format=st.sampled_from(["nf4", "fp4"]),
        blocksize=st.sampled_from([32, 64, 128]),
        nested=st.booleans(),
        min_params=st.just(min_params),
    )
    int4 = st.builds(
        QuantConfig,
        format=st.just("int4"),
        blocksize=st.sampled_from([16, 32, 64, 128]),
        symmetric=st.booleans(),
        min_params=st.just(min_params),
    )
    int8 = st.builds(QuantConfig, format=st.just("int8"), min_params=st.just(min_params))
    return st.one_of(nf, int4, int8)
