"""The description of the machine a benchmark ran on: CPU, cores, threads, GPU, versions, load.

Used by ``qbackend bench`` for the header of each run it appends to RESULTS.md, and by the
benchmark scripts (``benchmarks/_common.py``) for the first line of their output.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .._version import __version__

# Libraries whose version changes benchmark figures; read from their metadata, never imported.
VERSIONED = ("triton", "bitsandbytes", "torchao", "transformers")


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (elsewhere: what ``platform`` knows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Date, CPU, cores, torch threads, GPU (of ``device``, default the first CUDA one), versions, load."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "qbackend": __version__,
    }
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[name] = metadata.version(name)
    info["load_average"] = load_average()
    return info


def versions_line(info: dict[str, Any]) -> str:
    """``python 3.11.2, torch 2.13.0, ..., qbackend 0.1.0``: the versions ``info`` holds."""
    keys = ("python", "torch", *VERSIONED, "qbackend")
    return ", ".join(f"{k} {info[k]}" for k in keys if info.get(k))


def machine_line(info: dict[str, Any]) -> str:
    """``<cpu>, N cores (T torch threads), GPU: <name or none>``."""
    return (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
            f"GPU: {info['gpu'] or 'none'}")  # fmt: skip


def markdown_header(title: str, info: dict[str, Any]) -> str:
    """A markdown section header for a benchmark run: the title, the machine, the versions, the load."""
    lines = ["", f"## {title}", "", f"- machine: {machine_line(info)}", f"- versions: {versions_line(info)}"]
    if info.get("load_average"):
        lines.append(f"- load average at the start: {', '.join(f'{x:.2f}' for x in info['load_average'])}")
    return "\n".join([*lines, ""])
