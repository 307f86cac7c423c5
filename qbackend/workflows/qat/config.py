"""`QATConfig`: the quantization-aware-training options (what to fake-quantize and how to learn).

The storage format itself (NF4/FP4/int4/int8, block size, nested constants, which layers) is the
backend's ``QuantConfig``: QAT trains for exactly the format that will be deployed.

>>> opts = {"preset": "nf4", "qat": QATConfig(learnable_scales=True)}
>>> qbackend.qat.prepare(model, opts)
>>> cmodel = torch.compile(model, backend="qbackend", options=opts)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from ...formats import short_repr

Activations = Literal["none", "dynamic", "static"]
ACTIVATIONS: tuple[str, ...] = ("none", "dynamic", "static")


class QATConfigError(ValueError):
    """A bad QAT option; the message lists what is valid."""


@dataclass(frozen=True)
class QATConfig:
    """Quantization-aware training options.

    learnable_scales: learn one clipping ratio per block/group/channel (LSQ-style gradient, an
        ``nn.Parameter`` in the model, initialised to 1.0 = absmax scaling). The effective block
        range is ``ratio * absmax`` (ratio capped to [min_ratio, 1]; above 1 it acts as 1), so the
        deployed weight is the clipped weight quantized with the ordinary format: prepare and
        convert agree bit for bit.
    activations: also fake-quantize the inputs of quantized linears to int8: "none" (default),
        "dynamic" (symmetric, one scale per token, as ``w8a8_linear`` does) or "static" (symmetric,
        one per-tensor scale from a moving-average absmax observer kept in module buffers).
    observer_momentum: weight of the newest batch in the observer's moving average.
    min_ratio: lower bound of a learnable ratio (keeps scales positive).
    """

    learnable_scales: bool = False
    activations: Activations = "none"
    observer_momentum: float = 0.1
    min_ratio: float = 0.05

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise QATConfigError(
                f"activations must be one of {', '.join(ACTIVATIONS)}; got {short_repr(self.activations)}"
            )
        if not 0.0 < self.observer_momentum <= 1.0:
            raise QATConfigError(f"observer_momentum must be in (0, 1]; got {short_repr(self.observer_momentum)}")
        if not 0.0 < self.min_ratio <= 1.0:
            raise QATConfigError(f"min_ratio must be in (0, 1]; got {short_repr(self.min_ratio)}")

    @property
    def stateful(self) -> bool:
        """Whether layers need state in the model (learnable ratios or an observer): then `prepare` first."""
        return self.learnable_scales or self.activations == "static"

    @classmethod
    def from_value(cls, value: Any) -> QATConfig | None:
        """None/False -> off; True -> defaults; a QATConfig; or a dict of field names."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, QATConfig):
            return value
        if isinstance(value, Mapping):
            valid = [f.name for f in fields(cls)]
            unknown = [k for k in value if k not in valid]
            if unknown:
                names = ", ".join(map(repr, unknown))
                raise QATConfigError(f"unknown QAT option(s) {names}; valid: {', '.join(valid)}")
            return cls(**value)
        raise QATConfigError(f"qat must be None, a bool, a QATConfig or a dict; got {type(value).__name__}")
