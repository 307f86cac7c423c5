"""`W8A8Linear`: the module form of one W8A8 (SmoothQuant) layer, for ``quantize_``, save/load and export.

It holds what the backend's W8A8 lowering puts in the compiled graph for that layer, and calls the
same op on it: int8 codes of ``W * s`` (one fp32 scale per output channel), the activation mode
(per-token dynamic, or a static per-tensor scale), the optional outlier threshold, and, where the
smoothing could not be folded into the layer's producer, the explicit input multiply by ``1/s``
(``smooth``). So ``layer(x) == torch.ops.qbackend.w8a8_linear(x * smooth, codes, scale, bias, ...)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...kernels import direct
from ...passes.modules import apply_keeping_dtypes

_W8A8 = torch.ops.qbackend.w8a8_linear.default

#: buffers that keep their dtype under ``.half()`` / ``.to(dtype)`` (the ops require int8 / fp32)
_FIXED_DTYPES = ("codes", "scale", "act_scale")


class W8A8Linear(nn.Module):
    """``y = w8a8(x * smooth) + bias``: int8 activations x int8 weights -> int32, rescaled.

    codes: int8 ``[out * in]``, the weight as the backend quantizes it (``W * s`` when smoothed).
    scale: fp32 ``[out]``. act_scale: fp32 ``[1]`` static per-tensor activation scale, or None
    (per-token, dynamic). threshold: outlier columns (any ``|x| >= threshold``) run in float
    (``qbackend::w8a8_outlier_linear``), or None. smooth: ``[in]`` explicit smoothing multiply
    ``1/s`` applied to the input, or None (not smoothed, or folded into the producer: then the
    producer's parameters hold ``1/s``). smoothing: a description of how this layer was smoothed.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        out_features: int,
        in_features: int,
        act_scale: torch.Tensor | None = None,
        threshold: float | None = None,
        smooth: torch.Tensor | None = None,
        smoothing: str = "",
    ) -> None:
        super().__init__()
        n, k = int(out_features), int(in_features)
        _check(codes, "codes", (torch.int8,), n * k)
        _check(scale, "scale", (torch.float32,), n)
        _check(act_scale, "act_scale", (torch.float32,), 1)
        _check(smooth, "smooth", (torch.float32, torch.float16, torch.bfloat16), k)
        _check(bias, "bias", (torch.float32, torch.float16, torch.bfloat16), n)
        if threshold is not None and not float(threshold) > 0:
            raise ValueError(f"W8A8Linear: threshold must be > 0 or None; got {threshold!r}")
        self.out_features, self.in_features = n, k
        self.threshold = None if threshold is None else float(threshold)
        self.smoothing = smoothing
        self.register_buffer("codes", codes.reshape(-1))
        self.register_buffer("scale", scale.reshape(-1))
        self.register_buffer("act_scale", None if act_scale is None else act_scale.reshape(1))
        self.register_buffer("smooth", None if smooth is None else smooth.reshape(-1))
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    @property
    def activation(self) -> str:
        """The activation mode: "tensor" (static per-tensor scale) or "token" (dynamic per-token)."""
        return "tensor" if self.act_scale is not None else "token"

    @property
    def format(self) -> str:
        """The report's format name, e.g. ``w8a8-token`` or ``w8a8-tensor-outliers6``."""
        name = f"w8a8-{self.activation}"
        return name + (f"-outliers{self.threshold:g}" if self.threshold is not None else "")

    @property
    def op(self) -> torch._ops.OpOverload:
        ops = torch.ops.qbackend
        return ops.w8a8_linear.default if self.threshold is None else ops.w8a8_outlier_linear.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # straight from the module's dicts: nn.Module.__getattr__ costs ~0.6 us a name, per call
        bufs, params = self._buffers, self._parameters
        try:
            codes, scale, act_scale, smooth = bufs["codes"], bufs["scale"], bufs["act_scale"], bufs["smooth"]
            bias = params["bias"] if "bias" in params else self.bias
        except KeyError:
            codes, scale, act_scale, smooth, bias = self.codes, self.scale, self.act_scale, self.smooth, self.bias
        if smooth is not None:
            # the same elementwise multiply the backend inserts (its constant is in x's dtype)
            x = x * smooth.to(x.dtype)
        n, k = self.out_features, self.in_features
        if self.threshold is None:  # the kernel without the dispatcher round trip where nothing needs it
            return direct.call_args_fast(_W8A8, (x, codes, scale, bias, act_scale, n, k), 3)
        return torch.ops.qbackend.w8a8_outlier_linear(x, codes, scale, bias, act_scale, self.threshold, n, k)

    def _apply(self, fn, recurse: bool = True):
        return apply_keeping_dtypes(self, super()._apply, fn, recurse, _FIXED_DTYPES)

    def extra_repr(self) -> str:
        smooth = self.smoothing or ("explicit multiply" if self.smooth is not None else "none")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}, smoothing={smooth}")  # fmt: skip


def _check(t: torch.Tensor | None, name: str, dtypes: tuple[torch.dtype, ...], numel: int) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"W8A8Linear: {name} must be a {want} tensor; got {got}")
    if t.numel() != numel:
        raise ValueError(f"W8A8Linear: {name} has {t.numel()} elements; expected {numel} (shape {tuple(t.shape)})")
