"""`LinearQAT`: the QAT state of one linear layer, living in the user's model.

`qbackend.qat.prepare` registers one as ``<layer>.qat`` on every selected linear module, so its
learnable ratios are ordinary parameters (``model.parameters()`` hands them to the optimizer), its
observer statistics are buffers (``state_dict`` saves and restores them), and the compiled graph
receives them as inputs on every call. The weight parameter points back to its state
(``weight._qbackend_qat``) so the compiler pass can find it from the graph.
"""

from __future__ import annotations

import torch
from torch import nn

from ...formats import Scheme
from .config import QATConfig
from .fake_quant import ACT_QMAX, fake_quantize_activation, fake_quantize_weight, observe_absmax
from .units import num_units

STATE_ATTR = "_qbackend_qat"


class LinearQAT(nn.Module):
    """Fake-quantization state of one linear layer.

    weight_ratio: learnable clipping ratio per unit (``config.learnable_scales``), else None.
    act_absmax / act_observed: moving-average input absmax and whether it was ever observed
        (``config.activations == "static"``).
    observing: 1 while the module is in training mode (set by ``train()``/``eval()``; not saved):
        the observer only updates in training mode.
    """

    def __init__(self, scheme: Scheme, config: QATConfig, weight_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.scheme = scheme
        self.config = config
        self.weight_shape = tuple(weight_shape)
        if config.learnable_scales:
            self.weight_ratio = nn.Parameter(torch.ones(num_units(self.weight_shape, scheme)))
        else:
            self.register_parameter("weight_ratio", None)
        if config.activations == "static":
            self.register_buffer("act_absmax", torch.zeros(()))
            self.register_buffer("act_observed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("observing", torch.ones((), dtype=torch.bool), persistent=False)

    @property
    def activations(self) -> str:
        return self.config.activations

    def bind(self, weight: torch.Tensor) -> None:
        """Link ``weight`` (the layer's parameter) to this state, both ways.

        The back reference is a plain attribute (not a registered parameter): it lets ``deepcopy``
        and pickling re-link the copied weight to the copied state (see ``__setstate__``).
        """
        object.__setattr__(self, "_weight", weight)
        setattr(weight, STATE_ATTR, self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        w = self.__dict__.get("_weight")
        if isinstance(w, torch.Tensor):
            setattr(w, STATE_ATTR, self)

    def train(self, mode: bool = True) -> LinearQAT:
        super().train(mode)
        # A tensor flag, read by the compiled graph at run time: switching train/eval needs no recompile.
        with torch.no_grad():
            self.observing.fill_(mode)
        return self

    def extra_repr(self) -> str:
        return f"scheme={self.scheme.name}, learnable_scales={self.config.learnable_scales}, act={self.activations}"

    # ---- eager reference (what the compiled QAT graph computes) -----------------------------------
    def fake_quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize_weight(w, self.scheme, self.weight_ratio, self.config.min_ratio)

    def fake_quant_input(self, x: torch.Tensor, update: bool = True) -> torch.Tensor:
        if self.activations == "dynamic":
            return fake_quantize_activation(x, None)
        if self.activations == "static":
            if update and torch.is_grad_enabled():
                momentum = self.config.observer_momentum
                scale = observe_absmax(x, self.act_absmax, self.act_observed, self.observing, momentum)
            else:
                scale = self.static_scale()
            return fake_quantize_activation(x, scale)
        return x

    def static_scale(self) -> torch.Tensor:
        """The deployed per-tensor input scale (static activations)."""
        return self.act_absmax / ACT_QMAX

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear`` with fake-quantized input and weight (eager reference of the QAT graph)."""
        return nn.functional.linear(self.fake_quant_input(x), self.fake_quant_weight(weight), bias)


def state_of(param: torch.Tensor) -> LinearQAT | None:
    """The QAT state attached to a weight parameter by `prepare`, if any."""
    return getattr(param, STATE_ATTR, None)
