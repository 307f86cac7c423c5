"""``qbackend.refresh(model)``: bring every quantized form of a model's weights up to date now.

The per-call check (``weight_check``) finds most changes by itself; this is the explicit form for
writes it cannot see (a few elements written through ``.data`` or a numpy view, away from the
sampled bytes), e.g. after a custom weight-loading routine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..passes import weight_stamp


def refresh(model: Any) -> int:
    """Re-quantize, from their current values, every compiled quantized weight derived from the
    parameters and buffers of ``model`` (a module or a ``torch.compile``d one). Constants that cannot
    be refreshed from one parameter (SmoothQuant folds, Inductor freezing) are marked stale instead:
    the next call raises `StaleWeightError` (recompile). Returns the number of quantized forms visited."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    if not isinstance(model, nn.Module):
        raise TypeError(f"qbackend.refresh takes an nn.Module or a torch.compile'd module; got {type(model).__name__}")
    return weight_stamp.refresh([*model.parameters(), *model.buffers()])
