"""Fuzzing ``qbackend.load``: mutated checkpoint files, each loaded and run in a worker subprocess.

A checkpoint is untrusted input. Each mutated file must give a clear `CheckpointError`, or load and
compute exactly what the intact file computes; never a signal (segfault, abort), never a hang, never
another exception. The one exception: a *deliberately* edited manifest whose checksum was recomputed
(``resealed``) may describe another valid model (e.g. another activation function); such a file only
has to load cleanly or fail with a `CheckpointError` (counted as ``resealed-valid``).

>>> bases = make_bases(tmp_dir)                   # small models of every layer kind, saved
>>> stats = run_fuzz(bases, n=200, seed=0, workdir=tmp_dir)
>>> assert stats.failures == []

Workers (``python -m qbackend.testing.fuzz_checkpoints --worker``) read one file per line, answer
one line per file; the parent kills and replaces a worker that dies or overruns the per-file time.
"""

from __future__ import annotations

import json
import os
import random
import select
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: what a fuzzed file may end as (anything else is a failure)
GOOD = ("error", "ok-equal", "resealed-valid")


# ---- the base checkpoints ------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Two linears and a LayerNorm (the non-transformers base model)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.norm = nn.LayerNorm(96)
        self.down = nn.Linear(96, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(x))))


def _tiny_input() -> torch.Tensor:
    return torch.randn(2, 64, generator=torch.Generator().manual_seed(3))


def _bert_input() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 2, 7]])


@dataclass(frozen=True)
class Base:
    """An intact checkpoint: its path, how to rebuild its model ("tiny" or "bert") and its input."""

    path: Path
    model: str


def make_bases(directory: Path, bert: bool = True) -> list[Base]:
    """Save the base checkpoints (one per layer kind) into ``directory``."""
    import qbackend

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for preset in ("nf4", "fp4", "int4", "int8"):
        torch.manual_seed(0)
        m = TinyNet().eval()
        qbackend.quantize_(m, {"preset": preset, "min_params": 0})
        out.append(Base(qbackend.save(m, directory / f"tiny-{preset}.safetensors"), "tiny"))
    torch.manual_seed(0)
    m = TinyNet().eval()
    cal = qbackend.calibrate(m, [_tiny_input()], progress=False)
    qbackend.quantize_(m, {"preset": "w8a8", "calibration": cal, "min_params": 0}, example_inputs=_tiny_input())
    out.append(Base(qbackend.save(m, directory / "tiny-w8a8.safetensors"), "tiny"))
    if bert:
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                         vocab_size=50, max_position_embeddings=16)  # fmt: skip
        m = BertModel(cfg).eval()
        qbackend.quantize_(m, {"preset": "nf4", "min_params": 0})
        out.append(Base(qbackend.save(m, directory / "bert-nf4.safetensors"), "bert"))
    return out


# ---- mutations ------------------------------------------------------------------------------------


def _split(data: bytes) -> tuple[int, dict[str, Any], bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict[str, Any] | str, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _walk(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every (path, value) of a JSON value, containers included."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, i))


def _parent(obj: Any, path: tuple) -> Any:
    for p in path[:-1]:
        obj = obj[p]
    return obj


_ODD_VALUES = (None, 0, -1, 1, 2**31, 2**63, 1e308, -0.0, "", "x", "F32", "nf4", [], {}, [1, 2], {"a": 1}, True)


def _mutate_json(obj: Any, rng: random.Random) -> str:
    """One structural edit of a JSON value (in place): delete/rename/duplicate a key, change a value."""
    spots = [(p, v) for p, v in _walk(obj) if p]
    if not spots:
        return "none"
    path, value = rng.choice(spots)
    parent, key = _parent(obj, path), path[-1]
    op = rng.choice(("delete", "rename", "value", "value", "number", "type"))
    if op == "delete":
        del parent[key]
    elif op == "rename" and isinstance(parent, dict):
        parent[key + rng.choice(("_", "x", ".0"))] = parent.pop(key)
    elif op == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = rng.choice((value + 1, value - 1, value * 2, -value, 0, value * 1000 + 7))
    elif op == "type":
        parent[key] = [value] if not isinstance(value, list) else {"v": value}
    else:
        parent[key] = rng.choice(_ODD_VALUES)
    return op


def _flip(data: bytearray, lo: int, hi: int, rng: random.Random, bits: int) -> None:
    for _ in range(bits):
        pos = rng.randrange(lo, hi)
        data[pos] ^= 1 << rng.randrange(8)


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes, bool]:
    """A mutated copy of a checkpoint's bytes: ``(kind, bytes, resealed)``."""
    from ..serialization.manifest import DIGEST_KEY, METADATA_KEY

    n, header, body = _split(data)
    kind = rng.choice(("truncate", "flip-header", "flip-header", "flip-data", "header-json", "header-json",
                       "manifest-json", "manifest-json", "manifest-text", "duplicate-key", "tensor-entry"))  # fmt: skip
    resealed = False
    if kind == "truncate":
        return kind, data[: rng.randrange(0, len(data))], False
    if kind == "flip-header":
        out = bytearray(data)
        _flip(out, 0 if rng.random() < 0.05 else 8, 8 + n, rng, rng.choice((1, 1, 2, 4)))
        return kind, bytes(out), False
    if kind == "flip-data":
        out = bytearray(data)
        if len(out) > 8 + n:
            _flip(out, 8 + n, len(out), rng, rng.choice((1, 2, 8)))
        return kind, bytes(out), False
    if kind == "header-json":  # the safetensors header itself: dtypes, shapes, offsets, names
        names = [k for k in header if k != "__metadata__"]
        name = rng.choice(names)
        entry = header[name]
        edit = rng.choice(("dtype", "shape", "offsets", "delete", "rename", "duplicate"))
        if edit == "dtype":
            entry["dtype"] = rng.choice(("F32", "F16", "BF16", "I8", "U8", "I32", "I64", "F64", "BOOL"))
        elif edit == "shape":
            shape = entry["shape"]
            if shape and rng.random() < 0.7:
                i = rng.randrange(len(shape))
                shape[i] = rng.choice((0, 1, shape[i] + 1, shape[i] // 2, shape[i] * 2))
            else:
                entry["shape"] = rng.choice(([], [1], [*shape, 1], shape[::-1]))
        elif edit == "offsets":
            a, b = entry["data_offsets"]
            entry["data_offsets"] = rng.choice(([a, b - 1], [a + 1, b], [b, a], [a, a], [0, b]))
        elif edit == "delete":
            del header[name]
        elif edit == "rename":
            header[name + "x"] = header.pop(name)
        else:
            header[name + ".copy"] = dict(entry)
        return f"{kind}:{edit}", _join(header, body), False
    if kind == "duplicate-key":  # JSON with a key twice (json.loads keeps the last)
        text = json.dumps(header)
        names = [k for k in header if k != "__metadata__"]
        a, b = rng.sample(names, 2) if len(names) > 1 else (names[0], names[0])
        text = text.replace(json.dumps(b) + ":", json.dumps(a) + ":", 1)
        return kind, _join(text, body), False
    manifest = json.loads(header["__metadata__"][METADATA_KEY])
    resealed = rng.random() < 0.7  # mostly resealed: reaches the checks behind the checksum
    if kind == "manifest-json":
        op = _mutate_json(manifest, rng)
        kind = f"{kind}:{op}"
        text = json.dumps(manifest, sort_keys=True)
    elif kind == "tensor-entry":
        name = rng.choice(list(manifest["tensors"]))
        entry = manifest["tensors"][name]
        edit = rng.choice(("dtype", "shape", "delete", "uses"))
        if edit == "dtype":
            entry["dtype"] = rng.choice(("int8", "uint8", "float16", "int32"))
        elif edit == "shape":
            entry["shape"] = [*entry.get("shape", []), 1]
        elif edit == "delete":
            del manifest["tensors"][name]
        else:
            entry["uses"] = [[name + "x", "param"]]
        kind = f"{kind}:{edit}"
        text = json.dumps(manifest, sort_keys=True)
    else:  # manifest-text: the JSON text mangled (may not parse)
        text = header["__metadata__"][METADATA_KEY]
        i = rng.randrange(len(text))
        text = rng.choice((text[:i] + text[i + 1 :], text[:i] + rng.choice('{}[]",:0e-') + text[i:],
                           text[:i] + text[i + rng.randrange(1, 50):], text[:i]))  # fmt: skip
    if resealed:
        header["__metadata__"].update(seal_text(text))
    else:
        header["__metadata__"][METADATA_KEY] = text
        header["__metadata__"].setdefault(DIGEST_KEY, "0" * 32)
    return kind + (":resealed" if resealed else ""), _join(header, body), resealed


def seal_text(text: str) -> dict[str, str]:
    """The metadata entries of a manifest TEXT (which may not parse) with its true digest."""
    from ..serialization.manifest import DIGEST_KEY, METADATA_KEY, text_digest

    return {METADATA_KEY: text, DIGEST_KEY: text_digest(text)}


# ---- the worker ---------------------------------------------------------------------------------


def _build(model: str) -> Callable[[], nn.Module] | None:
    return TinyNet if model == "tiny" else None


def _input(model: str) -> torch.Tensor:
    return _tiny_input() if model == "tiny" else _bert_input()


def _run_one(path: str, model: str) -> torch.Tensor:
    import qbackend

    m = qbackend.load(path, model=_build(model))
    with torch.no_grad():
        out = m(_input(model))
    return out if isinstance(out, torch.Tensor) else out[0]


def _worker() -> int:
    from ..serialization import CheckpointError

    torch.set_num_threads(1)
    references: dict[str, torch.Tensor] = {}
    for line in sys.stdin:
        path, model, base, resealed = line.rstrip("\n").split("\t")
        try:
            if base not in references:
                references[base] = _run_one(base, model)
            try:
                out = _run_one(path, model)
            except CheckpointError as e:
                answer = "error\t" + str(e).replace("\n", " ")[:300]
            else:
                ref = references[base]
                same = out.shape == ref.shape and bool(torch.equal(out, ref))
                if same:
                    answer = "ok-equal\t"
                elif resealed == "1":
                    answer = "resealed-valid\t"
                else:
                    answer = "wrong-result\toutput differs from the intact file's"
        except Exception as e:  # noqa: BLE001  (reported to the parent as a failure, with its type)
            answer = f"other-error\t{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
    return 0


# ---- the parent ------------------------------------------------------------------------------------


@dataclass
class FuzzStats:
    """Outcome counts of a run and the failing cases (kept files, for reproducing)."""

    counts: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (file, outcome, detail)
    files: int = 0
    seconds: float = 0.0

    @property
    def crashes(self) -> int:
        return self.counts["crash"]

    @property
    def hangs(self) -> int:
        return self.counts["hang"]

    def table(self) -> str:
        rows = ["| outcome | files |", "|---|---|"]
        rows += [f"| {k} | {v} |" for k, v in sorted(self.counts.items())]
        return "\n".join(rows)


class _Worker:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qbackend.testing.fuzz_checkpoints", "--worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, bufsize=1,
        )  # fmt: skip

    def ask(self, line: str, timeout: float) -> tuple[str, str]:
        """("crash"|"hang"|outcome, detail) for one file."""
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._dead()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            return "hang", f"no answer in {timeout:.0f} s"
        answer = self.proc.stdout.readline()
        if not answer:
            return self._dead()
        outcome, _, detail = answer.rstrip("\n").partition("\t")
        return outcome, detail

    def _dead(self) -> tuple[str, str]:
        rc = self.proc.wait()
        return "crash", f"worker exited with {rc} (signal {-rc})" if rc < 0 else f"worker exited with {rc}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_fuzz(
    bases: list[Base], n: int, seed: int, workdir: Path, timeout: float = 120.0, progress: bool = False,
    start_timeout: float = 300.0,
) -> FuzzStats:  # fmt: skip
    """Mutate ``n`` files from ``bases`` (seeded), run each in a worker; returns the counts.

    Failures keep their file in ``workdir`` (others are deleted). ``timeout`` bounds one file;
    ``start_timeout`` the first file of a fresh worker (its imports).
    """
    rng = random.Random(seed)
    originals = {b.path: b.path.read_bytes() for b in bases}
    stats = FuzzStats()
    t0 = time.monotonic()
    worker = _Worker()
    fresh = True
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="file", desc="fuzzing")
    try:
        for i in range(n):
            base = bases[i % len(bases)]
            kind, data, resealed = mutate(originals[base.path], rng)
            path = workdir / f"fuzz-{seed}-{i}.safetensors"
            path.write_bytes(data)
            if not worker.alive:
                worker, fresh = _Worker(), True
            line = f"{path}\t{base.model}\t{base.path}\t{int(resealed)}"
            outcome, detail = worker.ask(line, start_timeout if fresh else timeout)
            fresh = False
            stats.counts[outcome] += 1
            stats.by_kind[(kind.split(":")[0], outcome)] += 1
            if outcome in GOOD:
                path.unlink()
            else:
                stats.failures.append((str(path), outcome, f"{kind}: {detail}"))
                if not worker.alive:
                    worker, fresh = _Worker(), True
            if bar is not None:
                bar.update(1)
    finally:
        worker.close()
        if bar is not None:
            bar.close()
    stats.files = n
    stats.seconds = time.monotonic() - t0
    return stats


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker())
    sys.exit("usage: python -m qbackend.testing.fuzz_checkpoints --worker (runs: benchmarks/fuzz_checkpoints.py)")
