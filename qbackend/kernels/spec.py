"""How an op family is described: its tensors, static ints and checks (the machinery, no families).

An :class:`OpFamily` is the single description of one ``qbackend::<name>_linear`` op and its
``<name>_linear_grad_input`` op. Everything else is derived from it: the op schema
(:meth:`OpFamily.schema`), argument binding by name (:meth:`OpFamily.bind`), validation
(:meth:`OpFamily.validate`, run by the fake and by every real kernel) and the output shape. The
families themselves are in :mod:`qbackend.kernels.families`.

Argument order of a forward op: ``x``, the weight tensors, ``bias``, the extra tensors, the float
scalars, the ints and, for the weight-only formats, ``compute`` (a string, default ``"fp32"``: the
arithmetic the kernel may use, see :data:`COMPUTE_MODES`). Of a grad-input op: ``grad_y``, the
weight tensors, the ints (gradients are always computed in fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..formats.scheme import SUPPORTED_DTYPES

FLOAT_ACTS = SUPPORTED_DTYPES  # activations: the float dtypes weights are quantized from
NAMESPACE = "qbackend"

#: the arithmetic a weight-only op may use (the numerics of each are defined in
#: :mod:`qbackend.kernels.reference`): "fp32" exact; "bf16" activations and codebook values rounded to
#: bf16, fp32 accumulation; "int8" activations quantized to int8 per block of ``ACT_BLOCK`` along K,
#: integer dot products, block scales applied in fp32; "int16" the same with int16 activations (per block
#: of ``INT16_BLOCK``; about 1/256 of int8's activation error). ("auto" is a config value resolved
#: before an op is called, never an op argument.)
COMPUTE_MODES = ("fp32", "bf16", "int8", "int16")
DEFAULT_COMPUTE = "fp32"


class Args(dict):
    """An op call's arguments by name (``a.codes`` or ``a["codes"]``), in schema order."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class TensorArg:
    """One tensor argument.

    numel: expected element count, a function of the op's ints (None: any).
    shape: expected exact shape from the ints (None: any shape with ``numel`` elements);
        ``shape_doc`` names it.
    optional: may be None (then nothing else is checked).
    """

    name: str
    dtypes: tuple[torch.dtype, ...]
    numel: Callable[[Args], int] | None = None
    optional: bool = False
    shape: Callable[[Args], tuple[int, ...]] | None = None
    shape_doc: str = ""


BIAS = TensorArg("bias", FLOAT_ACTS, lambda a: a.out_features, optional=True,
                 shape=lambda a: (a.out_features,), shape_doc="[out_features]")  # fmt: skip


@dataclass(frozen=True)
class OpFamily:
    """One quantized linear op family, described once.

    name: the format (nf4, fp4, int4, int8) or activation scheme (w8a8, w8a8_outlier) it serves;
        the ops are ``qbackend::<name>_linear`` and ``qbackend::<name>_linear_grad_input``.
    kernel: the implementation stem: every implementation module (``reference``, ``cpu``, ``triton``)
        names its functions ``<kernel>_linear`` / ``<kernel>_linear_grad_input``. Families that share
        a storage layout share a kernel (nf4 and fp4 -> ``codebook``).
    weights: tensors between ``x`` and ``bias``. extras: tensors after ``bias``. floats / ints: the
        scalars after them (``ints`` start with out_features, in_features).
    check: family rules beyond per-tensor ones, ``check(family, args, grad)`` raising via
        :meth:`fail`; runs before the per-tensor checks.
    grad_family: the family whose grad-input op computes this one's ``grad_x`` (None: its own).
    default: a composite over other qbackend ops serving every device (then no device kernels are
        registered for the family; the reference is only the test oracle), or None.
    computes: whether the forward op takes the trailing ``compute`` string (weight-only formats).
    summary: one line saying what the op computes (the docstring of its default kernel).
    """

    name: str
    kernel: str
    weights: tuple[TensorArg, ...]
    ints: tuple[str, ...]
    extras: tuple[TensorArg, ...] = ()
    floats: tuple[str, ...] = ()
    check: Callable[[OpFamily, Args, bool], None] | None = None
    grad_family: str | None = None
    default: Callable[..., Tensor] | None = None
    summary: str = ""
    computes: bool = False

    # ---- names and signatures ------------------------------------------------------------------

    @property
    def op_name(self) -> str:
        return f"{self.name}_linear"

    @property
    def grad_op_name(self) -> str:
        """Name of the grad-input op that serves this family."""
        return f"{self.grad_family or self.name}_linear_grad_input"

    @property
    def has_grad_op(self) -> bool:
        """Whether this family defines its own grad-input op."""
        return self.grad_family is None

    def __post_init__(self) -> None:
        # Argument names are needed on every call (binding): computed once.
        w = tuple(t.name for t in self.weights)
        fwd = ("x", *w, "bias", *(t.name for t in self.extras), *self.floats, *self.ints)
        if self.computes:
            fwd = (*fwd, "compute")
        object.__setattr__(self, "_names", {False: fwd, True: ("grad_y", *w, *self.ints)})
        object.__setattr__(self, "_cache", {})

    def arg_names(self, grad: bool = False) -> tuple[str, ...]:
        """Argument names in schema order (forward op, or the grad-input op when ``grad``)."""
        return self._names[grad]

    def schema(self, grad: bool = False) -> str:
        """The torch.library schema, e.g. ``(Tensor x, Tensor codes, ..., SymInt out_features) -> Tensor``."""
        parts = ["Tensor grad_y" if grad else "Tensor x"]
        parts += [f"Tensor{'?' if t.optional else ''} {t.name}" for t in self.weights]
        if not grad:
            parts += ["Tensor? bias"]
            parts += [f"Tensor{'?' if t.optional else ''} {t.name}" for t in self.extras]
            parts += [f"float {f}" for f in self.floats]
        parts += [f"SymInt {i}" for i in self.ints]
        if self.computes and not grad:
            parts += [f'str compute="{DEFAULT_COMPUTE}"']
        return f"({', '.join(parts)}) -> Tensor"

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None, grad: bool = False) -> Args:
        """The call's arguments by name (positional ``args`` then ``kwargs``)."""
        names = self.arg_names(grad)
        if not kwargs and len(args) == len(names):  # the usual call: all positional
            return Args(zip(names, args, strict=True))
        if len(args) > len(names):
            self.fail(f"takes {len(names)} arguments; got {len(args)}", grad, TypeError)
        out = Args(zip(names, args, strict=False))
        out.update(kwargs or {})
        if self.computes and not grad:
            out.setdefault("compute", DEFAULT_COMPUTE)
        missing = [n for n in names if n not in out]
        if missing:
            self.fail(f"missing argument(s) {', '.join(missing)}", grad, TypeError)
        return Args((n, out[n]) for n in names)

    def tensor_args(self, grad: bool = False) -> tuple[TensorArg, ...]:
        return self.weights if grad else (*self.weights, BIAS, *self.extras)

    # ---- validation ------------------------------------------------------------------------------

    def fail(self, msg: str, grad: bool = False, exc: type[Exception] = ValueError) -> None:
        op = self.grad_op_name if grad else self.op_name
        raise exc(f"{NAMESPACE}::{op}: {msg}")

    def validate(self, a: Args, grad: bool = False) -> None:
        """Raise ``ValueError``/``TypeError`` naming the bad argument (same checks in fake and real kernels)."""
        expected = self._expected(a, grad)
        x_name = "grad_y" if grad else "x"
        width_name = "out_features" if grad else "in_features"
        x, width = a[x_name], a[width_name]
        if x.dtype not in FLOAT_ACTS:
            self.fail(f"{x_name} must be float32, float16 or bfloat16; got {x.dtype}", grad, TypeError)
        if x.dim() < 1:
            self.fail(f"{x_name} must have at least 1 dimension (its last is {width_name}); got a 0-d tensor", grad)
        if x.shape[-1] != width:
            self.fail(f"{x_name} has last dimension {x.shape[-1]} but {width_name}={width} (shape {tuple(x.shape)})",
                      grad)  # fmt: skip
        if self.computes and not grad and a.compute not in COMPUTE_MODES:
            self.fail(f"compute must be one of {', '.join(COMPUTE_MODES)}; got {a.compute!r:.40}", grad)
        if self.check is not None:
            self.check(self, a, grad)
        device = x.device
        for spec, numel, shape in expected:
            t = a[spec.name]
            if t is None:
                if not spec.optional:
                    self.fail(f"{spec.name} is required; got None", grad, TypeError)
                continue
            if t.dtype not in spec.dtypes:
                want = " or ".join(str(d).removeprefix("torch.") for d in spec.dtypes)
                self.fail(f"{spec.name} must be {want}; got {t.dtype}", grad, TypeError)
            if numel is not None and t.numel() != numel:
                self.fail(f"{spec.name} has {t.numel()} elements; expected {numel} (shape {tuple(t.shape)})", grad)
            if t.device != device:
                self.fail(f"{spec.name} is on {t.device} but x is on {device}; move all tensors to one device", grad)
            if shape is not None and tuple(t.shape) != shape:
                self.fail(f"{spec.name} must have shape {spec.shape_doc} = {list(shape)}; got {tuple(t.shape)}", grad)

    def _expected(self, a: Args, grad: bool) -> tuple[tuple[TensorArg, int | None, tuple[int, ...] | None], ...]:
        """(spec, numel, shape) per tensor argument for these ints (which are checked positive first).

        They depend on the ints only, so they are computed once per distinct ints (every call of a
        layer passes the same ones); the per-call checks are then plain comparisons.
        """
        ints = tuple(a[i] for i in self.ints)
        key = (grad, ints)
        try:
            return self._cache[key]
        except KeyError:
            pass
        except TypeError:  # symbolic ints (tracing with dynamic shapes) are not hashable: no cache
            key = None
        for name, v in zip(self.ints, ints, strict=True):
            if v <= 0:
                self.fail(f"{name} must be positive; got {v}", grad)
        only_ints = Args(zip(self.ints, ints, strict=True))
        out = tuple(
            (spec, None if spec.numel is None else spec.numel(only_ints),
             None if spec.shape is None else tuple(spec.shape(only_ints)))
            for spec in self.tensor_args(grad)
        )  # fmt: skip
        if key is not None:
            if len(self._cache) > 4096:  # bounded: a process may see many layer shapes
                self._cache.clear()
            self._cache[key] = out
        return out

    def out_shape(self, a: Args, grad: bool = False) -> tuple[int, ...]:
        """[..., out_features] (forward) or [..., in_features] (grad-input)."""
        if grad:
            return (*a.grad_y.shape[:-1], a.in_features)
        return (*a.x.shape[:-1], a.out_features)
