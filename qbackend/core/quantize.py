"""``qbackend.quantize_``: swap a model's linear modules for their quantized module form, in place.

Compiling with ``backend="qbackend"`` quantizes at compile time but leaves the user's module (and
its float weights) untouched. To free the float weights for good:

>>> report = qbackend.quantize_(model, "nf4")      # in place; nn.Linear -> QuantizedLinear
>>> model = torch.compile(model, backend="qbackend")  # the quantized ops are already in the graph

The workflow handling the config (:mod:`qbackend.core.registry`) does the swap.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..passes.report import Report
from . import registry
from .backend import resolve_config


def quantize_(model: nn.Module, config: Any = None, *, example_inputs: Any = None) -> Report:
    """Replace eligible linear modules of ``model`` (in place) by quantized modules; returns the report.

    ``config``: a ``QuantConfig``, a preset name, a dict of options (as ``torch.compile``'s
    ``options=``) or a registered workflow's config object.

    Weight-only presets: `QuantizedLinear`. W8A8 (preset "w8a8", ``smoothquant`` set): `W8A8Linear`,
    computing what the compiled model computes (SmoothQuant folds included); with smoothing the model
    is traced once on ``example_inputs`` (a tensor, a tuple of arguments or a dict of keyword
    arguments; default: the calibration's first batch). Other presets do not use ``example_inputs``.

    Eligible: ``nn.Linear`` (and subclasses that keep its forward; not the ``out_proj`` of
    ``nn.MultiheadAttention``, which reads the weight directly) and transformers' ``Conv1D``
    (GPT-2; weight stored [in, out]). ``config``'s include/exclude/min_params apply, by module name.
    Modules sharing one weight (tied) share one set of quantized tensors. The float weight is freed
    unless something else still holds it (e.g. an embedding tied to the output layer).

    Memory-mapped checkpoints (HF safetensors loads by default): the file stays mapped while any of
    its tensors lives, so RSS only drops for weights loaded into memory (``disable_mmap=True``);
    the mapped pages of dropped weights are clean and reclaimable, but still counted.
    """
    config = resolve_config(config)
    workflow = registry.workflow_for(config)
    if workflow.quantize is None:
        raise registry.WorkflowError(
            f"workflow {workflow.name!r} has no module form: compile the model with torch.compile(backend='qbackend')"
        )
    report = workflow.quantize(model, config, example_inputs)
    _warn_unmatched(config, report)
    return report


def _warn_unmatched(config: Any, report: Report) -> None:
    """An ``include`` pattern matching no linear layer is almost always a typo: say so."""
    unmatched = getattr(config, "unmatched_includes", None)
    names = [r.name for r in report.layers]
    missed = unmatched(names) if unmatched is not None else []
    if missed:
        examples = ", ".join(repr(n) for n in names[:3]) or "none"
        warnings.warn(
            f"qbackend: include pattern(s) {', '.join(map(repr, missed))} matched no linear layer "
            f"(layers are named like {examples}); nothing was quantized for them",
            UserWarning, stacklevel=3,
        )  # fmt: skip
