"""SmoothQuant W8A8: calibration, per-channel smoothing scales folded offline, int8 x int8 lowering.

>>> result = qbackend.calibrate(model, batches)                 # per-channel activation absmax
>>> result.save("minilm-calib")                                 # .safetensors + .json
>>> model = torch.compile(model, backend="qbackend",
...                       options={"preset": "w8a8", "calibration": result,
...                                "smoothquant": {"alpha": 0.5, "search_alpha": True}})

Compile path: :func:`.pipeline.run_w8a8` (find -> select -> :mod:`.fold` -> :mod:`.lower`), guarded
by :meth:`.pipeline.W8A8Result.guard_folded`; module path: :func:`.module_form.quantize_w8a8_`
(`W8A8Linear`); save/load: :mod:`.records` (records of kind ``w8a8``). The fold report of each
compiled graph is in ``report.sections["smoothquant"]`` (e.g. of ``qbackend.explain``).
"""

from typing import Any

from ...passes.calibration import calibrate
from ...passes.calibration_result import CalibrationError, CalibrationResult, LayerStats
from .config import SmoothQuantConfig, SmoothQuantConfigError, backend_options
from .fold import FoldReport
from .linear import W8A8Linear
from .module_form import quantize_w8a8_
from .pipeline import W8A8Result, run_w8a8
from .records import RECORD_KINDS, build_w8a8_linear, record_w8a8_linear


def _normalize(config: Any) -> dict[str, Any]:
    """The W8A8 fields of a ``QuantConfig``, validated (raises `SmoothQuantConfigError`)."""
    if config.smoothquant in (None, False) and getattr(config, "method", None) not in (None, False):
        return {}  # the calibration of a weight-only method (GPTQ): the weight-only workflow checks it
    compute = getattr(config, "compute", "auto")
    if compute != "auto":
        raise SmoothQuantConfigError(
            f"compute={compute!r:.20} does not apply to W8A8: its activations are int8 by definition "
            "(compute chooses the arithmetic of weight-only formats); leave compute='auto'"
        )
    sq, cal = backend_options(config.smoothquant, config.calibration, config.format)
    return {"smoothquant": sq, "calibration": cal}


#: this workflow's handlers, as the fields of ``qbackend.core.registry.Workflow``
WORKFLOW = {
    "name": "w8a8",
    "compile": run_w8a8,
    "quantize": quantize_w8a8_,
    "normalize": _normalize,
    "guard": W8A8Result.guard_folded,
    "modules": (W8A8Linear,),
    "record": record_w8a8_linear,
    "build": build_w8a8_linear,
    "record_kinds": RECORD_KINDS,
}

__all__ = [
    "WORKFLOW",
    "CalibrationError",
    "CalibrationResult",
    "FoldReport",
    "LayerStats",
    "SmoothQuantConfig",
    "SmoothQuantConfigError",
    "W8A8Linear",
    "calibrate",
    "quantize_w8a8_",
    "run_w8a8",
]
