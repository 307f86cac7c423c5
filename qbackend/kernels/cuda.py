"""The ``"cuda"`` kernels of ``torch.ops.qbackend.*``: Triton when importable, else the reference.

Importing this module registers, for every op, a kernel that resolves its implementation on the
first CUDA call (importing Triton is slow and may fail on a machine without it): the function of
the same name in :mod:`qbackend.kernels.triton`, or the reference with one warning per function.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

from torch import Tensor

from . import ops
from . import reference as ref


@functools.cache
def impl(name: str) -> Callable[..., Tensor]:
    """The Triton function ``name`` (e.g. ``codebook_linear``), or the reference one (warned once)."""
    try:
        from . import triton as tk  # deferred: triton is heavy and optional

        return getattr(tk, name)
    except Exception as e:  # noqa: BLE001  (no Triton, no driver, a missing function: all mean "use the reference")
        warnings.warn(
            f"qbackend: no Triton kernel for {name} ({type(e).__name__}: {e}); using the slow reference "
            "implementation on the GPU",
            RuntimeWarning,
            stacklevel=3,
        )
        return getattr(ref, name)


def _lazy(name: str) -> Callable[..., Tensor] | None:
    if not hasattr(ref, name):
        return None

    def kernel(*args: object) -> Tensor:
        # The Triton kernels compute in fp32/fp16 and take no ``compute`` argument: other compute
        # modes run the reference, which defines them.
        if args and isinstance(args[-1], str):
            if args[-1] != "fp32":
                return getattr(ref, name)(*args)
            args = args[:-1]
        return impl(name)(*args)

    kernel.__name__ = name
    return kernel


ops.register_kernels("cuda", _lazy)
