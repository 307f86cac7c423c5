"""`SmoothQuantConfig`: how the W8A8 preset smooths and lowers linear layers (frozen, hashable)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ...formats import short_repr
from ...passes.calibration_result import CalibrationResult

ACTIVATIONS = ("token", "tensor")
UNFOLDABLE = ("multiply", "skip")
EXPLICIT = ("per_layer", "shared")


class SmoothQuantConfigError(ValueError):
    """A bad SmoothQuant option; the message lists what is valid."""


@dataclass(frozen=True)
class SmoothQuantConfig:
    """Options of the "w8a8" preset.

    smooth: apply SmoothQuant scales (needs a calibration result); False gives naive W8A8.
    alpha: migration strength for every layer, s_j = max|X_j|^alpha / max|W_j|^(1-alpha).
    layer_alpha: ``(pattern, alpha)`` pairs overriding ``alpha`` for layers whose name equals the
        pattern, ends with ``.pattern`` or fully matches it as a regex (first match wins).
    search_alpha: pick alpha per smoothing group on the calibration samples (minimising the group's
        W8A8 output error over ``alpha_grid``); needs a result calibrated with ``sample_tokens > 0``.
    alpha_grid: the candidates of the search.
    activation: "token" (dynamic per-token int8, default) or "tensor" (static per-tensor scale from
        calibration; layers without calibration fall back to "token", reported).
    outlier_threshold: LLM.int8()-style decomposition: activation columns with any |x| >= threshold
        stay float against their (dequantized) weight columns; None switches it off.
    unfoldable: where no exact fold exists (residual add or a non-linear op before the linear):
        "multiply" inserts an explicit ``x * (1/s)``; "skip" leaves the layer unsmoothed.
    explicit: with explicit multiplies, "per_layer" gives each linear its own s (q, k and v each;
        more accurate, one multiply per linear, fused by Inductor into the producer's kernel) or
        "shared" one s per group (one multiply).
    """

    smooth: bool = True
    alpha: float = 0.5
    layer_alpha: tuple[tuple[str, float], ...] = ()
    search_alpha: bool = False
    alpha_grid: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
    activation: Literal["token", "tensor"] = "token"
    outlier_threshold: float | None = None
    unfoldable: Literal["multiply", "skip"] = "multiply"
    explicit: Literal["per_layer", "shared"] = "per_layer"

    def __post_init__(self) -> None:
        _check_alpha("alpha", self.alpha)
        pairs = self.layer_alpha.items() if isinstance(self.layer_alpha, Mapping) else self.layer_alpha
        norm: list[tuple[str, float]] = []
        for item in pairs:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise SmoothQuantConfigError(
                    f"layer_alpha entries must be (pattern, alpha) pairs; got {short_repr(item)}"
                )
            try:
                re.compile(item[0])
            except re.error as e:
                raise SmoothQuantConfigError(f"layer_alpha pattern {item[0]!r} is not a valid regex: {e}") from None
            _check_alpha(f"layer_alpha[{item[0]!r}]", item[1])
            norm.append((item[0], float(item[1])))
        object.__setattr__(self, "layer_alpha", tuple(norm))
        grid = tuple(float(a) for a in self.alpha_grid)
        if not grid:
            raise SmoothQuantConfigError("alpha_grid must not be empty")
        for a in grid:
            _check_alpha("alpha_grid entry", a)
        object.__setattr__(self, "alpha_grid", grid)
        if self.activation not in ACTIVATIONS:
            raise SmoothQuantConfigError(
                f"activation must be one of {', '.join(ACTIVATIONS)}; got {short_repr(self.activation)}"
            )
        if self.outlier_threshold is not None and not (
            isinstance(self.outlier_threshold, (int, float)) and self.outlier_threshold > 0
        ):
            raise SmoothQuantConfigError(
                f"outlier_threshold must be a number > 0 or None; got {short_repr(self.outlier_threshold)}"
            )
        if self.explicit not in EXPLICIT:
            raise SmoothQuantConfigError(
                f"explicit must be one of {', '.join(EXPLICIT)}; got {short_repr(self.explicit)}"
            )
        if self.unfoldable not in UNFOLDABLE:
            raise SmoothQuantConfigError(
                f"unfoldable must be one of {', '.join(UNFOLDABLE)}; got {short_repr(self.unfoldable)}"
            )

    @classmethod
    def from_options(cls, options: SmoothQuantConfig | Mapping[str, Any] | None) -> SmoothQuantConfig:
        """Accept None, a config, or a dict of field names (unknown keys raise, listing the valid ones)."""
        if options is None:
            return cls()
        if isinstance(options, SmoothQuantConfig):
            return options
        if not isinstance(options, Mapping):
            raise SmoothQuantConfigError(
                f"smoothquant options must be a dict or SmoothQuantConfig; got {type(options).__name__}"
            )
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in valid]
        if unknown:
            raise SmoothQuantConfigError(f"unknown smoothquant option(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**dict(options))

    def alpha_for(self, layer: str) -> float:
        """The fixed alpha of ``layer`` (``layer_alpha`` first match, else ``alpha``)."""
        for pattern, a in self.layer_alpha:
            if layer == pattern or layer.endswith("." + pattern) or re.fullmatch(pattern, layer):
                return a
        return self.alpha

    def fingerprint(self) -> str:
        """Stable text of every field (cache keys, logs)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _check_alpha(name: str, a: object) -> None:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
        raise SmoothQuantConfigError(f"{name} must be a number in [0, 1]; got {short_repr(a)}")


def backend_options(smoothquant: Any, calibration: Any, weight_format: str) -> tuple[SmoothQuantConfig | None, Any]:
    """Validate the W8A8 fields of ``QuantConfig``: ``(SmoothQuantConfig or None, CalibrationResult or None)``.

    smoothquant: None (off), True (defaults), a dict of fields or a config. calibration: a
    ``CalibrationResult`` or the path it was saved to.
    """
    if smoothquant is None or smoothquant is False:
        if calibration is not None:
            raise SmoothQuantConfigError(
                "'calibration' is used by the W8A8 preset (add preset='w8a8', or smoothquant=True / {...}) and by the "
                "calibrated weight-only method (add method='gptq')"
            )
        return None, None
    sq = SmoothQuantConfig() if smoothquant is True else SmoothQuantConfig.from_options(smoothquant)
    if weight_format != "int8":
        raise SmoothQuantConfigError(f"W8A8 uses int8 weights; format must be 'int8', got {short_repr(weight_format)} "
                                     "(use preset='w8a8')")  # fmt: skip
    if calibration is not None and not isinstance(calibration, CalibrationResult):
        if isinstance(calibration, (str, bytes)) or hasattr(calibration, "__fspath__"):
            calibration = CalibrationResult.load(calibration)  # type: ignore[arg-type]
        else:
            raise SmoothQuantConfigError(
                f"calibration must be a CalibrationResult (qbackend.calibrate(...)) or the path it was saved to; "
                f"got {type(calibration).__name__}"
            )
    return sq, calibration
