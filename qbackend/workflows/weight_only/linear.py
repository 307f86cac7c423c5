"""`QuantizedLinear`: the module form of one weight-only quantized linear layer.

`QuantizedLinear` holds only the kernel tensors (buffers) and the bias, and calls the same op the
backend lowers to, so eager, ``torch.compile`` with any backend and ``state_dict`` all work.
Its arithmetic is the ``compute`` option (``"auto"``, "fp32", "bf16", "int8", "int16") resolved for the
device its buffers are on, again after every move (:mod:`qbackend.kernels.compute_policy`).
"""

from __future__ import annotations

import torch
from torch import nn

from ...formats import Scheme, quantize
from ...kernels import KernelWeight, direct, prepare_weight
from ...kernels.compute_policy import DEFAULT_OPTION, check_option, fp32_rows, resolve_weight
from ...kernels.families import by_op_name
from ...passes.modules import apply_keeping_dtypes


class QuantizedLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored quantized (no float copy).

    The kernel tensors are buffers named as the op's arguments (``codes``, ``absmax``, ...); ``None``
    arguments are not stored. They keep their dtypes under ``.half()``/``.to(dtype)`` (the op needs
    fp32 constants); device moves apply.

    compute_option: the ``compute`` option asked for; compute: the mode the op runs in here (resolved
    from it for the buffers' device; :meth:`set_compute` changes it).
    input_scale: fp32 ``[in_features]`` the input is multiplied by before the op (AWQ's ``1 / s``, the
    weight stored being ``W * s``), or None.
    """

    def __init__(
        self, kw: KernelWeight, bias: torch.Tensor | None, scheme: Scheme, compute: str = DEFAULT_OPTION,
        input_scale: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = kw.in_features, kw.out_features
        self.scheme = scheme
        self.op = kw.op
        self.statics = tuple(kw.statics)
        self._arg_names = tuple(n if t is not None else None for n, t in zip(kw.names, kw.tensors, strict=True))
        for name, t in zip(kw.names, kw.tensors, strict=True):
            if t is not None:
                self.register_buffer(name, t)
        if input_scale is not None:
            if input_scale.dim() != 1 or input_scale.numel() != kw.in_features:
                raise ValueError(f"input_scale must have {kw.in_features} values (one per input); "
                                 f"got shape {tuple(input_scale.shape)}")  # fmt: skip
            self.register_buffer("input_scale", input_scale.float())
        else:
            self.input_scale = None
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.set_compute(compute)

    def set_compute(self, compute: str) -> None:
        """Use the ``compute`` option (resolved now for this layer and device; raises ``ComputeUnavailable``
        for an explicit mode this CPU lacks the instructions for)."""
        check_option(compute)
        device = next(self.buffers()).device.type
        self.compute = resolve_weight(compute, self.op._opname, self.statics, device).mode
        self.compute_option = compute
        # "auto" may run some row counts in exact fp32 (where this mode's kernel is slower there)
        self._fp32_rows = fp32_rows(compute, by_op_name(self.op._opname)[0].name, self.compute)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme, name: str = "weight",
        compute: str = DEFAULT_OPTION,
    ) -> QuantizedLinear:  # fmt: skip
        """Quantize a float ``[out, in]`` weight (errors name ``name``)."""
        return cls(prepare_weight(quantize(weight.detach(), scheme, name=name)), bias, scheme, compute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:  # the same elementwise multiply the backend inserts
            x = x * self.input_scale.to(x.dtype)
        # straight from the module's dicts: nn.Module.__getattr__ costs ~0.6 us a name, per call
        bufs, params = self._buffers, self._parameters
        try:
            tensors = [None if n is None else bufs[n] for n in self._arg_names]
            bias = params["bias"] if "bias" in params else self.bias
        except KeyError:
            tensors = [None if n is None else getattr(self, n) for n in self._arg_names]
            bias = self.bias
        mode = self.compute
        span = getattr(self, "_fp32_rows", None)  # absent in a module pickled by an older version
        if span is not None and self.in_features and span[0] <= x.numel() // self.in_features <= span[1]:
            mode = "fp32"
        # the kernel without the dispatcher round trip where no grad, tracing or mode needs it
        return direct.call_linear(self.op, x, tensors, bias, self.statics, mode)

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight the codes stand for (for checks; allocates a float copy)."""
        eye = torch.eye(self.in_features, device=next(self.buffers()).device)
        if self.input_scale is not None:
            eye = torch.diag(self.input_scale.float())
        tensors = [None if n is None else getattr(self, n) for n in self._arg_names]
        return self.op(eye, *tensors, None, *self.statics).t()

    def _apply(self, fn, recurse: bool = True):
        out = apply_keeping_dtypes(self, super()._apply, fn, recurse, tuple(self._buffers))
        if hasattr(self, "compute_option"):  # a device move may change what the option resolves to
            self.set_compute(self.compute_option)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.scheme.name}, compute={self.compute}"
                + (", input_scale=multiply" if self.input_scale is not None else ""))  # fmt: skip
