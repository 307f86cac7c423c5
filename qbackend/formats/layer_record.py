"""`LayerRecord`: one quantized layer described at the format level, independent of kernels and modules.

The unit that checkpoints store and that workflows describe their layer modules by (a workflow
turns its module into a record and a record back into its module; :mod:`qbackend.serialization`
writes records without knowing any module). It lives with the formats because it is a format-level
description (a `QuantizedWeight` plus a layer's settings) that both the workflows and the core use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .qweight import QuantizedWeight
from .scheme import Scheme


class RecordError(ValueError):
    """A record its workflow cannot build a layer from; the message names the layer and is shown as is."""


@dataclass
class LayerRecord:
    """One quantized layer: a record names no kernel op, no op argument and no module class.

    kind: what the layer computes, which selects the workflow that builds it (``weight_only``,
        ``w8a8``, or a registered workflow's own kind).
    weight: the weight as a `QuantizedWeight` (the versioned `Scheme`, shape and named tensors).
    scheme: the layer's scheme when it differs from ``weight.scheme`` (nested int4 group constants are
        held decoded by the kernels, so stored plain), else None.
    options: the kind's settings (JSON values); tensors: the kind's further tensors.
    label: a display name of the format.
    """

    kind: str
    weight: QuantizedWeight
    bias: torch.Tensor | None = None
    scheme: Scheme | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    label: str = ""

    @property
    def layer_scheme(self) -> Scheme:
        return self.scheme or self.weight.scheme
