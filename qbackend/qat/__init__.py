"""Quantization-aware training and QLoRA fine-tuning through the qbackend compiler (public names).

QAT (train for the format you deploy)::

    opts = {"preset": "nf4", "qat": QATConfig(learnable_scales=True)}
    qbackend.qat.prepare(model, opts)          # QAT state as <layer>.qat modules (optional when stateless)
    qbackend.qat.calibrate_clipping(model, lambda: model(calib))   # optional: start from tuned clipping
    qbackend.qat.start_from_quantized(model, gptq_model)   # or: start from GPTQ's codes (a quantize_d copy)
    cmodel = torch.compile(model, backend="qbackend", options=opts)
    loss = f(cmodel(x)); loss.backward(); opt.step()   # grad enabled: fake-quantized linears
    with torch.no_grad(): cmodel(x)                    # inference: the real quantized ops
    qbackend.convert(model)                            # or deploy eagerly: QuantizedLinear modules

QLoRA (frozen NF4 base, trainable adapters)::

    add_lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"])   # or a peft-wrapped model
    quantize_base(model, Scheme("nf4", nested=True))   # base weights -> QuantizedLinear, float freed

The workflow itself is :mod:`qbackend.workflows.qat`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.config import QuantConfig
from ..workflows.qat.api import convert, eager_qat, qat_layers
from ..workflows.qat.api import prepare as _prepare
from ..workflows.qat.clipping import calibrate_clipping
from ..workflows.qat.config import QATConfig, QATConfigError
from ..workflows.qat.deploy import QATQuantizedLinear, deployed_weight
from ..workflows.qat.fake_quant import clip_weight, fake_quantize_activation, fake_quantize_weight
from ..workflows.qat.lora import LoRALinear, add_lora, dequantize_base, lora_parameters, quantize_base
from ..workflows.qat.start import start_from_quantized
from ..workflows.qat.state import LinearQAT, state_of

__all__ = [
    "LinearQAT",
    "LoRALinear",
    "QATConfig",
    "QATConfigError",
    "QATQuantizedLinear",
    "add_lora",
    "calibrate_clipping",
    "clip_weight",
    "convert",
    "deployed_weight",
    "dequantize_base",
    "eager_qat",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "lora_parameters",
    "prepare",
    "qat_config",
    "qat_layers",
    "quantize_base",
    "start_from_quantized",
    "state_of",
]


def qat_config(options: Any = None) -> QuantConfig:
    """The backend config for QAT: ``options`` as for ``torch.compile`` (or a bare `QATConfig`), QAT on."""
    if isinstance(options, QATConfig):
        return QuantConfig(qat=options)
    cfg = QuantConfig.from_options(options)
    return cfg if cfg.qat is not None else cfg.replace(qat=QATConfig())


def prepare(model: nn.Module, options: Any = None) -> list[str]:
    """Attach QAT state (`LinearQAT`, as ``<layer>.qat``) to the linear layers the backend would quantize.

    ``options``: the same options given to ``torch.compile(..., backend="qbackend", options=...)``
    (format, include/exclude, min_params, ``qat=QATConfig(...)``), or a `QATConfig`. In place and
    idempotent (a prepared layer is left as it is); tied weights share one state. Create the
    optimizer after preparing (learnable ratios are new parameters). Returns the prepared layer names.
    """
    return _prepare(model, qat_config(options))
