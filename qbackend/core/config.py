"""`QuantConfig`: everything the backend's passes need to know, in one frozen (hashable) dataclass.

>>> QuantConfig.preset("int8")
>>> QuantConfig.from_options({"preset": "int4", "blocksize": 64, "exclude": ["lm_head"]})
>>> torch.compile(model, backend="qbackend", options={"preset": "int8", "exclude": ["lm_head"]})

The workflow fields (``smoothquant``/``calibration``, ``qat``) are validated by the workflow that owns
them, found through :mod:`qbackend.core.registry`: this module imports no workflow code.
``from_options`` and :meth:`QuantConfig.fingerprint` pick new fields up automatically.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from ..formats import FormatError, Scheme, short_repr
from ..kernels.compute_policy import COMPUTE_OPTIONS, DEFAULT_OPTION
from . import registry

Format = Literal["nf4", "fp4", "int4", "int8"]
FORMATS: tuple[str, ...] = ("nf4", "fp4", "int4", "int8")
ON_WEIGHT_CHANGE: tuple[str, ...] = ("requantize", "error")
WEIGHT_CHECKS: tuple[str, ...] = ("sampled", "full", "version")  # see qbackend.passes.weight_stamp

#: preset name -> field values. "nf4" is the default (QLoRA storage: blocks of 64, nested constants).
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "nf4": MappingProxyType({"format": "nf4"}),
        "fp4": MappingProxyType({"format": "fp4"}),
        "int4": MappingProxyType({"format": "int4"}),
        "int4-g64": MappingProxyType({"format": "int4", "blocksize": 64}),
        "int8": MappingProxyType({"format": "int8"}),
        # SmoothQuant W8A8: int8 weights per channel x int8 activations per token.
        "w8a8": MappingProxyType({"format": "int8", "smoothquant": True}),
    }
)

# Per-format defaults for the fields left as None.
_DEFAULT_BLOCKSIZE = {"nf4": 64, "fp4": 64, "int4": 128}
_DEFAULT_NESTED = {"nf4": True, "fp4": True, "int4": False, "int8": False}
_DEFAULT_SYMMETRIC = {"nf4": True, "fp4": True, "int4": False, "int8": True}


class ConfigError(ValueError):
    """A bad qbackend option; the message lists what is valid."""


Pattern = str | re.Pattern
#: torch.compile's modes (torch._inductor.list_mode_options)
MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class QuantConfig:
    """How the backend quantizes a model.

    format: "nf4" (default), "fp4", "int4" or "int8" (per output channel, symmetric).
    blocksize: elements per block (nf4/fp4, default 64) or per group along K (int4, default 128);
        must stay None for int8 (per-channel).
    nested: re-quantize the per-block constants to 8 bit (default True for nf4/fp4, False otherwise).
    symmetric: int4 only (default False: affine, scale + zero point).
    include: layer names or regexes to quantize (empty: all). A pattern matches a layer when it equals
        its module name (e.g. ``encoder.layer.0.output.dense``), is a dotted suffix of it (``lm_head``
        matches ``model.lm_head``), or is a regex that fully matches it.
    exclude: the same, for layers that stay float (wins over ``include``).
    min_params: layers with fewer weight elements stay float (too small to gain; reported).
    on_weight_change: a weight changed in place after compiling is re-quantized on the next call
        ("requantize") or raises naming the layer ("error").
    weight_check: how each call checks that the quantized weights are current: "sampled" (default:
        version counter, storage and a sampled fingerprint of the weight's bytes), "full" (strict:
        also a checksum of every byte, on every call; slow) or "version" (version counter and storage
        only: free, but blind to ``.data`` writes). See :mod:`qbackend.passes.weight_stamp`.
    inductor: Inductor config patches for the rest of the graph (``torch._inductor.config`` names).
    mode: Inductor's mode, as ``torch.compile(mode=...)`` (e.g. "reduce-overhead": CUDA graphs), for
        use with other options: torch.compile refuses ``mode=`` and ``options=`` together. Patches in
        ``inductor`` apply on top of it.
    compute: the arithmetic of the weight-only kernels: "auto" (default: per layer, the fastest mode
        this machine runs whose added error stays within a tenth of the format's own error; see
        :mod:`qbackend.kernels.compute_policy`), "fp32" (exact), "bf16" or "int8" (dynamic int8
        activations). A run-time choice: checkpoints keep the canonical weights; a loaded model
        resolves "auto" again on the loading machine. Not for W8A8 (int8 by definition).
    qat: quantization-aware training (:class:`qbackend.QATConfig`; True for its defaults, or a
        dict of its fields): when grad is enabled, linear layers get fake quantization instead of
        the quantized op. None (default): off.
    smoothquant: W8A8 with SmoothQuant (:class:`qbackend.smoothquant.SmoothQuantConfig`; True for its
        defaults, or a dict of its fields; set by preset "w8a8"). None (default): weight-only.
    calibration: a :class:`qbackend.CalibrationResult` (``qbackend.calibrate(...)``) or the path it was
        saved to: SmoothQuant's statistics (without one, W8A8 is naive) or a calibrated method's.
    method: how weight-only layers are rounded: "rtn" (default: round to nearest), "gptq" or "awq" (need
        ``calibration``), "hqq" (no data), or a dict of ``qbackend.workflows.weight_only.MethodConfig`` fields.
    """

    format: Format = "nf4"
    blocksize: int | None = None
    nested: bool | None = None
    symmetric: bool | None = None
    include: tuple[Pattern, ...] = ()
    exclude: tuple[Pattern, ...] = ()
    min_params: int = 16384
    on_weight_change: Literal["requantize", "error"] = "requantize"
    weight_check: Literal["sampled", "full", "version"] = "sampled"
    inductor: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    mode: str | None = None
    compute: str = DEFAULT_OPTION
    qat: Any = None  # a QATConfig once validated
    smoothquant: Any = None  # a SmoothQuantConfig once validated
    calibration: Any = None  # a CalibrationResult once validated
    method: Any = None  # a MethodConfig once validated

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {short_repr(self.format)}; valid: {', '.join(FORMATS)}")
        _check_optional_int("blocksize", self.blocksize, minimum=1)
        for name in ("nested", "symmetric"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True, False or None; got {type(getattr(self, name)).__name__}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, (str, re.Pattern)):  # a single pattern is a common slip: accept it
                value = (value,)
            if not isinstance(value, (list, tuple, set, frozenset)):
                raise ConfigError(
                    f"{name} must be a list of module names or regexes (str or re.Pattern); got {type(value).__name__}"
                )
            value = tuple(value)
            for p in value:
                if not isinstance(p, (str, re.Pattern)):
                    raise ConfigError(f"{name} entries must be str or re.Pattern; got {type(p).__name__}")
                if isinstance(p, str):
                    try:
                        re.compile(p)
                    except re.error as e:
                        raise ConfigError(f"{name} pattern {p!r} is not a valid regex: {e}") from None
            object.__setattr__(self, name, value)
        _check_optional_int("min_params", self.min_params, minimum=0, optional=False)
        if self.on_weight_change not in ON_WEIGHT_CHANGE:
            raise ConfigError(
                f"on_weight_change must be one of {', '.join(ON_WEIGHT_CHANGE)}; "
                f"got {short_repr(self.on_weight_change)}"
            )
        if self.weight_check not in WEIGHT_CHECKS:
            raise ConfigError(
                f"weight_check must be one of {', '.join(WEIGHT_CHECKS)}; got {short_repr(self.weight_check)}"
            )
        if not isinstance(self.inductor, Mapping):
            raise ConfigError(f"inductor must be a dict of Inductor config patches; got {type(self.inductor).__name__}")
        object.__setattr__(self, "inductor", MappingProxyType(dict(self.inductor)))
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"unknown mode {short_repr(self.mode)}; valid: {', '.join(MODES)}")
        if self.compute not in COMPUTE_OPTIONS:
            raise ConfigError(f"unknown compute {short_repr(self.compute)}; valid: {', '.join(COMPUTE_OPTIONS)}")
        active = [n for n in registry.selecting_fields() if not (getattr(self, n) is None or getattr(self, n) is False)]
        if len(active) > 1:
            raise ConfigError(f"{' and '.join(active)} cannot be combined: choose one workflow")
        try:  # the workflow fields: validated by the workflows owning them
            normalized = registry.normalize_options(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in registry.workflow_fields():
            value = normalized.get(name, getattr(self, name))
            object.__setattr__(self, name, None if value is False else value)
        if self.format == "int8" and self.blocksize is not None:
            raise ConfigError("int8 is per output channel; blocksize must be None (use format='int4' for groups)")
        if self.format == "int8" and self.symmetric is False:
            raise ConfigError("int8 weights are symmetric per channel; symmetric=False is not supported")
        if self.format in ("nf4", "fp4") and self.symmetric is False:
            raise ConfigError(f"{self.format} is symmetric (absmax); symmetric=False is for format='int4'")
        try:
            self.scheme  # noqa: B018  (validate the format fields now, not at compile time)
        except FormatError as e:
            raise ConfigError(str(e)) from None

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> QuantConfig:
        """A preset ("nf4", "fp4", "int4", "int4-g64", "int8"), optionally with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {short_repr(name)}; valid presets: {', '.join(PRESETS)}")
        return cls.from_options({**PRESETS[name], **overrides})

    @classmethod
    def from_options(cls, options: QuantConfig | str | Mapping[str, Any] | None) -> QuantConfig:
        """Accepts None (defaults), a QuantConfig, a preset name or a dict of field names (plus "preset")."""
        if options is None:
            return cls()
        if isinstance(options, QuantConfig):
            return options
        if isinstance(options, str):
            return cls.preset(options)
        if not isinstance(options, Mapping):
            raise ConfigError(
                f"qbackend options must be None, a QuantConfig, a preset name or a dict; got {type(options).__name__}"
            )
        opts = dict(options)
        base: dict[str, Any] = {}
        if "preset" in opts:
            name = opts.pop("preset")
            if name not in PRESETS:
                raise ConfigError(f"unknown preset {short_repr(name)}; valid presets: {', '.join(PRESETS)}")
            base = dict(PRESETS[name])
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in opts if k not in valid]
        if unknown:
            hint = _inductor_hint(unknown)
            raise ConfigError(
                f"unknown qbackend option(s) {', '.join(map(repr, unknown))}; valid: preset, {', '.join(valid)}{hint}"
            )
        return cls(**{**base, **opts})

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    # ---- derived -----------------------------------------------------------------------------
    @property
    def scheme(self) -> Scheme:
        """The storage `Scheme` every quantized layer gets."""
        fmt = self.format
        nested = _DEFAULT_NESTED[fmt] if self.nested is None else self.nested
        if fmt in ("nf4", "fp4"):
            return Scheme(fmt, 4, blocksize=self.blocksize or _DEFAULT_BLOCKSIZE[fmt], nested=nested)
        if fmt == "int4":
            sym = _DEFAULT_SYMMETRIC[fmt] if self.symmetric is None else self.symmetric
            return Scheme("int", 4, symmetric=sym, granularity="block", blocksize=self.blocksize or 128, nested=nested)
        return Scheme("int", 8, symmetric=True, granularity="channel", axis=0, nested=nested)

    def selects(self, layer: str) -> tuple[bool, str]:
        """Whether ``layer`` (a module name) passes include/exclude: ``(ok, reason if not)``."""
        for p in self.exclude:
            if _matches(p, layer):
                return False, f"excluded by {_pattern_text(p)!r}"
        if self.include and not any(_matches(p, layer) for p in self.include):
            return False, "not in include list"
        return True, ""

    def unmatched_includes(self, layers: list[str]) -> list[str]:
        """The ``include`` patterns that match none of ``layers`` (module names), as text."""
        return [_pattern_text(p) for p in self.include if not any(_matches(p, n) for n in layers)]

    def fingerprint(self) -> str:
        """A stable text of every field (for cache keys and logs)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = [_pattern_text(p) for p in v]
            elif isinstance(v, Mapping):
                v = {k: repr(v[k]) for k in sorted(v)}
            elif hasattr(v, "fingerprint"):  # SmoothQuantConfig, CalibrationResult
                v = v.fingerprint()
            elif dataclasses.is_dataclass(v) and not isinstance(v, type):  # QATConfig
                v = dataclasses.asdict(v)
            out[f.name] = v
        return json.dumps(out, sort_keys=True)

    def __hash__(self) -> int:  # the inductor mapping is not hashable by itself
        return hash(self.fingerprint())

    # ---- versioned dict (what checkpoints store) ---------------------------------------------
    _dict_version = 2  # not a field (no annotation): bump when to_dict's layout changes
    _dict_versions_read = (1, 2)  # 1: before ``compute`` (reads as "auto")

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values with a ``version`` key; :meth:`from_dict` rebuilds the config.

        Patterns: strings as they are, compiled regexes as ``{"regex", "flags"}``. ``qat`` and
        ``smoothquant``: their fields. ``calibration`` (data, not settings) is recorded as a summary
        ``{"fingerprint", "num_batches", "layers"}`` and comes back as None: a saved model needs no
        calibration to load. Inductor patches whose values are not JSON are left out, named in
        ``"not_recorded"``.
        """
        out: dict[str, Any] = {"version": self._dict_version}
        skipped: list[str] = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("include", "exclude"):
                v = [p if isinstance(p, str) else {"regex": p.pattern, "flags": p.flags} for p in v]
            elif f.name == "inductor":
                v, skipped = self._json_entries(v)
            elif f.name in ("qat", "smoothquant", "method") and v is not None:
                v = json.loads(json.dumps(dataclasses.asdict(v)))  # tuples -> lists, as JSON has them
            elif f.name == "calibration" and v is not None:
                v = {"fingerprint": v.fingerprint(), "num_batches": v.num_batches, "layers": len(v.layers)}
            out[f.name] = v
        if skipped:
            out["not_recorded"] = [f"inductor.{k}" for k in skipped]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict` (calibration comes back as None); `ConfigError` on an unknown version or key."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"expected a QuantConfig dict, got {type(d).__name__}")
        if d.get("version") not in cls._dict_versions_read:
            raise ConfigError(
                f"QuantConfig dict version {d.get('version')!r:.20} is not supported (this qbackend reads versions "
                f"{', '.join(map(str, cls._dict_versions_read))}); upgrade qbackend"
            )
        if d.get("version") == 1 and "compute" in d:
            raise ConfigError("QuantConfig dict version 1 has no 'compute' key; the record is corrupt")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(k for k in d if k not in valid and k not in ("version", "not_recorded"))
        if unknown:
            raise ConfigError(f"unknown QuantConfig dict key(s) {unknown}; valid: {', '.join(valid)}")
        fields_ = {k: d[k] for k in valid if k in d and k != "calibration"}
        for name in ("include", "exclude"):
            if name not in fields_:
                continue
            if not isinstance(fields_[name], (list, tuple)):
                raise ConfigError(f"QuantConfig dict {name!r}: expected a list, got {type(fields_[name]).__name__}")
            pats: list[Pattern] = []
            for i, p in enumerate(fields_[name]):
                ok = isinstance(p, str) or (
                    isinstance(p, Mapping) and set(p) == {"regex", "flags"} and isinstance(p["regex"], str)
                    and isinstance(p["flags"], int) and not isinstance(p["flags"], bool)
                )  # fmt: skip
                if not ok:
                    raise ConfigError(f"QuantConfig dict {name}[{i}]: expected a string or a {{'regex', 'flags'}} dict")
                try:
                    pats.append(p if isinstance(p, str) else re.compile(p["regex"], p["flags"]))
                except (re.error, ValueError) as e:
                    raise ConfigError(f"QuantConfig dict {name}[{i}]: bad regex ({e})") from None
            fields_[name] = tuple(pats)
        return cls(**fields_)

    @staticmethod
    def _json_entries(m: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The entries of ``m`` whose values are JSON, and the names of the others."""
        kept, skipped = {}, []
        for k in sorted(m):
            try:
                json.dumps(m[k])
                kept[k] = m[k]
            except (TypeError, ValueError):
                skipped.append(k)
        return kept, skipped


def _check_optional_int(name: str, value: Any, minimum: int, optional: bool = True) -> None:
    """An int field (bools refused: ``True`` is not a count): None (if ``optional``) or >= ``minimum``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        want = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ConfigError(f"{name} must be {want}; got {short_repr(value)}")


def _pattern_text(p: Pattern) -> str:
    return p.pattern if isinstance(p, re.Pattern) else p


def _matches(p: Pattern, layer: str) -> bool:
    if isinstance(p, str) and (layer == p or layer.endswith("." + p)):
        return True
    rx = p if isinstance(p, re.Pattern) else re.compile(p)
    return rx.fullmatch(layer) is not None


def _inductor_hint(keys: list[str]) -> str:
    try:
        import torch._inductor.config as ic  # Inductor loads slowly: only for this error message

        if any(hasattr(ic, k.split(".")[0]) for k in keys):
            return " (Inductor settings go in options={'inductor': {...}})"
    except ImportError:  # pragma: no cover
        pass
    return ""
