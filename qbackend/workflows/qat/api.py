"""``prepare`` (attach QAT state to a model) and ``convert`` (deploy it on the quantized ops).

``prepare`` takes a validated ``QuantConfig`` with ``qat`` set (``qbackend.qat.prepare`` builds it
from the user's options):

>>> opts = {"preset": "nf4", "qat": QATConfig(learnable_scales=True)}
>>> qbackend.qat.prepare(model, opts)                    # adds <layer>.qat modules, in place
>>> cmodel = torch.compile(model, backend="qbackend", options=opts)
>>> ...train cmodel with any optimizer over model.parameters()...
>>> with torch.no_grad(): cmodel(x)                      # inference: the real quantized ops
>>> qbackend.convert(model)                              # or: swap to QuantizedLinear, float weights freed
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from ...kernels import prepare_weight
from ...passes.select_layers import decide_layer
from ..weight_only.linear import QuantizedLinear
from .deploy import QATQuantizedLinear, deployed_weight
from .state import LinearQAT, state_of

STATE_NAME = "qat"


def prepare(model: nn.Module, cfg: Any) -> list[str]:
    """Attach QAT state (`LinearQAT`, as ``<layer>.qat``) to the linear layers the backend would quantize.

    ``cfg``: a ``QuantConfig`` with ``qat`` set (format, include/exclude, min_params, the `QATConfig`).
    In place and idempotent (a prepared layer is left as it is); tied weights share one state. Create
    the optimizer after preparing (learnable ratios are new parameters). Returns the prepared layer names.
    """
    prepared = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
            continue
        w = mod.weight
        if state_of(w) is not None:
            continue
        scheme, _why = decide_layer(name, w.numel(), cfg)
        if scheme is None:
            continue
        state = LinearQAT(scheme, cfg.qat, tuple(w.shape)).to(w.device)
        state.train(mod.training)
        mod.register_module(STATE_NAME, state)
        state.bind(w)
        prepared.append(name)
    return prepared


def qat_layers(model: nn.Module) -> dict[str, LinearQAT]:
    """Module name -> QAT state of every prepared layer of ``model``."""
    return {name: m.qat for name, m in model.named_modules() if isinstance(getattr(m, STATE_NAME, None), LinearQAT)}


@contextlib.contextmanager
def eager_qat(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the prepared layers of ``model`` run their QAT forward eagerly (no compiler).

    The reference the compiled training graph is checked against, and a way to debug QAT without
    ``torch.compile``. Only prepared ``nn.Linear`` modules are affected (stateless QAT from options
    lives in the compiler pass only).
    """
    patched = []
    for mod in model.modules():
        state = state_of(mod.weight) if isinstance(mod, nn.Linear) else None
        if state is not None:  # the weight's state: a layer tied to a prepared one is fake-quantized too
            mod.forward = _qat_forward(mod, state)  # an instance attribute shadows the class's forward
            patched.append(mod)
    try:
        yield model
    finally:
        for mod in patched:
            del mod.forward


def _qat_forward(mod: nn.Linear, state: LinearQAT):
    def forward(x):
        return state(x, mod.weight, mod.bias)

    return forward


def convert(model: nn.Module, compute: str = "auto") -> nn.Module:
    """Deploy every prepared layer of ``model`` in place: ``nn.Linear`` + ``.qat`` -> `QuantizedLinear`.

    The deployed weight is exactly what the QAT forward fake-quantized (``deployed_weight``); the
    float weight and the QAT state are dropped. Layers tied to one weight share one quantized
    weight. ``compute``: the deployed layers' arithmetic option (as ``QuantConfig.compute``; training
    itself always computes in fp32). Returns ``model`` (the new module if ``model`` itself is a
    prepared ``nn.Linear``).
    """
    shared: dict[int, Any] = {}
    for name, mod in list(model.named_modules()):
        state = state_of(mod.weight) if isinstance(mod, nn.Linear) else None
        if state is None:
            continue
        kw = shared.get(id(mod.weight))
        if kw is None:
            kw = shared[id(mod.weight)] = prepare_weight(deployed_weight(mod.weight, state.scheme, state, name=name))
        bias = None if mod.bias is None else mod.bias.detach()
        if state.activations == "none":
            new: nn.Module = QuantizedLinear(kw, bias, state.scheme, compute)
        else:
            scale = state.static_scale() if state.activations == "static" else None
            new = QATQuantizedLinear(kw, bias, state.scheme, state.activations, scale, compute)
        if not name:
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
