"""Public test helpers for graph rewrites: capture the graph a backend receives, generate models with
linears in every form (hypothesis strategies), and check a rewrite's invariants.

The strategies need ``hypothesis`` (the ``test`` extra); they load on first use.
:mod:`.fuzz_checkpoints` mutates checkpoint files and loads each in a worker subprocess.
"""

from __future__ import annotations

from typing import Any

from .capture import CapturedGraph, capture_graph, capture_graphs
from .checkers import (
    CheckReport,
    RewriteCheckError,
    assert_close_to_float,
    assert_idempotent,
    assert_lints,
    assert_lowers_reported,
    assert_matches_dequantized,
    check_rewrite,
    error_bound,
    quantized_op_nodes,
    relative_error,
)

_STRATEGIES = ("FORMS", "GeneratedModel", "LayerSpec", "ModelCase", "ModelSpec", "linear_models", "model_specs",
               "quant_configs")  # fmt: skip

__all__ = [
    "CapturedGraph",
    "CheckReport",
    "RewriteCheckError",
    "assert_close_to_float",
    "assert_idempotent",
    "assert_lints",
    "assert_lowers_reported",
    "assert_matches_dequantized",
    "capture_graph",
    "capture_graphs",
    "check_rewrite",
    "error_bound",
    "quantized_op_nodes",
    "relative_error",
    *_STRATEGIES,
]


def __getattr__(name: str) -> Any:
    if name in _STRATEGIES:
        try:
            from . import strategies  # hypothesis is a test-only dependency
        except ImportError as e:
            raise ImportError(f"qbackend.testing.{name} needs hypothesis: pip install 'qbackend[test]' ({e})") from None
        return getattr(strategies, name)
    raise AttributeError(f"module 'qbackend.testing' has no attribute {name!r}")
