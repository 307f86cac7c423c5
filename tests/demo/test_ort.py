"""qbackend.demo.ort: ONNX Runtime's 4-bit and int8 transforms of an exported model (needs onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from qbackend.demo import ort  # noqa: E402


def _mlp_onnx() -> tuple[torch.nn.Module, bytes]:
    import io

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8)).eval()
    f = io.BytesIO()
    # 3-D input, as in a transformer: the exporter writes MatMul (+ Add), not Gemm
    torch.onnx.export(model, (torch.randn(2, 5, 256),), f, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}}, opset_version=17)  # fmt: skip
    return model, f.getvalue()


def test_matmul_nbits_weights_stand_for_what_ort_computes():
    w = np.random.default_rng(0).standard_normal((256, 40)).astype(np.float32)
    packed, scales, zp, deq = ort.matmul_nbits_weights(w, 128)
    assert packed.shape == (40, 2, 64) and scales.shape == (80,) and deq.shape == w.shape
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
    assert 0.01 < rel < 0.2  # a 4-bit quantization error: present, bounded
    with pytest.raises(ValueError, match="K=250"):
        ort.matmul_nbits_weights(w[:250], 128)


def test_to_matmul_nbits_rewrites_the_eligible_matmul_only():
    import onnx

    model, data = _mlp_onnx()
    q4 = ort.to_matmul_nbits(data, block=128, accuracy_level=0)
    ops = [n.op_type for n in onnx.load_from_string(q4).graph.node]
    assert ops.count("MatMulNBits") == 1 and "MatMul" in ops  # K=96 is not a multiple of 128: stays float
    import onnxruntime as rt

    x = torch.randn(3, 7, 256)
    y = torch.from_numpy(rt.InferenceSession(q4, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    assert 1e-3 < float((y - ref).norm() / ref.norm()) < 0.2  # the 4-bit first layer's error
    total, lin = ort.weight_bytes(q4)
    assert 0 < lin < total
