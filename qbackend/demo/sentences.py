"""The sentences the demo, the examples and the accuracy checks run MiniLM on (package data, ``data/*.txt``).

Written for this project, one sentence a line (``#`` lines are comments). Three disjoint sets:
``CALIBRATION_SENTENCES`` to calibrate/train on, ``EVALUATION_SENTENCES`` held out to measure
quality, and ``TRAINING_SENTENCES``, the larger corpus of the QAT proof.
"""

from __future__ import annotations

from importlib import resources


def read_sentences(name: str) -> tuple[str, ...]:
    """The sentences of ``data/<name>.txt`` in this package, comments and blank lines dropped."""
    text = resources.files(__package__).joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
    return tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#"))


CALIBRATION_SENTENCES: tuple[str, ...] = read_sentences("calibration_sentences")
EVALUATION_SENTENCES: tuple[str, ...] = read_sentences("evaluation_sentences")
TRAINING_SENTENCES: tuple[str, ...] = read_sentences("training_sentences")
