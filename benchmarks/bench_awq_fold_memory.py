"""Memory a compiled AWQ model holds beyond the user's own model: folded (exact) vs per-layer multiplies vs RTN.

    python benchmarks/bench_awq_fold_memory.py [--hidden 1024] [--intermediate 2816] [--layers 4] [--threads 2]

A Llama-architecture model with random weights (``transformers.LlamaForCausalLM``), calibrated on
random token ids (``qbackend.calibrate(..., hessian=True)``), compiled with ``backend="qbackend"``
(int4 g128, lm_head excluded) and called once. "held" is the sum of the CPU tensor storages alive
after the call that were not alive before compiling (a census of every live tensor, unique storages
by address; the model, its calibration and the inputs exist before): the quantized weights, AWQ's
folded norm weights / biases and multiplies, and any float copy kept. "float copies" counts the
live float tensors shaped like up_proj's weight ([intermediate, hidden]) that are not parameters of
the model (a copy of up_proj's folded rows would be one). Deterministic (no timing): the load does
not matter.
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402

import qbackend  # noqa: E402


def _storages() -> dict[int, int]:
    """Address -> bytes of the storage of every live CPU tensor (fake and meta tensors skipped)."""
    gc.collect()
    out: dict[int, int] = {}
    for o in _objects():
        if not isinstance(o, torch.Tensor) or isinstance(o, torch._subclasses.FakeTensor):
            continue
        try:
            if o.device.type != "cpu":
                continue
            st = o.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
        if ptr:
            out[ptr] = max(out.get(ptr, 0), nbytes)
    return out


def _objects() -> list:
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]


def _float_copies(model: torch.nn.Module, shapes: set[tuple[int, ...]]) -> int:
    params = {p.data_ptr() for p in model.parameters()}
    n = 0
    for o in _objects():
        if isinstance(o, torch.Tensor) and not isinstance(o, torch._subclasses.FakeTensor):
            try:
                if o.is_floating_point() and tuple(o.shape) in shapes and o.data_ptr() not in params:
                    n += 1
            except (RuntimeError, NotImplementedError):
                continue
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    _common.add_threads_option(parser)
    args = parser.parse_args()
    _common.apply_threads(args)
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                                   vocab_size=2000, max_position_embeddings=128)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    linear_params = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n != "lm_head")  # fmt: skip
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 2000, (2, 64), generator=g)} for _ in range(2)]
    cal = qbackend.calibrate(model, batches, hessian=True, progress=False)
    ids = torch.randint(0, 2000, (1, 16), generator=g)
    shapes = {(args.intermediate, args.hidden), (args.hidden, args.intermediate)}
    print(_common.header(extra=f"threads {torch.get_num_threads()}"))
    print(f"# Llama (random): hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{linear_params / 1e6:.1f} M linear params (fp32 {linear_params * 4 / 2**20:.0f} MiB), int4 g128\n")
    print("| method | held by the compiled model (MiB) | float [I, H] tensors not parameters |")
    print("|---|---:|---:|")
    methods = {
        "rtn": None,
        "awq, fold (exact)": {"name": "awq", "grid": 5, "clip": False, "fold": True},
        "awq, per-layer multiplies": {"name": "awq", "grid": 5, "clip": False, "fold": False},
    }
    for label, method in methods.items():
        opts = {"preset": "int4", "exclude": ["lm_head"]}
        if method is not None:
            opts.update(method=method, calibration=cal)
        torch._dynamo.reset()
        before = _storages()
        compiled = torch.compile(model, backend="qbackend", options=opts)
        with torch.no_grad():
            compiled(input_ids=ids)
        after = _storages()
        held = sum(b for p, b in after.items() if p not in before)
        print(f"| {label} | {held / 2**20:.1f} | {_float_copies(model, shapes)} |", flush=True)
        del compiled
    print(f"\n{_common.load_line()}")


if __name__ == "__main__":
    main()
