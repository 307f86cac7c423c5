"""Read a directory's tensors one at a time and hand each to what needs it, keeping as little as possible.

A stored tensor goes to its *assignments* (model parameters/buffers it becomes as is) and to the
*groups* that need it: a group (one layer) names the stored tensors it is built from and runs its
``build`` once all have arrived; tensors are released as soon as no pending group needs them. So
the memory held beyond the model being built is the tensors of incomplete groups, at most one
layer's (a float weight is quantized as soon as it is read).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..serialization import CheckpointError
from ..serialization.assign import set_tensor
from .directory import ShardSet


@dataclass(eq=False)
class Group:
    """One layer built from several stored tensors: ``build({stored name: tensor})`` once all are read."""

    name: str
    keys: frozenset[str]
    build: Callable[[dict[str, torch.Tensor]], None]
    got: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Plan:
    """What each stored tensor is for."""

    assign: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # stored -> [(model name, kind)]
    groups: list[Group] = field(default_factory=list)
    #: called on every tensor as read (e.g. a checksum check): ``check(stored name, tensor)``
    check: Callable[[str, torch.Tensor], None] | None = None

    def add_assign(self, stored: str, name: str, kind: str) -> None:
        self.assign.setdefault(stored, []).append((name, kind))

    def needed(self) -> set[str]:
        return set(self.assign) | {k for g in self.groups for k in g.keys}


def run(model: nn.Module, shards: ShardSet, plan: Plan, *, progress: bool, desc: str) -> None:
    """Read every tensor ``plan`` needs, shard by shard, and place or build it in ``model``."""
    needed = plan.needed()
    missing = sorted(needed - set(shards.tensors))
    if missing:
        where = shards.index_path or shards.directory
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]!r}{more} is missing from the shards; the model needs it")
    waiting: dict[str, list[Group]] = {}
    for g in plan.groups:
        for k in g.keys:
            waiting.setdefault(k, []).append(g)
    keys = [k for k in shards.keys_in_file_order() if k in needed]
    total = sum(shards.tensors[k].nbytes for k in keys)
    for key, t in _read_all(shards, keys, total, progress, desc):
        if plan.check is not None:
            plan.check(key, t)
        for name, kind in plan.assign.get(key, ()):
            set_tensor(model, name, t, kind, str(shards.tensors[key].file))
        for g in waiting.pop(key, ()):
            g.got[key] = t
            if len(g.got) == len(g.keys):
                got, g.got = g.got, {}
                g.build(got)  # the group's tensors are released here unless the layer keeps them
                del got
                _release_freed_memory()
        del t


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    """Hand the heap memory freed by a layer's quantization back to the OS.

    glibc keeps freed chunks below its (adaptive, up to 32 MB) mmap threshold in its arenas, one per
    thread: without this, the quantizer's temporaries of the largest layers stay resident for good.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _read_all(
    shards: ShardSet, keys: list[str], total: int, progress: bool, desc: str
) -> Iterable[tuple[str, torch.Tensor]]:
    from tqdm.auto import tqdm  # the progress bar library only when loading

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress,
              dynamic_ncols=True) as bar:  # fmt: skip
        for key in keys:
            t = shards.read(key)
            bar.set_postfix_str(key[-40:], refresh=False)
            yield key, t
            del t  # before the next read: one float tensor alive at a time
            bar.update(shards.tensors[key].nbytes)
