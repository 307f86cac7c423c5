"""The fast part of the checkpoint fuzzing (the long run: benchmarks/fuzz_checkpoints.py).

* byte- and header-level mutations of real checkpoints, each loaded and run in a worker subprocess:
  a `CheckpointError` or the intact file's exact output, never a signal, a hang or another error;
* hypothesis over manifest edits (resealed, so they reach every field check), in process: a
  `CheckpointError` or a model that loads and runs.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qbackend
from qbackend.serialization import CheckpointError
from qbackend.serialization.manifest import seal
from qbackend.testing.fuzz_checkpoints import GOOD, TinyNet, make_bases, mutate, run_fuzz


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return make_bases(tmp_path_factory.mktemp("bases"), bert=True)


def test_mutated_checkpoints_never_crash_hang_or_mislead(bases, tmp_path):
    stats = run_fuzz(bases, n=150, seed=1234, workdir=tmp_path, timeout=60)
    assert stats.failures == [], stats.failures[:5]
    assert stats.crashes == 0 and stats.hangs == 0
    assert set(stats.counts) <= set(GOOD) and stats.counts["error"] > 0 and stats.files == 150


def test_every_mutation_kind_is_produced(bases):
    rng = random.Random(0)
    data = bases[0].path.read_bytes()
    kinds = {mutate(data, rng)[0].split(":")[0] for _ in range(300)}
    assert kinds == {"truncate", "flip-header", "flip-data", "header-json", "manifest-json", "manifest-text",
                     "duplicate-key", "tensor-entry"}  # fmt: skip


def _manifest(path) -> tuple[dict, dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    return header, json.loads(header["__metadata__"]["qbackend"]), data[8 + n :]


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 2**40) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=6)  # fmt: skip


@settings(max_examples=40)
@given(data=st.data())
def test_hypothesis_manifest_edits_are_checkpoint_errors_or_load(bases, tmp_path_factory, data):
    base = bases[data.draw(st.integers(0, 4))]  # the TinyNet checkpoints (rebuilt with model=TinyNet)
    header, manifest, body = _manifest(base.path)
    paths = []

    def collect(obj, path=()):
        paths.append(path)
        if isinstance(obj, dict):
            for k, v in obj.items():
                collect(v, (*path, k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                collect(v, (*path, i))

    collect(manifest)
    where = data.draw(st.sampled_from(paths[1:]))
    parent = manifest
    for p in where[:-1]:
        parent = parent[p]
    if data.draw(st.booleans()):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(JSON)
    header["__metadata__"].update(seal(manifest))
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path = tmp_path_factory.mktemp("edit") / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    try:
        m = qbackend.load(path, model=TinyNet)
    except CheckpointError:
        return
    with torch.no_grad():
        assert m(torch.randn(2, 64)).shape == (2, 32)
