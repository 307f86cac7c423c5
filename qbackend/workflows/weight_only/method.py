"""How weight-only layers are rounded: ``method`` "rtn" (round to nearest), "gptq", "awq" or "hqq".

>>> cal = qbackend.calibrate(model, batches, hessian=True)         # mean X^T X per layer input
>>> torch.compile(model, backend="qbackend", options={"preset": "nf4", "method": "gptq", "calibration": cal})
>>> qbackend.quantize_(model, {"preset": "int4", "method": {"name": "gptq", "act_order": True}, "calibration": cal})
>>> qbackend.quantize_(model, {"preset": "int4", "method": "awq", "calibration": cal})
>>> qbackend.quantize_(model, {"preset": "nf4", "method": "hqq"})                 # no data

HQQ (:mod:`qbackend.formats.hqq`) needs no calibration: it refines each unit's constants under an
lp-norm of the weight error (nf4, fp4, int4). On the real MiniLM it is no real gain over round to
nearest (mean embedding cosine nf4 0.9737 -> 0.9745, fp4 0.9530 -> 0.9569, int4 0.9609 -> 0.9608;
RESULTS.md): an option for calibration-free use, not a substitute for GPTQ or AWQ.

GPTQ and AWQ store their weights in the same formats as round to nearest (:mod:`qbackend.formats.gptq`,
:mod:`qbackend.formats.awq`): kernels, save/load and the bitsandbytes export are unchanged, and a
loaded model never re-runs them. AWQ's per-input-channel ``1 / s`` is folded into the op producing
the layer's input where that is exact (one s per group of layers sharing the input; :mod:`.awq_fold`),
else an explicit multiply of the layer's input (``QuantizedLinear.input_scale``; a ``mul`` before the
op in a compiled graph), saved with the layer; a layer whose search keeps s = 1 has none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ...formats import QuantizedWeight, Scheme, quantize
from ...formats.awq import awq_quantize
from ...formats.gptq import CalibrationDataError, gptq_quantize, output_error
from ...formats.hqq import hqq_quantize
from ...formats.scheme import FormatError
from ...passes.calibration_result import CalibrationResult, LayerStats
from ...passes.weight_cache import StaleWeightError

log = logging.getLogger("qbackend")

METHODS: tuple[str, ...] = ("rtn", "gptq", "awq", "hqq")
CALIBRATED: tuple[str, ...] = ("gptq", "awq")


class MethodConfigError(ValueError):
    """A bad ``method`` option; the message lists what is valid."""


@dataclass(frozen=True)
class MethodConfig:
    """The ``method`` option of weight-only presets.

    name: "rtn" (round to nearest, no data), "gptq" or "awq" (both need ``calibration``, calibrated
        with ``hessian=True``), "hqq" (no data; nf4, fp4 and int4 only).
    damp: GPTQ dampening, as a fraction of the mean diagonal of X^T X.
    block: GPTQ lazy-batch width (columns rounded before one matrix update of the rest).
    act_order: GPTQ rounds columns in order of decreasing activation energy (static groups).
    groups: GPTQ group constants "auto" (computed when a group is reached where the layout allows),
        "dynamic" or "static" (from the original weight).
    grid: AWQ scale search points (alpha = i / grid); duo: AWQ also searches s = mean|x|^alpha /
        w_mean^(1 - alpha); clip: AWQ per-group clip search;
        max_shrink: the most the clip search shrinks a group's range (0.5: down to half);
        fold: compiled graphs fold AWQ's 1/s into the op producing the layers' input where that is
        exact (a norm, a per-channel multiply, the previous linear's rows; one s searched jointly for
        the layers sharing that input), an explicit multiply elsewhere (:mod:`.awq_fold`); "multiply":
        the same group s as an explicit multiply; False: each layer its own s and multiply.
        ``quantize_`` always uses per-layer multiplies.
    min_tokens: a layer seen on fewer calibration tokens is an error (too few samples).
    lp_norm, beta, kappa, iters: HQQ's objective ``sum |W - deq|^lp_norm`` and its solver (penalty
        beta, times kappa each of iters rounds; :mod:`qbackend.formats.hqq`).
    fallback: what a layer the method cannot handle gets: "error" (default: raise, naming the layer)
        or "rtn" (round to nearest, reported).
    """

    name: Literal["rtn", "gptq", "awq"] = "rtn"
    damp: float = 0.01
    block: int = 128
    act_order: bool = False
    groups: Literal["auto", "dynamic", "static"] = "auto"
    grid: int = 20
    duo: bool = True
    clip: bool = True
    max_shrink: float = 0.5
    fold: bool | Literal["multiply"] = True
    min_tokens: int = 64
    fallback: Literal["error", "rtn"] = "error"
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise MethodConfigError(f"unknown method {self.name!r}; valid: {', '.join(METHODS)}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or self.damp < 0:
            raise MethodConfigError(f"method damp must be a number >= 0; got {self.damp!r}")
        rules = (("lp_norm", lambda v: 0 < v <= 1, "in (0, 1]"), ("beta", lambda v: v > 0, "> 0"),
                 ("kappa", lambda v: v >= 1, ">= 1"))  # fmt: skip
        for key, ok, rule in rules:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
                raise MethodConfigError(f"method {key} must be a number {rule}; got {v!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise MethodConfigError(f"method iters must be an int >= 0; got {self.iters!r}")
        for key in ("block", "grid"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MethodConfigError(f"method {key} must be an int >= 1; got {v!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise MethodConfigError(f"method min_tokens must be an int >= 1; got {self.min_tokens!r}")
        if self.groups not in ("auto", "dynamic", "static"):
            raise MethodConfigError(f"method groups must be 'auto', 'dynamic' or 'static'; got {self.groups!r}")
        if self.fallback not in ("error", "rtn"):
            raise MethodConfigError(f"method fallback must be 'error' or 'rtn'; got {self.fallback!r}")
        if self.fold not in (True, False, "multiply") or not isinstance(self.fold, (bool, str)):
            raise MethodConfigError(f"method fold must be True, False or 'multiply'; got {self.fold!r}")
        for key in ("act_order", "clip", "duo"):
            if not isinstance(getattr(self, key), bool):
                raise MethodConfigError(f"method {key} must be a bool; got {getattr(self, key)!r}")
        ms = self.max_shrink
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < 1:
            raise MethodConfigError(f"method max_shrink must be a number in [0, 1); got {ms!r}")

    @property
    def calibrated(self) -> bool:
        return self.name in CALIBRATED

    @property
    def refines(self) -> bool:
        """Whether layers run a quantizer of their own (every method but round to nearest)."""
        return self.name != "rtn"

    @classmethod
    def from_value(cls, value: Any) -> MethodConfig:
        """A method name, a dict of fields (with ``name``) or a `MethodConfig`."""
        if isinstance(value, MethodConfig):
            return value
        if isinstance(value, str):
            return cls(name=value)  # type: ignore[arg-type]
        if isinstance(value, Mapping):
            valid = [f.name for f in dataclasses.fields(cls)]
            unknown = [k for k in value if k not in valid]
            if unknown:
                raise MethodConfigError(f"unknown method option(s) {unknown}; valid: {', '.join(valid)}")
            return cls(**dict(value))
        raise MethodConfigError(f"method must be one of {', '.join(METHODS)}, a dict of its options or a "
                                f"MethodConfig; got {type(value).__name__}")  # fmt: skip

    def fingerprint(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def normalize(config: Any) -> dict[str, Any]:
    """The ``method`` (and, for calibrated methods, ``calibration``) fields of a ``QuantConfig``, validated."""
    method = MethodConfig.from_value(config.method)
    cal = config.calibration
    if not method.calibrated:
        if cal is not None:
            raise MethodConfigError(f"method {method.name!r} uses no calibration; use method 'gptq' or 'awq' "
                                    "(or preset 'w8a8' for SmoothQuant)")  # fmt: skip
        return {"method": method}
    if cal is None:
        raise MethodConfigError(
            f"method {method.name!r} needs calibration data: options={{'method': {method.name!r}, "
            "'calibration': qbackend.calibrate(model, batches, hessian=True)}"
        )
    if not isinstance(cal, CalibrationResult):
        if isinstance(cal, (str, bytes)) or hasattr(cal, "__fspath__"):
            cal = CalibrationResult.load(cal)  # type: ignore[arg-type]
        else:
            raise MethodConfigError(f"calibration must be a CalibrationResult (qbackend.calibrate(...)) or the path "
                                    f"it was saved to; got {type(cal).__name__}")  # fmt: skip
    return {"method": method, "calibration": cal}


# ---- per-layer outcome -----------------------------------------------------------------------


@dataclass
class MethodRow:
    """One layer: output error on the calibration inputs with round to nearest and with the method
    (``||X (W - W_q)^T|| / ||X W^T||``), seconds taken, and a note (e.g. the RTN fallback's reason)."""

    layer: str
    method: str
    tokens: int = 0
    rtn_error: float | None = None
    error: float | None = None
    seconds: float = 0.0
    note: str = ""
    input_scale: str = ""  # AWQ: where 1/s went ("multiply": explicit, "folded": into the producer, "none": s = 1)


@dataclass
class MethodReport:
    """The calibrated method's per-layer rows of one compiled graph (``report.sections[method]``)."""

    method: str
    rows: list[MethodRow] = field(default_factory=list)

    def table(self) -> str:
        scales = any(r.input_scale for r in self.rows)
        head = f"{'layer':<48} {'tokens':>7} {'RTN err':>8} {self.method + ' err':>9} {'s':>6}"
        lines = [head + (f"  {'1/s':<8}" if scales else "") + "  note"]
        for r in self.rows:
            rtn = "" if r.rtn_error is None else f"{r.rtn_error:.4f}"
            err = "" if r.error is None else f"{r.error:.4f}"
            mid = f"  {r.input_scale:<8}" if scales else ""
            lines.append(f"{r.layer:<48} {r.tokens:>7} {rtn:>8} {err:>9} {r.seconds:>6.2f}{mid}  {r.note}")
        return "\n".join(lines)


# ---- the calibrated quantizer of one layer ---------------------------------------------------


@dataclass(eq=False)
class CalibratedQuantizer:
    """Quantizes one layer's ``[N, K]`` weight with GPTQ or AWQ from its calibration statistics.

    Called by the weight cache (``qbackend.passes.weight_cache``) at compile time and again if the
    weight changes in place; ``row`` holds the latest outcome. ``key`` tells cached entries apart.
    ``input_scale``: AWQ's ``1 / s`` (fp32 ``[K]``) the layer's input must be multiplied by, or None;
    a re-run writes the new values into the same tensor (graphs read it), and raises
    `StaleWeightError` (recompile) if a layer without one would now need one.
    ``fold``: AWQ with a fixed s already folded into the op producing the input (s, and how it was
    chosen for the report): no search, no multiply (``input_scale`` stays None).
    """

    layer: str
    scheme: Scheme
    method: MethodConfig
    stats: LayerStats | None
    key: str
    row: MethodRow | None = None
    input_scale: torch.Tensor | None = None
    fold: tuple[torch.Tensor, str] | None = None
    unfolded: str = ""  # why the compiled graph could not fold this layer's 1/s (AWQ with fold)
    _runs: int = 0

    def __call__(self, w: torch.Tensor) -> QuantizedWeight:
        t0 = time.perf_counter()
        row = MethodRow(self.layer, self.method.name, self.stats.tokens if self.stats is not None else 0)
        input_scale = None
        try:
            hessian = self._hessian(w)
            m = self.method
            if m.name == "awq":
                fixed = None if self.fold is None else self.fold[0]
                a = awq_quantize(w, hessian, self._act_mean(w), self.scheme, grid=m.grid, duo=m.duo, clip=m.clip,
                                 max_shrink=m.max_shrink, name=self.layer, scale=fixed)  # fmt: skip
                qw, row.rtn_error, row.error, input_scale = a.qweight, a.rtn_error, a.error, a.input_scale
                row.input_scale = "multiply" if input_scale is not None else "none"
                clip = f", {a.clipped} groups clipped" if a.clip else ", no clip search (blocks straddle rows)"
                row.note = f"alpha={a.alpha:g}{' (x/w)' if a.duo else ''}{clip}"
                if self.fold is not None:  # 1/s lives in the producer: no multiply
                    input_scale, row.input_scale, row.note = None, "folded", f"{self.fold[1]}{clip}"
                elif input_scale is not None and self.unfolded:
                    row.note += f"; not folded: {self.unfolded}"
                kept = a.kept_rtn
            else:
                g = gptq_quantize(w, hessian, self.scheme, damp=m.damp, block=m.block, act_order=m.act_order,
                                  groups=m.groups, name=self.layer)  # fmt: skip
                qw, row.rtn_error, row.error, kept = g.qweight, g.rtn_error, g.error, g.kept_rtn
            if kept:
                row.note = "round to nearest kept: lower error on the calibration data"
        except CalibrationDataError as e:
            if self.method.fallback != "rtn":
                raise
            qw = quantize(w, self.scheme, name=self.layer)
            row.method, row.note = "rtn", f"fallback: {e}"
            if self.stats is not None and self.stats.hessian is not None and self.stats.hessian.shape[0] == w.shape[1]:
                row.rtn_error = row.error = output_error(w, qw.dequantize(torch.float32), self.stats.hessian)
            log.warning("qbackend: %s: %s kept round to nearest (%s)", self.layer, self.method.name, e)
        self._set_input_scale(input_scale, w)
        row.seconds = time.perf_counter() - t0
        self.row = row
        return qw

    def _set_input_scale(self, value: torch.Tensor | None, w: torch.Tensor) -> None:
        first, self._runs = self._runs == 0, self._runs + 1
        if first:
            self.input_scale = None if value is None else value.to(w.device).contiguous()
            return
        if self.input_scale is None:
            if value is not None:
                raise StaleWeightError(
                    f"{self.layer}: the weight changed in place and AWQ now scales its input, which the compiled "
                    "graph has no multiply for; recompile (torch._dynamo.reset())"
                )
            return
        with torch.no_grad():  # graphs read this tensor: update it in place (ones: s = 1)
            self.input_scale.copy_(torch.ones_like(self.input_scale) if value is None else value)

    def _act_mean(self, w: torch.Tensor) -> torch.Tensor:
        st = self.stats
        assert st is not None
        if st.absmean is None:
            raise CalibrationDataError(
                f"{self.layer}: the calibration holds no mean |x| per channel (saved by an older qbackend); "
                "calibrate again with qbackend.calibrate(model, batches, hessian=True)"
            )
        return st.absmean.to(w.device)

    def _hessian(self, w: torch.Tensor) -> torch.Tensor:
        st, name, m = self.stats, self.layer, self.method
        if st is None:
            raise CalibrationDataError(
                f"{name}: the calibration has no statistics for this layer (no calibration batch reached it); "
                "calibrate on inputs that reach it, exclude it, or pass method={'name': "
                f"{m.name!r}, 'fallback': 'rtn'}}"
            )
        if st.hessian is None:
            raise CalibrationDataError(
                f"{name}: the calibration holds no X^T X; calibrate with "
                "qbackend.calibrate(model, batches, hessian=True)"
            )
        if st.tokens < m.min_tokens:
            raise CalibrationDataError(
                f"{name}: calibration saw only {st.tokens} tokens at this layer (< min_tokens={m.min_tokens}); "
                "calibrate on more data (or lower min_tokens)"
            )
        return st.hessian.to(w.device)


def calibrated_quantizer(
    layer: str, scheme: Scheme, config: Any, fold: tuple[torch.Tensor, str] | None = None
) -> CalibratedQuantizer | HQQQuantizer | None:
    """The quantizer of ``layer`` for ``config`` (a ``QuantConfig``), or None for round to nearest;
    ``fold``: AWQ's fixed s folded into the producer of the input (and its description)."""
    method: MethodConfig | None = config.method
    if method is None or not method.refines:
        return None
    if not method.calibrated:
        return HQQQuantizer(layer, scheme, method, f"{method.fingerprint()}|{layer}")
    cal: CalibrationResult = config.calibration
    key = f"{method.fingerprint()}|{cal.fingerprint()}|{layer}"
    if fold is not None:
        key += "|fold:" + hashlib.sha1(fold[0].detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    return CalibratedQuantizer(layer, scheme, method, cal.get(layer), key, fold=fold)



@dataclass(eq=False)
class HQQQuantizer:
    """Quantizes one layer's ``[N, K]`` weight with HQQ (no data); ``row``: the latest outcome, whose
    errors are relative WEIGHT errors ``||W - W_q|| / ||W||`` (there are no inputs to measure on)."""

    layer: str
    scheme: Scheme
    method: MethodConfig
    key: str
    row: MethodRow | None = None
    input_scale: torch.Tensor | None = None  # never: HQQ does not scale inputs

    def __call__(self, w: torch.Tensor) -> QuantizedWeight:
        t0 = time.perf_counter()
        m = self.method
        row = MethodRow(self.layer, "hqq")
        try:
            r = hqq_quantize(w, self.scheme, lp_norm=m.lp_norm, beta=m.beta, kappa=m.kappa, iters=m.iters,
                             name=self.layer)  # fmt: skip
        except FormatError as e:
            if m.fallback != "rtn" or "refines" not in str(e):
                raise
            qw = quantize(w, self.scheme, name=self.layer)
            row.method, row.note = "rtn", f"fallback: {e}"
            log.warning("qbackend: %s: hqq kept round to nearest (%s)", self.layer, e)
        else:
            qw, row.rtn_error, row.error = r.qweight, r.rtn_error, r.error
            gain = 1 - r.objective / r.rtn_objective if r.rtn_objective > 0 else 0.0
            row.note = (f"weight errors (no data); |W-Wq|^{m.lp_norm:g} {100 * gain:.1f}% below RTN, "
                        f"{r.changed}/{r.units} units refined")  # fmt: skip
        row.seconds = time.perf_counter() - t0
        self.row = row
        return qw


def layer_progress(method: str, label: Callable[[Any], str] = lambda plan: plan.name) -> Callable[[list], Any]:
    """A wrapper of a list of layers (plans) showing a progress bar with each layer's ``label`` and time."""

    def wrap(plans: list) -> Any:
        from tqdm.auto import tqdm  # the progress bar library only when a calibrated method runs

        bar = tqdm(plans, desc=method, unit="layer", disable=not plans)
        t0 = time.perf_counter()
        for plan in bar:
            yield plan
            dt, t0 = time.perf_counter() - t0, time.perf_counter()
            bar.set_postfix_str(f"{label(plan)} {dt:.2f}s", refresh=False)
            log.debug("qbackend: %s %s: %.2fs", method, label(plan), dt)

    return wrap


def method_section(method: MethodConfig, quantizers: list[CalibratedQuantizer | HQQQuantizer | None]) -> MethodReport:
    """The per-layer report of the quantizers that ran (rows of cached weights come from their first run)."""
    return MethodReport(method.name, [q.row for q in quantizers if q is not None and q.row is not None])
