"""examples/qat_minilm.py: its training text and evaluation sets (examples/data) are kept apart.

The out-of-domain sets measure whether the QAT recipe generalizes, so no training text (the demo's
calibration and training sentences, the broader examples/data/qat_training_text.txt) may repeat
or paraphrase one of their lines, and the training text must hold no text of their domains.
"""

import importlib.util
import random
import re
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[2] / "examples" / "qat_minilm.py"
STOP = set("a an the is are was were be of in on at to and or for by with from his her their its this that it".split())


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("qat_minilm_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _content_words(s: str) -> set[str]:
    return set(re.findall(r"[a-z']+", s.lower())) - STOP


def test_evaluation_sets_are_disjoint_from_every_training_text(example):
    sets = example.evaluation_sets()
    assert {k: len(v) for k, v in sets.items()} == {"held-out": 32, "docstrings": 40, "clinical": 32}
    training = {which: example.training_corpus(which) for which in example.CORPORA}
    assert set(training["calibration"]) < set(training["full"]) < set(training["broad"])
    broad = training["broad"]
    assert len(broad) >= 750 and len(set(broad)) == len(broad)
    for name, lines in sets.items():
        assert len(set(lines)) == len(lines), name
        assert not set(lines) & set(broad), name
        for e in lines:
            ew = _content_words(e)
            for t in broad:
                tw = _content_words(t)
                # A shared word or two is fine; a paraphrase of an evaluation line is not.
                assert len(tw & ew) / len(tw | ew) <= 0.3, f"training text {t!r} is too close to {name} line {e!r}"


def test_added_training_text_holds_no_programming_or_clinical_writing(example):
    added = example.read_lines(example.DATA / "qat_training_text.txt")
    assert len(added) >= 250
    # identifiers, exception names, docstring sections, API words; clinical vocabulary
    markers = re.compile(
        r"\w_\w|\w+Error\b|\b(Args|Returns|Raises):|\b(kwargs|tensor|iterator|dict|boolean|callback|argument|"
        r"deprecated|thread-safe|patient|mg|diagnos\w*|symptom\w*|dose|prescri\w*|clinic\w*|afebrile|ECG)\b",
        re.IGNORECASE,
    )
    for name, lines in example.evaluation_sets().items():  # the check can fail: it sees those domains
        assert name == "held-out" or sum(map(bool, map(markers.search, lines))) >= len(lines) // 5, name
    hits = [t for t in added if markers.search(t)]
    assert not hits, f"{len(hits)} added training lines look like an evaluation domain, e.g. {hits[0]!r}"


def test_read_lines_drops_comments_and_blank_lines(example, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# header\n\nfirst line\n  ## kind\nsecond line  \n", encoding="utf-8")
    assert example.read_lines(f) == ["first line", "second line"]


def test_training_texts_mix_recombinations_and_random_pieces(example):
    words = [s.split() for s in example.training_corpus("calibration")]
    vocab = ["alpha", "beta", "##s", "gamma"]
    texts = example.training_texts(random.Random(0), words, 200, vocab, random_frac=0.5)
    assert len(texts) == 200 and all(t.strip() for t in texts)
    pieces = [t for t in texts if all(re.fullmatch(r"(alpha|beta|gamma|s)s*", w) for w in t.split())]
    assert 60 <= len(pieces) <= 140  # about half, drawn at random
    assert not any("##" in t for t in texts)  # word pieces are joined to the word before them
    assert example.training_texts(random.Random(0), words, 50) == example.training_texts(random.Random(0), words, 50)
    with pytest.raises(ValueError, match="unknown corpus"):
        example.training_corpus("everything")


def test_diagnostic_ceiling_text_is_in_no_training_corpus(example):
    # the docstring-like lines of the "ceiling" measurement are read only through --diagnostic-text
    ceiling = example.read_lines(
        Path(__file__).parents[2] / "benchmarks/results/qat_generalize/ceiling_docstring_like.txt"
    )
    assert len(ceiling) >= 100
    for which in example.CORPORA:
        assert not set(ceiling) & set(example.training_corpus(which)), which


def test_pack_texts_joins_one_to_k_texts_in_order(example):
    texts = [f"t{i}" for i in range(100)]
    assert example.pack_texts(random.Random(0), texts, 5, 1) == texts[:5]
    packed = example.pack_texts(random.Random(0), texts, 20, 3)
    assert len(packed) == 20
    parts = [p.split() for p in packed]
    assert all(1 <= len(p) <= 3 for p in parts) and {len(p) for p in parts} == {1, 2, 3}
    assert [w for p in parts for w in p] == texts[: sum(map(len, parts))]  # consumed in order, none twice


def test_noisy_tokens_replaces_only_real_non_special_tokens(example):
    torch = pytest.importorskip("torch")
    ids = torch.tensor([[101, 2000, 2001, 2002, 102, 0], [101, 3000, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask}
    special = torch.tensor([0, 101, 102])
    assert torch.equal(example.noisy_tokens(batch, 0.0, 30522, special), ids)
    torch.manual_seed(0)
    noisy = example.noisy_tokens(batch, 1.0, 30522, special)
    real = mask.bool() & ~torch.isin(ids, special)
    assert torch.equal(noisy[~real], ids[~real])  # [CLS], [SEP] and padding kept
    assert bool((noisy[real] >= 999).all()) and bool((noisy[real] < 30522).all())
    assert not torch.equal(noisy[real], ids[real])


def test_teacher_input_hook_swaps_the_block_input_only_while_forced(example):
    forced = []
    args = ("student hidden", "mask")
    assert example.teacher_input(forced, 1, None, args) is None
    forced[:] = ["t0", "t1", "t2"]
    assert example.teacher_input(forced, 1, None, args) == ("t1", "mask")
