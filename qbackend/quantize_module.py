"""``qbackend.quantize_``: swap linear modules for `QuantizedLinear`, releasing their float weights.

Compiling with ``backend="qbackend"`` quantizes at compile time but leaves the user's module (and
its float weights) untouched, because the module is the user's. To free the float weights for good:

>>> report = qbackend.quantize_(model, "nf4")      # in place; nn.Linear -> QuantizedLinear
>>> model = torch.compile(model, backend="qbackend")  # the quantized ops are already in the graph

`QuantizedLinear` holds only the kernel tensors (buffers) and the bias, and calls the same op the
backend lowers to, so eager, ``torch.compile`` with any backend and ``state_dict`` all work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .formats import Scheme, quantize
from .kernels import KernelWeight, UnsupportedWeight, prepare_weight
from .passes.select_layers import decide_layer
from .report import LayerReport, Report


class QuantizedLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored quantized (no float copy).

    The kernel tensors are buffers named as the op's arguments (``codes``, ``absmax``, ...); ``None``
    arguments are not stored. They keep their dtypes under ``.half()``/``.to(dtype)`` (the op needs
    fp32 constants); device moves apply.
    """

    def __init__(self, kw: KernelWeight, bias: torch.Tensor | None, scheme: Scheme) -> None:
        super().__init__()
        self.in_features, self.out_features = kw.in_features, kw.out_features
        self.scheme = scheme
        self.op = kw.op
        self.statics = tuple(kw.statics)
        self._arg_names = tuple(n if t is not None else None for n, t in zip(kw.names, kw.tensors, strict=True))
        for name, t in zip(kw.names, kw.tensors, strict=True):
            if t is not None:
                self.register_buffer(name, t)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme, name: str = "weight"
    ) -> QuantizedLinear:
        """Quantize a float ``[out, in]`` weight (errors name ``name``)."""
        return cls(prepare_weight(quantize(weight.detach(), scheme, name=name)), bias, scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = [None if n is None else getattr(self, n) for n in self._arg_names]
        return self.op(x, *tensors, self.bias, *self.statics)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight the codes stand for (for checks; allocates a float copy)."""
        eye = torch.eye(self.in_features, device=next(self.buffers()).device)
        tensors = [None if n is None else getattr(self, n) for n in self._arg_names]
        return self.op(eye, *tensors, None, *self.statics).t()

    def _apply(self, fn, recurse: bool = True):
        return apply_keeping_dtypes(self, super()._apply, fn, recurse, tuple(self._buffers))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.scheme.name}")  # fmt: skip


def apply_keeping_dtypes(module: nn.Module, apply: Any, fn: Any, recurse: bool, names: tuple[str, ...]) -> nn.Module:
    """``module._apply`` (``apply``: the ``nn.Module`` one) keeping the buffers ``names`` in their dtypes.

    Device moves apply to them; ``.half()`` / ``.to(dtype)`` do not: the ops need int codes and fp32 constants.
    """
    dtypes = {n: module._buffers[n].dtype for n in names if module._buffers.get(n) is not None}
    apply(fn, recurse)
    for n, dt in dtypes.items():
        b = module._buffers[n]
        if b is not None and b.dtype != dt:
            module._buffers[n] = b.to(dt)
    return module


def quantize_(
    model: nn.Module, config: QuantConfig | str | dict[str, Any] | None = None, *, example_inputs: Any = None
) -> Report:
    """Replace eligible linear modules of ``model`` (in place) by `QuantizedLinear`; returns the report.

    W8A8 (preset "w8a8", ``smoothquant`` set): by :class:`qbackend.smoothquant.linear.W8A8Linear`
    instead, computing what the compiled model computes (SmoothQuant folds included, see
    :mod:`qbackend.smoothquant.module_form`). With smoothing, the model is traced once on
    ``example_inputs`` (a tensor, a tuple of arguments or a dict of keyword arguments; default: the
    calibration's first batch). Other presets do not use ``example_inputs``.

    Eligible: ``nn.Linear`` (and subclasses that keep its forward; not the ``out_proj`` of
    ``nn.MultiheadAttention``, which reads the weight directly) and transformers' ``Conv1D``
    (GPT-2; weight stored [in, out]). ``config``'s include/exclude/min_params apply, by module name.
    Modules sharing one weight (tied) share one set of quantized tensors. The float weight is freed
    unless something else still holds it (e.g. an embedding tied to the output layer).

    Memory-mapped checkpoints (HF safetensors loads by default): the file stays mapped while any of
    its tensors lives, so RSS only drops for weights loaded into memory (``disable_mmap=True``);
    the mapped pages of dropped weights are clean and reclaimable, but still counted.
    """
    config = QuantConfig.from_options(config)
    if config.smoothquant is not None:
        from .smoothquant.module_form import quantize_w8a8_

        return quantize_w8a8_(model, config, example_inputs)
    report = Report(graphs=0)
    shared: dict[tuple[int, bool], KernelWeight] = {}
    for name, parent, child_name, mod in list(_linear_modules(model)):
        transposed = _is_conv1d(mod)
        w = mod.weight
        shape = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        row = LayerReport(
            name=name, param=f"{name}.weight", shape=(int(shape[0]), int(shape[1])),
            forms=("conv1d" if transposed else "linear",), quantized=False,
            bits_per_param=float(w.element_size() * 8),
            bytes_before=w.numel() * w.element_size(), bytes_after=w.numel() * w.element_size(),
            transposed=transposed,
        )  # fmt: skip
        report.layers.append(row)
        scheme, row.reason = decide_layer(name, w.numel(), config)
        if scheme is None:
            continue
        key = (id(w), transposed)
        kw = shared.get(key)
        if kw is None:
            weight = w.detach().t().contiguous() if transposed else w.detach()
            try:
                qw = quantize(weight, scheme, name=name)
                kw = prepare_weight(qw)
            except UnsupportedWeight as e:
                row.reason = f"unsupported: {e.reason}"
                continue
            shared[key] = kw
            row.bytes_after = (qw.storage_bits() + 7) // 8
            row.bits_per_param = qw.bits_per_param()
        else:
            row.bytes_after = 0  # shares the tensors counted on the first layer
            row.bits_per_param = 0.0
        setattr(parent, child_name, QuantizedLinear(kw, mod.bias, scheme))
        row.quantized, row.format = True, scheme.name
    return report


def _linear_modules(model: nn.Module):
    """(name, parent, attribute, module) of each swappable linear, parents first."""
    for pname, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for cname, child in parent.named_children():
            swappable = isinstance(child, nn.Linear) and type(child).forward is nn.Linear.forward
            if swappable or _is_conv1d(child):
                yield (f"{pname}.{cname}" if pname else cname), parent, cname, child


def _is_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: y = x @ weight + bias with weight [nx, nf]; duck-typed so
    # transformers stays optional.
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(w, torch.Tensor)
        and w.dim() == 2
        and tuple(w.shape) == (getattr(m, "nx", None), getattr(m, "nf", None))
    )
