"""ONNX Runtime's take on the demo's MiniLM, for a side-by-side row: fp32, 4-bit ``MatMulNBits``, dynamic int8.

Optional: needs ``onnxruntime`` and ``onnx`` (``bash benchmarks/setup_peers.sh``); :func:`unavailable`
says why not. The model is exported once with torch's TorchScript-based ONNX exporter (opset 17),
then transformed the way ORT's own tools do it:

* 4-bit: every MatMul with a constant 2-D weight becomes ``com.microsoft::MatMulNBits``
  (asymmetric 4-bit, blocks of 128 along K, quantized by ORT's ``quantize_matmul_4bits``, the
  routine its ``MatMulNBitsQuantizer`` calls), ``accuracy_level`` 4: int8 activations;
* int8: ``onnxruntime.quantization.quantize_dynamic`` of the MatMuls only (as qbackend quantizes
  only the linear layers; its default also quantizes the embedding table), int8 weights per output
  channel, dynamic uint8 activations.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ORT_BLOCK = 128
ORT_ACCURACY_LEVEL = 4


def unavailable() -> str | None:
    """Why the ONNX Runtime rows can't run here, or None."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (bash benchmarks/setup_peers.sh installs it)"
    return None


def matmul_nbits_weights(w_kn: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ORT's asymmetric 4-bit blocks of a ``[K, N]`` MatMul weight: (packed, scales, zero points, the
    fp32 ``[K, N]`` weight they stand for). K must be a multiple of ``block``."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = w_kn.shape
    if k % block:
        raise ValueError(f"MatMulNBits weight: K={k} is not a multiple of the block size {block}")
    kb = k // block
    packed = np.zeros((n, kb, block // 2), dtype=np.uint8)
    zp = np.zeros((n, (kb + 1) // 2), dtype=np.uint8)
    scales = np.zeros((n, kb), dtype=np.float32)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w_kn, dtype=np.float32), scales, zp, block, n, k, False)
    q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, kb, block).astype(np.float32)  # low nibble first
    z = np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1)[:, :kb].astype(np.float32)
    dequant = ((q - z[:, :, None]) * scales[:, :, None]).reshape(n, k).T
    return packed, scales.reshape(-1), zp.reshape(-1), np.ascontiguousarray(dequant)


def to_matmul_nbits(model_bytes: bytes, block: int = ORT_BLOCK, accuracy_level: int = ORT_ACCURACY_LEVEL) -> bytes:
    """Every MatMul whose weight is a 2-D float initializer (K a multiple of ``block``) -> MatMulNBits."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    for node in g.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        arr = numpy_helper.to_array(w) if w is not None else None
        if arr is None or arr.ndim != 2 or arr.dtype != np.float32 or arr.shape[0] % block:
            nodes.append(node)
            continue
        k, n = arr.shape
        packed, scales, zp, _ = matmul_nbits_weights(arr, block)
        base = node.input[1]
        g.initializer.extend([numpy_helper.from_array(packed, f"{base}_Q4"),
                              numpy_helper.from_array(scales, f"{base}_scales"),
                              numpy_helper.from_array(zp, f"{base}_zp")])  # fmt: skip
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{base}_Q4", f"{base}_scales", f"{base}_zp"],
                                      list(node.output), name=f"{node.name}_Q4", domain="com.microsoft", K=k, N=n,
                                      bits=4, block_size=block, accuracy_level=accuracy_level))  # fmt: skip
    used = {i for nd in nodes for i in nd.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model.SerializeToString()


def to_dynamic_int8(model_bytes: bytes) -> bytes:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        src.write_bytes(model_bytes)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8)
        return onnx.load(dst).SerializeToString()


class _Encoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_encoder(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bytes:
    """The encoder's last hidden state as ONNX (dynamic batch and sequence axes)."""
    import warnings

    f = io.BytesIO()
    axes = {name: {0: "batch", 1: "seq"} for name in ("input_ids", "attention_mask", "hidden")}
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(_Encoder(model).eval(), (batch["input_ids"], batch["attention_mask"]), f, dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"], dynamic_axes=axes,
                          opset_version=17)  # fmt: skip
    return f.getvalue()


def session(model_bytes: bytes, threads: int) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``run(batch) -> last hidden state`` on ORT's CPU provider with ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
        return torch.from_numpy(sess.run(None, feed)[0])

    return run


def weight_bytes(model_bytes: bytes) -> tuple[int, int]:
    """(bytes of all initializers, bytes of the MatMul/MatMulNBits/MatMulInteger weights)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(model_bytes)
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    lin = set()
    for nd in model.graph.node:
        if nd.op_type in ("MatMul", "MatMulInteger", "DynamicQuantizeMatMul"):
            lin.add(nd.input[1])
        elif nd.op_type == "MatMulNBits":
            lin.update(nd.input[1:4])
    return sum(sizes.values()), sum(sizes.get(n, 0) for n in lin)
