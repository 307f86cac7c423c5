"""Quantization-aware training and QLoRA fine-tuning through the qbackend compiler.

QAT (train for the format you deploy)::

    opts = {"preset": "nf4", "qat": QATConfig(learnable_scales=True)}
    qbackend.qat.prepare(model, opts)          # QAT state as <layer>.qat modules (optional when stateless)
    qbackend.qat.calibrate_clipping(model, lambda: model(calib))   # optional: start from tuned clipping
    cmodel = torch.compile(model, backend="qbackend", options=opts)
    loss = f(cmodel(x)); loss.backward(); opt.step()   # grad enabled: fake-quantized linears
    with torch.no_grad(): cmodel(x)                    # inference: the real quantized ops
    qbackend.convert(model)                            # or deploy eagerly: QuantizedLinear modules

QLoRA (frozen NF4 base, trainable adapters)::

    add_lora(model, r=8, alpha=16, target_modules=["q_proj", "v_proj"])   # or a peft-wrapped model
    quantize_base(model, Scheme("nf4", nested=True))   # base weights -> QuantizedLinear, float freed

Submodules are imported lazily: :mod:`qbackend.config` imports :mod:`.config` from here.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import QATConfig, QATConfigError

_LAZY = {
    "prepare": ".api",
    "convert": ".api",
    "qat_config": ".api",
    "qat_layers": ".api",
    "eager_qat": ".api",
    "QATQuantizedLinear": ".deploy",
    "LinearQAT": ".state",
    "state_of": ".state",
    "deployed_weight": ".deploy",
    "calibrate_clipping": ".clipping",
    "fake_quantize_weight": ".fake_quant",
    "fake_quantize_activation": ".fake_quant",
    "clip_weight": ".fake_quant",
    "LoRALinear": ".lora",
    "add_lora": ".lora",
    "quantize_base": ".lora",
    "dequantize_base": ".lora",
    "lora_parameters": ".lora",
}

__all__ = ["QATConfig", "QATConfigError", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qbackend.qat' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
