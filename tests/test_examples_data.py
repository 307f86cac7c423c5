"""The QAT proof's training text must stay disjoint from the held-out evaluation sentences."""

import re
from pathlib import Path

from qbackend.minilm import CALIBRATION_SENTENCES, EVALUATION_SENTENCES

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "qat_training_sentences.txt"
STOP = set("a an the is are was were be of in on at to and or for by with from his her their its this that it".split())


def _content_words(s: str) -> set[str]:
    return set(re.findall(r"[a-z']+", s.lower())) - STOP


def _corpus() -> list[str]:
    return [ln.strip() for ln in CORPUS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_training_corpus_is_disjoint_from_evaluation_sentences():
    lines = _corpus()
    assert len(lines) >= 400 and len(set(lines)) == len(lines)
    for line in lines + list(CALIBRATION_SENTENCES):
        words = _content_words(line)
        for e in EVALUATION_SENTENCES:
            ew = _content_words(e)
            overlap = len(words & ew) / len(words | ew)
            # A shared topic word or two is fine; a paraphrase of an evaluation sentence is not.
            assert overlap <= 0.3, f"training sentence {line!r} is too close to evaluation sentence {e!r}"
