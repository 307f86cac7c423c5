"""Triton kernels for quantized linear layers (CUDA; CPU tensors run through the Triton interpreter).

Forward functions have exactly the signatures and semantics of :mod:`qbackend.kernels.reference`
(weights in the canonical bitsandbytes flat layout, no re-layout needed)::

    codebook_linear(x, codes, absmax, nested_codes, nested_absmax, nested_offset, table, nested_table,
                    bias, out_features, in_features, blocksize, nested_blocksize)       # nf4, fp4
    int4_linear(x, codes, scale, zero_point, bias, out_features, in_features, groupsize)
    int8_linear(x, codes, scale, bias, out_features, in_features)
    w8a8_linear(x, codes, scale, bias, act_scale, out_features, in_features)

Grad-input functions of the weight-only ops (for QLoRA-style training through a frozen quantized
weight). Signature rule: ``(grad_y, *the forward's weight tensors without x and bias,
out_features, in_features, *the forward's remaining ints)``::

    codebook_linear_grad_input(grad_y, codes, absmax, nested_codes, nested_absmax, nested_offset, table,
                               nested_table, out_features, in_features, blocksize, nested_blocksize)
    int4_linear_grad_input(grad_y, codes, scale, zero_point, out_features, in_features, groupsize)
    int8_linear_grad_input(grad_y, codes, scale, out_features, in_features)

``grad_y`` is [..., N] (any leading shape); the result is grad_x = grad_y @ W, [..., K], in
grad_y's dtype, accumulated in fp32 (reference: ``grad_y.float() @ decode(...)``, cast back). W is
decoded tile by tile inside the kernel, except at large M (and for nested NF4/FP4 grads at any M),
where one layer's W is decoded to grad_y's dtype and ``torch.mm`` runs the product. W8A8 has no
grad-input kernel (its weights are not trained through).

Also exported: :func:`quantize_activations` (the per-token int8 activation quantizer of
``w8a8_linear``) and :mod:`.autotune` (configs, cache, ``override_config``).

Kernel variants (see ``_kernels.py``): for small M a wide GEMV (``linear.WIDE_GEMV``; K tiles over
several constant blocks, M rows per program, NF4/FP4 table per ``linear.LUT``) for the layouts and M
that ``linear.WIDE_ROWS`` sends to it (measured: NF4/FP4 at M <= 2) where the weight allows it (int8;
4-bit with even K, a power-of-two block size and, for NF4/FP4, K % blocksize == 0), else
GEMV for M == 1 (split-K, ``tl.sum``, fp32 atomics), split-K
``tl.dot`` for M <= 64 (M padded to 16), a tiled GEMM with grouped program order above; from M = 512
(3 for nested NF4/FP4) a decode kernel writes W in the activation dtype and cuBLAS runs the GEMM
(the weight rounds to 16 bits there as in the fused 16-bit dots). Nested NF4/FP4 up to
``linear.WIDE_DOT_ROWS`` rows (default 8, measured on an H200: 1.3-1.4x faster than decoding first on
large layers at M = 3..8) instead take a wide-K ``tl.dot`` kernel (K tiles over several constant blocks, as
the wide GEMV) where the wide GEMV's weight conditions hold and it does not take the rows; every one
specialised per format, block size, nesting, zero point and alignment (K % blocksize == 0 and even K:
one constant load per row and K tile; otherwise per-element flat indices, blocks may straddle rows).
Activations fp16/bf16/fp32 (fp32 dots use IEEE precision, 16-bit dots round the decoded weight to the
activation dtype). bf16 is not exercised under the interpreter, which computes bf16 wrongly: there
the tensor-core path runs in fp32.

Devices: CUDA tensors run compiled kernels; CPU tensors run the same kernels through the Triton
interpreter (slow; for tests), whatever ``TRITON_INTERPRET`` was when triton was imported.
Launches do no host synchronisation, so they can be captured in CUDA graphs (configs chosen before
capture are reused; during a capture an uncached key gets the heuristic config, never a tuning run).

Environment: ``QBACKEND_TRITON_AUTOTUNE=0`` (heuristic configs, no tuning), ``QBACKEND_TRITON_CACHE_DIR``
(per-GPU JSON cache of tuned configs; default ``~/.cache/qbackend/triton``), ``QBACKEND_WIDE_DOT_ROWS``
(start value of ``linear.WIDE_DOT_ROWS`` for NF4/FP4, e.g. 64; read at import).

Not provided here: an offline re-layout of the codes (the kernels read the canonical bitsandbytes
layout directly) and ``torch.library`` registration (:mod:`qbackend.kernels.cuda` registers these
functions as the ops' ``"cuda"`` kernels).
``python -m qbackend.kernels.triton.aot`` compiles every specialisation for sm_90 without a GPU.
"""

from . import autotune
from .linear import (
    codebook_linear,
    codebook_linear_grad_input,
    int4_linear,
    int4_linear_grad_input,
    int8_linear,
    int8_linear_grad_input,
    quantize_activations,
    w8a8_linear,
)

__all__ = [
    "autotune",
    "codebook_linear",
    "codebook_linear_grad_input",
    "int4_linear",
    "int4_linear_grad_input",
    "int8_linear",
    "int8_linear_grad_input",
    "quantize_activations",
    "w8a8_linear",
]
