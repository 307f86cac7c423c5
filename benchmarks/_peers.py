"""The peer libraries' quantized linear layers, built the way each library builds them, for the CPU benchmarks.

Every builder takes an fp32 weight ``w`` ``[N, K]`` and returns a :class:`Linear`: ``fn(x)`` for
``x`` ``[M, K]`` fp32 -> ``[M, N]`` fp32, the fp32 weight the method computes with (its own
dequantized weight: the error column measures arithmetic, not quantization), and the bytes of
weight storage one call reads. A library that is missing, or a shape it can't run, raises
:class:`Unavailable` with the reason (the scripts print it and go on). Install the peers with
``bash benchmarks/setup_peers.sh``.

* bitsandbytes ``Linear4bit`` NF4 in eval mode: its CPU inference path (repacks the weight on the
  first no-grad call, de-nests the constants, computes in bf16).
* ONNX Runtime ``MatMulNBits`` (contrib op): asymmetric 4-bit, quantized by ORT's own
  ``quantize_matmul_4bits`` (what its ``MatMulNBitsQuantizer`` calls); ``accuracy_level`` 0 = fp32
  compute, 4 = int8 activations.
* ONNX Runtime ``quantize_dynamic`` of an fp32 MatMul graph (int8 weights per channel, dynamic
  uint8 activations): what its tools do to a model.
* ggml (llama.cpp) ``ggml_mul_mat`` through ctypes on the libraries llama-cpp-python builds,
  weights quantized by ``ggml_quantize_chunk`` (llama.cpp's quantizer); ``repack``: the weight
  lives in the CPU_REPACK buffer (the interleaved layout llama.cpp uses for Q4_0/Q4_K on AVX2+
  CPUs when it loads a model), else in a plain CPU buffer. Activations are converted to Q8_0/Q8_K
  inside the op (int8 dot products), as in llama.cpp.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Linear", "Unavailable", "bnb_linear4bit", "ggml_linear", "ort_dynamic_int8", "ort_matmul_nbits"]


class Unavailable(RuntimeError):
    """This method can't run here (library missing, shape unsupported); the message says why."""


@dataclass
class Linear:
    fn: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor  # fp32 [N, K]: what fn computes with
    nbytes: int  # weight storage read per call
    clone: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None  # a distinct copy (cold mode)


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


# ---- bitsandbytes --------------------------------------------------------------------------------------


def bnb_linear4bit(w: torch.Tensor) -> Linear:
    try:
        with _quiet():
            import bitsandbytes as bnb
            import bitsandbytes.functional as bf
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"bitsandbytes not importable ({type(e).__name__})") from e
    n, k = w.shape
    with _quiet():
        qw, st = bf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
        wd = bf.dequantize_4bit(qw, st).float()
        lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                                quant_type="nf4")  # fmt: skip
        lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4",
                                       blocksize=64)  # fmt: skip
        lin = lin.to("cpu").eval()  # .to() is what quantizes a Params4bit
        with torch.inference_mode():
            lin(torch.randn(1, k))  # the first no-grad call repacks
    nbytes = sum(t.numel() * t.element_size() for t in [lin.weight.data, *_bnb_state_tensors(lin)])

    def clone() -> Callable[[torch.Tensor], torch.Tensor]:
        return copy.deepcopy(lin)

    return Linear(lin, wd, nbytes, clone)


def _bnb_state_tensors(lin: torch.nn.Module) -> list[torch.Tensor]:
    st = getattr(lin.weight, "quant_state", None)
    out = [getattr(st, "absmax", None)]
    return [t for t in out if isinstance(t, torch.Tensor)]


# ---- ONNX Runtime --------------------------------------------------------------------------------------


def _ort():
    try:
        with _quiet():
            import onnx
            import onnxruntime as ort
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"onnxruntime/onnx not importable ({type(e).__name__}); run benchmarks/setup_peers.sh") from e
    return ort, onnx


def _session(model_bytes: bytes, threads: int):
    ort, _ = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _runner(model_bytes: bytes, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    sess = _session(model_bytes, threads)
    return lambda x: torch.from_numpy(sess.run(None, {"A": x.numpy()})[0])


def ort_matmul_nbits(w: torch.Tensor, block: int, accuracy_level: int, threads: int) -> Linear:
    ort, onnx = _ort()
    from onnx import TensorProto, helper, numpy_helper

    from qbackend.demo.ort import matmul_nbits_weights

    n, k = w.shape
    if k % block:
        raise Unavailable(f"K={k} is not a multiple of block {block}")
    packed, scales, zp, wd_kn = matmul_nbits_weights(w.t().numpy(), block)  # ORT's quantizer; B is [K, N]
    wd = torch.from_numpy(wd_kn.T.copy())
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=4, block_size=block, accuracy_level=accuracy_level)  # fmt: skip
    graph = helper.make_graph(
        [node], "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales"),
         numpy_helper.from_array(zp.reshape(-1), "zp")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    data = model.SerializeToString()
    return Linear(_runner(data, threads), wd, packed.nbytes + scales.nbytes + zp.nbytes, lambda: _runner(data, threads))


def ort_dynamic_int8(w: torch.Tensor, threads: int, tmp: Path) -> Linear:
    ort, onnx = _ort()
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.t().numpy()), "W")],
    )  # fmt: skip
    src, dst = tmp / f"matmul_{n}x{k}.onnx", tmp / f"matmul_{n}x{k}.int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    with _quiet():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
    qmodel = onnx.load(dst)
    inits = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    codes = next(v for v in inits.values() if v.dtype in (np.int8, np.uint8) and v.ndim == 2)  # [K, N]
    scale = next(v for name, v in inits.items() if name.startswith("W") and "scale" in name)
    zero = next((v for name, v in inits.items() if name.startswith("W") and "zero_point" in name), np.zeros(1))
    wd = torch.from_numpy(((codes.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)).T.copy())
    data = qmodel.SerializeToString()
    return Linear(_runner(data, threads), wd, codes.nbytes + scale.nbytes, lambda: _runner(data, threads))


# ---- ggml (llama.cpp) ----------------------------------------------------------------------------------

GGML_TYPES = {"Q4_0": 2, "Q8_0": 8, "Q4_K": 12}
_GGML_TYPE_CPU_DEVICE = 0  # enum ggml_backend_dev_type: GGML_BACKEND_DEVICE_TYPE_CPU


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _Ggml:
    """The few ggml functions the benchmark calls, from llama-cpp-python's shared libraries."""

    _instance: _Ggml | None = None

    def __init__(self) -> None:
        try:
            with _quiet():
                import llama_cpp
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"llama_cpp not importable ({type(e).__name__}); run benchmarks/setup_peers.sh") from e
        lib = Path(llama_cpp.__file__).parent / "lib"
        mode = os.RTLD_GLOBAL if hasattr(os, "RTLD_GLOBAL") else 0
        try:
            self.base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=mode)
            self.ggml = ctypes.CDLL(str(lib / "libggml.so"), mode=mode)
            self.cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"), mode=mode)
        except OSError as e:
            raise Unavailable(f"ggml libraries not found under {lib}: {e}") from e
        vp, sz, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
        sig = {
            (self.base, "ggml_init"): (vp, [_InitParams]),
            (self.base, "ggml_free"): (None, [vp]),
            (self.base, "ggml_tensor_overhead"): (sz, []),
            (self.base, "ggml_graph_overhead"): (sz, []),
            (self.base, "ggml_new_tensor_2d"): (vp, [vp, ctypes.c_int, i64, i64]),
            (self.base, "ggml_mul_mat"): (vp, [vp, vp, vp]),
            (self.base, "ggml_new_graph"): (vp, [vp]),
            (self.base, "ggml_build_forward_expand"): (None, [vp, vp]),
            (self.base, "ggml_get_data"): (vp, [vp]),
            (self.base, "ggml_nbytes"): (sz, [vp]),
            (self.base, "ggml_row_size"): (sz, [ctypes.c_int, i64]),
            (self.base, "ggml_quantize_chunk"): (sz, [ctypes.c_int, vp, vp, i64, i64, i64, vp]),
            (self.base, "ggml_backend_tensor_set"): (None, [vp, vp, sz, sz]),
            (self.base, "ggml_backend_graph_compute"): (ctypes.c_int, [vp, vp]),
            (self.base, "ggml_backend_buft_name"): (ctypes.c_char_p, [vp]),
            (self.base, "ggml_backend_alloc_ctx_tensors_from_buft"): (vp, [vp, vp]),
            (self.base, "ggml_backend_alloc_ctx_tensors"): (vp, [vp, vp]),
            (self.base, "ggml_backend_dev_backend_reg"): (vp, [vp]),
            (self.base, "ggml_backend_reg_get_proc_address"): (vp, [vp, ctypes.c_char_p]),
            (self.ggml, "ggml_backend_dev_by_type"): (vp, [ctypes.c_int]),
            (self.cpu, "ggml_backend_cpu_init"): (vp, []),
            (self.cpu, "ggml_backend_cpu_set_n_threads"): (None, [vp, ctypes.c_int]),
            (self.cpu, "ggml_backend_cpu_buffer_type"): (vp, []),
        }
        for (so, name), (res, args) in sig.items():
            f = getattr(so, name)
            f.restype, f.argtypes = res, args
            setattr(self, name, f)
        # ggml logs every repacked tensor to stderr: silence it (the callback is kept alive on self)
        self._log = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *_: None)
        self.base.ggml_log_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.base.ggml_log_set(ctypes.cast(self._log, ctypes.c_void_p), None)
        self.backend = self.ggml_backend_cpu_init()
        self.version = getattr(llama_cpp, "__version__", "?")

    @classmethod
    def get(cls) -> _Ggml:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def repack_buffer_type(self) -> int:
        dev = self.ggml_backend_dev_by_type(_GGML_TYPE_CPU_DEVICE)
        reg = self.ggml_backend_dev_backend_reg(dev)
        addr = self.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not addr:
            raise Unavailable("this ggml build has no extra CPU buffer types (no CPU_REPACK)")
        get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
        arr = get(dev)
        i = 0
        while arr[i]:
            if self.ggml_backend_buft_name(arr[i]) == b"CPU_REPACK":
                return arr[i]
            i += 1
        raise Unavailable("no CPU_REPACK buffer type in this ggml build")

    def ctx(self, tensors: int, graph: bool = False) -> int:
        size = tensors * self.ggml_tensor_overhead() + (self.ggml_graph_overhead() if graph else 0) + 1024
        return self.ggml_init(_InitParams(size, None, True))


_KEEP: list[object] = []  # ggml contexts/buffers of live methods (never freed: a benchmark process is short-lived)


def _ggml_weight(g: _Ggml, qtype: int, k: int, n: int, qdata: np.ndarray, repack: bool) -> int:
    ctx = g.ctx(1)
    t = g.ggml_new_tensor_2d(ctx, qtype, k, n)
    buft = g.repack_buffer_type() if repack else g.ggml_backend_cpu_buffer_type()
    buf = g.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
    if not buf:
        raise Unavailable("ggml could not allocate the weight buffer")
    g.ggml_backend_tensor_set(t, qdata.ctypes.data, 0, qdata.nbytes)  # the repack buffer repacks here
    _KEEP.extend([ctx, buf])
    return t


def _ggml_matmul(g: _Ggml, wt: int, k: int, n: int, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(x) for a weight tensor; one graph per M, its input and output viewed as torch tensors."""
    graphs: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def build(m: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        ctx = g.ctx(2, graph=True)
        x = g.ggml_new_tensor_2d(ctx, 0, k, m)  # f32 [M rows of K]
        y = g.ggml_mul_mat(ctx, wt, x)  # f32 [M rows of N]
        gf = g.ggml_new_graph(ctx)
        g.ggml_build_forward_expand(gf, y)
        buf = g.ggml_backend_alloc_ctx_tensors(ctx, g.backend)
        _KEEP.extend([ctx, buf])
        xv = torch.frombuffer((ctypes.c_float * (m * k)).from_address(g.ggml_get_data(x)), dtype=torch.float32)
        yv = torch.frombuffer((ctypes.c_float * (m * n)).from_address(g.ggml_get_data(y)), dtype=torch.float32)
        return gf, xv.view(m, k), yv.view(m, n)

    def fn(x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if m not in graphs:
            graphs[m] = build(m)
        gf, xv, yv = graphs[m]
        xv.copy_(x)  # the input into ggml's buffer (M*K floats; small next to the product)
        g.ggml_backend_cpu_set_n_threads(g.backend, threads)
        if g.ggml_backend_graph_compute(g.backend, gf) != 0:
            raise RuntimeError("ggml_backend_graph_compute failed")
        return yv  # overwritten by the next call of this M

    return fn


def ggml_linear(w: torch.Tensor, qname: str, repack: bool, threads: int) -> Linear:
    g = _Ggml.get()
    try:
        import gguf
    except Exception as e:  # noqa: BLE001
        raise Unavailable("the gguf package is not installed (dequantizes for the error column)") from e
    n, k = w.shape
    qtype = GGML_TYPES[qname]
    block = 256 if qname.endswith("_K") else 32
    if k % block:
        raise Unavailable(f"{qname} needs K % {block} == 0 (K={k})")
    if repack and n % 8:
        raise Unavailable(f"CPU_REPACK of {qname} needs N % 8 == 0 (N={n})")
    src = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    row = g.ggml_row_size(qtype, k)
    qdata = np.zeros(n * row, dtype=np.uint8)
    g.ggml_quantize_chunk(qtype, src.ctypes.data, qdata.ctypes.data, 0, n, k, None)
    wd = torch.from_numpy(gguf.quants.dequantize(qdata.reshape(n, row), gguf.GGMLQuantizationType[qname]).copy())

    def make() -> Callable[[torch.Tensor], torch.Tensor]:
        return _ggml_matmul(g, _ggml_weight(g, qtype, k, n, qdata, repack), k, n, threads)

    return Linear(make(), wd.reshape(n, k).float(), qdata.nbytes, make)


def ggml_version() -> str | None:
    try:
        return _Ggml.get().version
    except Unavailable:
        return None
