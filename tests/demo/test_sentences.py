"""The demo's sentences (package data of ``qbackend.demo``): loaded from the package, the sets kept disjoint."""

import re
from importlib import resources

import pytest

from qbackend.demo import CALIBRATION_SENTENCES, EVALUATION_SENTENCES, TRAINING_SENTENCES, read_sentences

STOP = set("a an the is are was were be of in on at to and or for by with from his her their its this that it".split())


def _content_words(s: str) -> set[str]:
    return set(re.findall(r"[a-z']+", s.lower())) - STOP


def test_training_corpus_is_disjoint_from_evaluation_sentences():
    lines = list(TRAINING_SENTENCES)
    assert len(lines) >= 400 and len(set(lines)) == len(lines)
    for line in lines + list(CALIBRATION_SENTENCES):
        words = _content_words(line)
        for e in EVALUATION_SENTENCES:
            ew = _content_words(e)
            overlap = len(words & ew) / len(words | ew)
            # A shared topic word or two is fine; a paraphrase of an evaluation sentence is not.
            assert overlap <= 0.3, f"training sentence {line!r} is too close to evaluation sentence {e!r}"


def test_sentence_lists_are_the_package_data_files_without_comments():
    assert (len(CALIBRATION_SENTENCES), len(EVALUATION_SENTENCES)) == (64, 32)
    assert CALIBRATION_SENTENCES[0] == "The cat slept on the warm windowsill all afternoon."
    assert EVALUATION_SENTENCES[-1] == "The soup needs more salt and a little pepper."
    for name, sentences in [("calibration_sentences", CALIBRATION_SENTENCES),
                            ("evaluation_sentences", EVALUATION_SENTENCES),
                            ("training_sentences", TRAINING_SENTENCES)]:  # fmt: skip
        raw = resources.files("qbackend.demo").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
        assert raw.startswith("#")  # the header comment is dropped, every other line kept
        assert sentences == tuple(ln for ln in raw.splitlines() if ln and not ln.startswith("#"))
        assert all(s == s.strip() and s.endswith((".", "!", "?")) for s in sentences)
    assert not set(CALIBRATION_SENTENCES) & set(EVALUATION_SENTENCES)
    assert not set(TRAINING_SENTENCES) & (set(CALIBRATION_SENTENCES) | set(EVALUATION_SENTENCES))


def test_read_sentences_names_a_missing_file():
    with pytest.raises(FileNotFoundError, match="no_such_list.txt"):
        read_sentences("no_such_list")
