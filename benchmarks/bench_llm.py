"""LLM prefill and decode on the CPU: a TinyLlama-1.1B-sized Llama, float vs qbackend vs bitsandbytes vs llama.cpp.

The model: ``transformers.LlamaForCausalLM`` with TinyLlama-1.1B's dims (hidden 2048, 22 layers, 32
heads / 4 KV heads, intermediate 5632, vocab 32000), random weights from a fixed seed (no
download). Every method runs in its own subprocess (a clean peak RSS) on the same weights:

* ``fp32 eager``: the float model as transformers runs it (the reference);
* ``bf16 inductor``: the model in bf16 under ``torch.compile`` (static cache, ``dynamic=False``);
* ``qbackend <p> eager``: ``qbackend.quantize_(model, p)``, the quantized modules run eagerly;
* ``qbackend <p> compiled``: the same model then ``torch.compile(backend="qbackend")`` (static cache);
  for p in nf4, int4 (g128), int8, w8a8 (naive W8A8: per-token int8 activations, no SmoothQuant
  calibration: the speed of the int8 GEMM path, not an accuracy figure);
* ``bnb nf4``: every linear but ``lm_head`` replaced by bitsandbytes ``Linear4bit`` (NF4, blocks of
  64, nested), in eval mode (its CPU path);
* ``llama.cpp Q4_0 / Q4_K / Q8_0``: the same weights written to an F32 GGUF with the ``gguf``
  package (q/k rows permuted as llama.cpp's converter does), quantized by llama.cpp's own quantizer
  (``llama_model_quantize``, its default per-tensor choices: e.g. ``output.weight`` stays higher
  precision), run through llama-cpp-python's C API with the CPU's threads.

Per batch size B (1 and 8): prefill B x ``--prompt`` tokens in one forward call, then ``--decode``
greedy steps of B tokens; tokens/s = tokens / time; a warm-up run first (compilation, repacking),
then ``--repeats`` timed runs (median). Peak RSS: the process's high-water mark during the timed
runs (reset after set-up through /proc/self/clear_refs), and over the whole process (set-up
included: the fp32 model is built before quantizing). Methods run one after the other; with
``--rounds N`` the whole list runs N times in turn (method processes interleaved: A, B, A, B, ...)
and each figure is the median over the rounds, every round's figures kept in the JSON: on a shared
machine a single run of each method says more about the load than about the methods. This VM's memory
also changes speed for seconds to minutes, and separate processes may each catch another state: for a
ratio against llama.cpp, ``bench_decode_ab.py --ab llama.cpp`` runs both in one process, rounds interleaved.

    python benchmarks/bench_llm.py                               # all methods, batch 1 and 8 (~40 min)
    python benchmarks/bench_llm.py --methods 'fp32 eager,qbackend nf4 eager,llama.cpp Q4_0' --batches 1
    python benchmarks/bench_llm.py --quick                       # batch 1, 128+32 tokens, 5 methods
    python benchmarks/bench_llm.py --small                       # smoke: 2 layers, hidden 256, short runs
    python benchmarks/bench_llm.py --dims qwen0.5b ...           # Qwen2.5-0.5B's dims: a small LLM, short rows
    python benchmarks/bench_llm.py --compute fp32 ...            # qbackend's layers in exact fp32 (default auto)
    python benchmarks/bench_llm.py --check-gguf                  # llama.cpp on the F32 GGUF vs transformers
    python benchmarks/bench_llm.py --sdpa-gqa ...                # grouped-query SDPA also with a mask (static cache)
    python benchmarks/bench_llm.py --skip-module-guards ...      # compiled: torch's opt-in to skip module guards
    python benchmarks/bench_llm.py --no-size-asserts ...         # compiled: Inductor's size_asserts off

Compiled methods use transformers' static cache, whose decode steps pass an attention mask; with a
mask transformers does not use SDPA's ``enable_gqa`` and copies K and V to every query head first
(TinyLlama: 2 x 4.8 MB written and read per layer per token, which eager decoding with its dynamic
cache and no mask does not do). ``--sdpa-gqa`` sets ``TRANSFORMERS_SDPA_FORCE_GQA=1`` in the method
processes, so the compiled graphs call SDPA with ``enable_gqa`` instead.
    python benchmarks/bench_llm.py --rounds 3 --batches 1 --methods 'qbackend nf4 compiled,llama.cpp Q4_0'
    python benchmarks/bench_llm.py --list-methods
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 num_hidden_layers=22, vocab_size=32000)  # fmt: skip
SMALL = dict(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=1024)  # fmt: skip
#: Qwen2.5-0.5B's layer dims (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864) in the Llama
#: architecture, vocab 32000 as above: a small LLM whose rows are short (K = 896 for all but down_proj)
QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
              num_hidden_layers=24, vocab_size=32000)  # fmt: skip
DIMS = {"tinyllama": TINYLLAMA, "qwen0.5b": QWEN05}
QB_PRESETS = ("nf4", "int4", "int8", "w8a8")
# enum llama_ftype: ALL_F32, MOSTLY_Q4_0, MOSTLY_Q8_0, MOSTLY_Q4_K_M ("F32" is the converted file itself)
LLAMA_CPP_TYPES = {"F32": 0, "Q4_0": 2, "Q8_0": 7, "Q4_K": 15}
QUICK = ("fp32 eager", "qbackend nf4 eager", "qbackend int8 eager", "llama.cpp Q4_0", "llama.cpp Q8_0")
CACHE = Path(os.environ.get("QB_BENCH_CACHE", Path.home() / ".cache" / "qbackend-bench"))


def all_methods() -> list[str]:
    out = ["fp32 eager", "bf16 inductor"]
    out += [f"qbackend {p} eager" for p in QB_PRESETS]
    out += [f"qbackend {p} compiled" for p in QB_PRESETS]
    out += ["bnb nf4"] + [f"llama.cpp {q}" for q in LLAMA_CPP_TYPES if q != "F32"]
    return out


# ---- the model --------------------------------------------------------------------------------------------


def llama_config(dims: dict[str, int], max_len: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**dims, tie_word_embeddings=False, max_position_embeddings=max(max_len, 2048),
                       rms_norm_eps=1e-5, rope_theta=10000.0)  # fmt: skip


def build_model(cfg: Any, seed: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(cfg, dtype=torch.float32).eval()


def rss_mb(field: str = "VmRSS") -> float:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


def reset_peak_rss() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


# ---- torch methods ----------------------------------------------------------------------------------------


class TorchRunner:
    """prefill(ids [B, P]) -> last logits; step(tok [B, 1]) -> logits; a cache per batch size."""

    def __init__(self, model: torch.nn.Module, cfg: Any, compiled: bool, dtype: torch.dtype, max_len: int,
                 backend: str | None = None, options: dict[str, Any] | None = None,
                 skip_module_guards: bool = False, size_asserts: bool = True) -> None:  # fmt: skip
        self.model, self.cfg, self.dtype, self.max_len = model, cfg, dtype, max_len
        self.static = compiled
        if compiled:
            kw: dict[str, Any] = {"dynamic": False}
            if backend:
                kw.update(backend=backend, options=dict(options or {}))
            if skip_module_guards:  # torch.compile takes it out of the options before the backend sees them
                kw.setdefault("options", {})["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            if not size_asserts:  # Inductor's config, through qbackend's "inductor" option or Inductor's own options
                opts = kw.setdefault("options", {})
                if backend == "qbackend":
                    opts["inductor"] = {**opts.get("inductor", {}), "size_asserts": False}
                else:
                    opts["size_asserts"] = False
            self.fn = torch.compile(model, **kw)
        else:
            self.fn = model
        self.caches: dict[int, Any] = {}
        self.cache = None
        self.pos = 0

    def reset(self, batch: int) -> None:
        if self.static:
            if batch not in self.caches:
                from transformers import StaticCache

                c = StaticCache(config=self.cfg, max_cache_len=self.max_len)
                head_dim = self.cfg.hidden_size // self.cfg.num_attention_heads
                c.early_initialization(batch, self.cfg.num_key_value_heads, head_dim, self.dtype, torch.device("cpu"))
                self.caches[batch] = c
            self.cache = self.caches[batch]
            self.cache.reset()
        else:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.cfg)
        self.pos = 0

    def _call(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        pos = torch.arange(self.pos, self.pos + t).unsqueeze(0)
        out = self.fn(input_ids=ids, past_key_values=self.cache, use_cache=True, cache_position=pos[0],
                      position_ids=pos, logits_to_keep=1)  # fmt: skip
        self.pos += t
        return out.logits[:, -1]

    prefill = _call
    step = _call


def _options(preset: str, compute: str) -> dict[str, str]:
    """The qbackend options of a preset: weight-only presets take ``compute``; W8A8 is int8 by definition."""
    return {"preset": preset} if preset.startswith("w8a8") else {"preset": preset, "compute": compute}


def _quantize(model: torch.nn.Module, preset: str, compute: str = "auto") -> None:
    import logging

    import qbackend

    logging.getLogger("qbackend").setLevel(logging.ERROR)  # w8a8 without calibration: its notice, said above
    qbackend.quantize_(model, _options(preset, compute))


def _bnb(model: torch.nn.Module) -> None:
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        import bitsandbytes as bnb
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, torch.nn.Linear) and full != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True,
                                      quant_type="nf4")  # fmt: skip
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", blocksize=64)  # fmt: skip
                setattr(mod, cname, q.to("cpu").eval())


def torch_runner(method: str, cfg: Any, seed: int, max_len: int, compute: str = "auto",
                 skip_module_guards: bool = False, size_asserts: bool = True) -> TorchRunner:  # fmt: skip
    model = build_model(cfg, seed)
    if method == "fp32 eager":
        return TorchRunner(model, cfg, False, torch.float32, max_len)
    if method == "bf16 inductor":
        return TorchRunner(model.to(torch.bfloat16), cfg, True, torch.bfloat16, max_len,
                           skip_module_guards=skip_module_guards, size_asserts=size_asserts)  # fmt: skip
    if method == "bnb nf4":
        _bnb(model)
        return TorchRunner(model, cfg, False, torch.float32, max_len)
    m = re.fullmatch(r"qbackend (\S+) (eager|compiled)", method)
    if not m:
        raise SystemExit(f"unknown method {method!r}; see --list-methods")
    preset, form = m.groups()
    _quantize(model, preset, compute)
    if form == "eager":
        return TorchRunner(model, cfg, False, torch.float32, max_len)
    _register_backend()
    return TorchRunner(model, cfg, True, torch.float32, max_len, backend="qbackend",
                       options=_options(preset, compute), skip_module_guards=skip_module_guards,
                       size_asserts=size_asserts)  # fmt: skip


def _compute_modes(model: torch.nn.Module) -> dict[str, int]:
    """Resolved compute mode -> number of quantized layers running in it."""
    out: dict[str, int] = {}
    for mod in model.modules():
        mode = getattr(mod, "compute", None)
        if isinstance(mode, str):
            out[mode] = out.get(mode, 0) + 1
    return out


def _register_backend() -> None:
    import qbackend.core.backend

    if "qbackend" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(qbackend.core.backend.qbackend, name="qbackend")


# ---- llama.cpp --------------------------------------------------------------------------------------------


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k rows -> llama.cpp's rope layout (as convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: torch.nn.Module, cfg: Any, path: Path) -> None:
    """An F32 GGUF of ``model`` (llama architecture) with a placeholder SentencePiece vocabulary."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # Tokens are fed as ids; llama.cpp still needs a vocabulary of the model's size to load it.
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tokens = ["<unk>", "<s>", "</s>", *byte_tokens]
    tokens += [f"tok{i}" for i in range(len(tokens), cfg.vocab_size)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (cfg.vocab_size - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens[: cfg.vocab_size])
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types(types[: cfg.vocab_size])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _permute_rope(t, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = _permute_rope(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t.numpy()))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_file(cfg: Any, seed: int, qtype: str, threads: int) -> Path:
    """The cached GGUF of this model in ``qtype`` (F32 written first, then llama.cpp's quantizer)."""
    import llama_cpp

    CACHE.mkdir(parents=True, exist_ok=True)
    key = f"llama-h{cfg.hidden_size}-l{cfg.num_hidden_layers}-i{cfg.intermediate_size}-v{cfg.vocab_size}-s{seed}"
    f32 = CACHE / f"{key}-F32.gguf"
    if not f32.exists():
        tmp = f32.with_suffix(".tmp")
        write_gguf(build_model(cfg, seed), cfg, tmp)
        tmp.rename(f32)
        gc.collect()
    out = CACHE / f"{key}-{qtype}.gguf"
    if qtype != "F32" and not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_CPP_TYPES[qtype]
        params.nthread = threads
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize to {qtype} failed")
        tmp.rename(out)
    return out


class LlamaCppRunner:
    """The same prefill/step interface on llama.cpp's C API: B sequences, one llama_decode per call."""

    def __init__(self, path: Path, batch_max: int, max_len: int, threads: int, n_batch: int) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        self._log = lc.llama_log_callback(lambda *a: None)  # kept alive: llama.cpp calls it later
        lc.llama_log_set(self._log, ctypes.c_void_p())
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = batch_max * max_len
        cp.n_batch = cp.n_ubatch = max(n_batch, batch_max)
        cp.n_seq_max = batch_max
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(max(n_batch, batch_max), 0, 1)
        self.b, self.pos = 1, 0

    def reset(self, batch: int) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        self.b, self.pos = batch, 0

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        bt = self.batch
        bt.n_tokens = len(tokens)
        for i, (tok, pos, seq, want) in enumerate(tokens):
            bt.token[i], bt.pos[i], bt.n_seq_id[i] = tok, pos, 1
            bt.seq_id[i][0] = seq
            bt.logits[i] = want
        if self.lc.llama_decode(self.ctx, bt) != 0:
            raise RuntimeError("llama_decode failed")

    def _logits(self, rows: range) -> torch.Tensor:
        """Logits of these entries of the last batch, copied out of llama.cpp's buffer."""
        out = []
        for i in rows:
            ptr = ctypes.addressof(self.lc.llama_get_logits_ith(self.ctx, i).contents)
            out.append(torch.frombuffer((ctypes.c_float * self.n_vocab).from_address(ptr), dtype=torch.float32).clone())
        return torch.stack(out)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        last = []
        for s in range(b):  # one llama_decode per sequence (at most n_batch tokens per call)
            self._decode([(int(ids[s, j]), j, s, j == t - 1) for j in range(t)])
            last.append(self._logits(range(t - 1, t)))
        self.pos = t
        return torch.cat(last)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        self._decode([(int(tok[s, 0]), self.pos, s, True) for s in range(tok.shape[0])])
        self.pos += 1
        return self._logits(range(tok.shape[0]))


# ---- one method, in its own process ----------------------------------------------------------------------


@dataclass
class Timing:
    prefill_s: float
    decode_s: float


def run_once(r: Any, ids: torch.Tensor, decode: int) -> Timing:
    b = ids.shape[0]
    r.reset(b)
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = r.prefill(ids)
        t1 = time.perf_counter()
        tok = logits.argmax(-1).reshape(b, 1)
        for _ in range(decode):
            tok = r.step(tok).argmax(-1).reshape(b, 1)
        t2 = time.perf_counter()
    return Timing(t1 - t0, t2 - t1)


def child(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(a.threads or torch.get_num_threads())
    threads = torch.get_num_threads()
    dims = SMALL if a.small else DIMS[a.dims]
    max_len = a.prompt + a.decode + 8
    cfg = llama_config(dims, max_len)
    t0 = time.perf_counter()
    batches = [int(b) for b in a.batches.split(",")]
    if a.child.startswith("llama.cpp "):
        path = gguf_file(cfg, a.seed, a.child.split()[1], threads)
        file_mb = path.stat().st_size / 2**20
        runner: Any = LlamaCppRunner(path, max(batches), max_len, threads, a.prompt)
    else:
        runner = torch_runner(a.child, cfg, a.seed, max_len, a.compute, a.skip_module_guards, not a.no_size_asserts)
        file_mb = None
    gen = torch.Generator().manual_seed(a.seed + 1)
    out: dict[str, Any] = {"method": a.child, "threads": threads, "batches": {}, "file_mb": file_mb}
    if a.child.startswith("qbackend "):  # the arithmetic each quantized layer resolved to
        out["compute"] = _compute_modes(runner.model)
    setup = time.perf_counter() - t0
    for b in batches:
        ids = torch.randint(3, cfg.vocab_size, (b, a.prompt), generator=gen)
        t = time.perf_counter()
        run_once(runner, ids, min(a.decode, 2))  # warm-up: compiles both shapes, repacks, allocates the cache
        warm = time.perf_counter() - t
        reset_peak_rss()
        runs = [run_once(runner, ids, a.decode) for _ in range(a.repeats)]
        pre, dec = statistics.median(x.prefill_s for x in runs), statistics.median(x.decode_s for x in runs)
        out["batches"][b] = {"prefill_tok_s": b * a.prompt / pre, "decode_tok_s": b * a.decode / dec,
                             "prefill_s": pre, "decode_ms_per_step": 1e3 * dec / a.decode, "warmup_s": warm,
                             "peak_rss_mb_run": rss_mb("VmHWM")}  # fmt: skip
    out["setup_s"] = setup
    out["peak_rss_mb_process"] = _ru_maxrss_mb()
    return out


def _ru_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_gguf(a: argparse.Namespace) -> dict[str, float]:
    """The converted F32 GGUF run by llama.cpp vs the same model in transformers: last-position logits of a
    prompt (cosine, max abs difference): "the same weights" checked, rope permutation included."""
    torch.set_num_threads(a.threads or torch.get_num_threads())
    dims = SMALL if a.small else DIMS[a.dims]
    cfg = llama_config(dims, 64)
    ids = torch.randint(3, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(a.seed + 1))
    with torch.inference_mode():
        ref = build_model(cfg, a.seed)(input_ids=ids).logits[0, -1]
    r = LlamaCppRunner(gguf_file(cfg, a.seed, "F32", torch.get_num_threads()), 1, 64, torch.get_num_threads(), 64)
    r.reset(1)
    got = r.prefill(ids)[0]
    cos = torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=0)
    return {"cosine": float(cos), "max_abs": float((ref - got).abs().max()), "ref_abs_max": float(ref.abs().max())}


# ---- the parent: one subprocess per method ---------------------------------------------------------------


def run_method(method: str, a: argparse.Namespace) -> dict[str, Any]:
    args = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--prompt", str(a.prompt),
            "--decode", str(a.decode), "--batches", a.batches, "--repeats", str(a.repeats),
            "--seed", str(a.seed), "--compute", a.compute]  # fmt: skip
    if a.small:
        args.append("--small")
    args += ["--dims", a.dims]
    if a.skip_module_guards:
        args.append("--skip-module-guards")
    if a.no_size_asserts:
        args.append("--no-size-asserts")
    env = dict(os.environ, TRANSFORMERS_SDPA_FORCE_GQA="1") if a.sdpa_gqa else None
    if a.threads:
        args += ["--threads", str(a.threads)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=a.timeout, env=env)
    except subprocess.TimeoutExpired:  # one slow method must not lose the others' rows
        return {"method": method, "error": f"timed out after {a.timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
        return {"method": method, "error": f"exit {r.returncode}: {tail}", "wall_s": time.perf_counter() - t0}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


#: per-batch figures taken as the median over rounds (the rest: from the round nearest that median)
_ROUND_MEDIANS = ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_ms_per_step", "warmup_s")


def combine_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's rounds as one row: medians of the figures over the rounds that ran, the peak RSS the
    highest seen, each round's batch figures under ``rounds`` (errors counted; all failed: the first error)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {**runs[0], "rounds": len(runs)}
    out = dict(ok[0])
    out["batches"] = {}
    for b in ok[0]["batches"]:
        per = [r["batches"][b] for r in ok if b in r["batches"]]
        row = dict(per[0])
        for key in _ROUND_MEDIANS:
            row[key] = statistics.median(x[key] for x in per)
        row["peak_rss_mb_run"] = max(x["peak_rss_mb_run"] for x in per)
        row["rounds"] = [{k: x[k] for k in ("prefill_tok_s", "decode_tok_s")} for x in per]
        out["batches"][b] = row
    out["setup_s"] = statistics.median(r["setup_s"] for r in ok)
    out["peak_rss_mb_process"] = max(r["peak_rss_mb_process"] for r in ok)
    out["wall_s"] = sum(r.get("wall_s", 0.0) for r in runs)
    out["rounds"] = len(ok)
    if len(ok) < len(runs):
        out["failed_rounds"] = [r["error"] for r in runs if "error" in r]
    return out


def markdown(rows: list[dict[str, Any]], batches: list[int]) -> str:
    ref = next((r for r in rows if r["method"] == "fp32 eager" and "error" not in r), None)
    head = "| method | " + " | ".join(f"B={b} prefill tok/s | B={b} decode tok/s (vs fp32) | B={b} peak RSS MB"
                                      for b in batches) + " | set-up s |"  # fmt: skip
    lines = [head, "|---|" + "---:|" * (3 * len(batches) + 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | " + " | ".join(["-"] * 3 * len(batches)) + f" | - | {r['error']}")
            continue
        cells = []
        for b in batches:
            x = r["batches"].get(str(b)) or r["batches"].get(b)
            base = ref and (ref["batches"].get(str(b)) or ref["batches"].get(b))
            vs = f" ({x['decode_tok_s'] / base['decode_tok_s']:.2f}x)" if base else ""
            cells += [f"{x['prefill_tok_s']:.1f}", f"{x['decode_tok_s']:.2f}{vs}", f"{x['peak_rss_mb_run']:.0f}"]
        modes = ", ".join(f"{m} x{n}" for m, n in sorted(r.get("compute", {}).items()))
        name = r["method"] + (f" (compute {modes})" if modes else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['setup_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="", help="comma list (default: all; see --list-methods)")
    p.add_argument("--only", default="", help="regex over method names (e.g. '^qbackend' for the smoke test)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens per sequence")
    p.add_argument("--decode", type=int, default=128, help="decode steps")
    p.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (median)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the method list this many times in turn (interleaved processes); medians")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                   help="arithmetic of qbackend's weight-only layers (default auto: the fastest within the error "
                   "bound on this CPU; W8A8 is int8 whatever this says)")  # fmt: skip
    p.add_argument("--sdpa-gqa", action="store_true", help="TRANSFORMERS_SDPA_FORCE_GQA=1: no K/V copy per head")
    p.add_argument("--skip-module-guards", action="store_true",
                   help="compiled methods: guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe "
                        "(no guards on the model's modules: less per-call overhead; a user's opt-in, unsafe if "
                        "modules change after compiling)")  # fmt: skip
    p.add_argument("--no-size-asserts", action="store_true",
                   help="compiled methods: Inductor's size_asserts=False (no per-call size/stride asserts on the "
                        "graph's ~800 inputs; Dynamo's guards check them unless skipped)")  # fmt: skip
    p.add_argument("--dims", default="tinyllama", choices=sorted(DIMS),
                   help="the model's dims: TinyLlama-1.1B's (default) or Qwen2.5-0.5B's (short rows)")
    p.add_argument("--small", action="store_true", help="smoke run: 2 layers, hidden 256, vocab 1024, 16+4 tokens")
    p.add_argument("--quick", action="store_true", help=f"batch 1, 128+32 tokens, methods: {', '.join(QUICK)}")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per method")
    p.add_argument("--json", default="", help="write all figures as JSON here")
    p.add_argument("--list-methods", action="store_true")
    p.add_argument("--check-gguf", action="store_true", help="llama.cpp on the F32 GGUF vs transformers (logits)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    _common.add_threads_option(p)
    a = p.parse_args(argv)
    if a.small and a.prompt == 512 and a.decode == 128:
        a.prompt, a.decode = 16, 4
    if a.quick:
        a.batches, a.prompt, a.decode, a.methods = "1", 128, 32, a.methods or ",".join(QUICK)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    if a.check_gguf:
        print(json.dumps(check_gguf(a)))
        return 0
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] or all_methods()
    if a.only:
        methods = [m for m in methods if re.search(a.only, m)]
    if a.list_methods:
        print(json.dumps(methods))
        return 0
    dims = SMALL if a.small else DIMS[a.dims]
    notes = "; SDPA enable_gqa forced" if a.sdpa_gqa else ""
    notes += "; no guards on nn modules (skip_guard_on_all_nn_modules_unsafe)" if a.skip_module_guards else ""
    notes += "; Inductor size_asserts off" if a.no_size_asserts else ""
    print(_common.header(extra=f"model {json.dumps(dims)}; prefill {a.prompt}, decode {a.decode}, "
                               f"batches {a.batches}, repeats {a.repeats}{notes}"), flush=True)  # fmt: skip
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for k in range(a.rounds):
        for m in methods:
            res = run_method(m, a)
            runs[m].append(res)
            msg = res.get("error") or ", ".join(
                f"B={b}: prefill {x['prefill_tok_s']:.1f} tok/s, decode {x['decode_tok_s']:.2f} tok/s, "
                f"RSS {x['peak_rss_mb_run']:.0f} MB" for b, x in res["batches"].items())  # fmt: skip
            where = f"round {k + 1}/{a.rounds}, " if a.rounds > 1 else ""
            print(f"# {m} ({where}{res['wall_s']:.0f} s): {msg}", file=sys.stderr, flush=True)
    rows = [combine_rounds(runs[m]) for m in methods]
    if a.rounds > 1:
        print(f"\nmedians over {a.rounds} interleaved rounds")
    print("\n" + markdown(rows, [int(b) for b in a.batches.split(",")]))
    print(f"\n# {_common.load_line('load average at the end')}")
    if a.json:
        _common.write_json(a.json, {"machine": _common.machine_info(), "settings": vars(a), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
