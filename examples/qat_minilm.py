"""QAT proof: distil the real MiniLM (all-MiniLM-L6-v2) into its own NF4 version through the backend.

Teacher: the fp32 model. Student: a copy, prepared for QAT in the deployed format (NF4, blocks of
64, nested constants, learnable clipping ratios started from activation-aware clipping) and trained
with ``torch.compile(backend="qbackend")`` to reproduce the teacher's hidden states and sentence
embeddings. Training text: CALIBRATION_SENTENCES plus the ~430 sentences of
``TRAINING_SENTENCES`` (``qbackend/demo/data/``, written for this project, disjoint from the evaluation
set), and fresh recombinations every step (spans of two sentences joined, shuffled words of three):
the teacher labels any text, and a small fixed set is memorised rather than learned from (64
sentences alone: 0.999 cosine on them, 0.991 held out). Then the student is deployed (no_grad: the
real NF4 ops) and its embeddings of the held-out EVALUATION_SENTENCES are compared with fp32, next
to plain NF4 post-training quantization (PTQ). Target: >= 0.993 mean cosine (70% of PTQ's gap).

    python examples/qat_minilm.py                 # ~5-8 minutes on a 2-core CPU
    python examples/qat_minilm.py --steps 100     # quicker, less accurate
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import qbackend
from qbackend.demo import (
    CALIBRATION_SENTENCES,
    EVALUATION_SENTENCES,
    TRAINING_SENTENCES,
    embedding_quality,
    load_minilm,
)
from qbackend.qat import QATConfig, calibrate_clipping, prepare


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of the weights")
    p.add_argument("--ratio-lr", type=float, default=1e-3, help="learning rate of the learnable clipping ratios")
    p.add_argument("--no-learnable-scales", action="store_true", help="plain absmax scales (no LSQ ratios)")
    p.add_argument("--hidden-weight", type=float, default=1.0, help="weight of the per-token hidden-state loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument(
        "--corpus",
        choices=["full", "calibration"],
        default="full",
        help="training text: CALIBRATION_SENTENCES + TRAINING_SENTENCES (full) or the former alone",
    )
    p.add_argument(
        "--no-clip-init",
        action="store_true",
        help="start the learnable ratios at 1 (absmax), not from activation-aware clipping",
    )
    p.add_argument("--cos-weight", type=float, default=100.0, help="weight of the embedding cosine loss")
    return p.parse_args()


TARGET = 0.993  # the bar: >= 70% of PTQ's gap to 1.0 recovered (PTQ NF4 ~0.974 here)


def training_corpus(which: str) -> list[str]:
    """The sentences to train on: CALIBRATION_SENTENCES, plus (``"full"``) the written corpus TRAINING_SENTENCES."""
    return list(CALIBRATION_SENTENCES) + (list(TRAINING_SENTENCES) if which == "full" else [])


def training_texts(rng: random.Random, words: list[list[str]], n: int) -> list[str]:
    """``n`` texts from the calibration sentences: originals, joined spans of two, shuffled words of three."""
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.3:
            out.append(" ".join(rng.choice(words)))
        elif u < 0.7:
            a, b = rng.sample(words, 2)
            i, j = rng.randrange(len(a)), rng.randrange(len(b))
            out.append(" ".join(a[i : i + rng.randint(3, 9)] + b[j : j + rng.randint(3, 9)]))
        else:
            bag = [w for ws in rng.sample(words, 3) for w in ws]
            rng.shuffle(bag)
            out.append(" ".join(bag[: rng.randint(5, 20)]))
    return out


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def distill_loss(
    student_out, teacher_out, mask: torch.Tensor, hidden_weight: float, cos_weight: float = 100.0
) -> torch.Tensor:
    """Per-token MSE on every layer's hidden states (relative to the teacher's scale) + 1 - embedding cosine."""
    m = mask.unsqueeze(-1).to(torch.float32)
    hid = 0.0
    for hs, ht in zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:], strict=True):
        hid = hid + (((hs - ht) ** 2) * m).sum() / ((ht**2) * m).sum()
    es = F.normalize(masked_mean(student_out.last_hidden_state, mask), dim=-1)
    et = F.normalize(masked_mean(teacher_out.last_hidden_state, mask), dim=-1)
    cos = (1.0 - (es * et).sum(-1)).mean()
    return hidden_weight * hid / len(student_out.hidden_states[1:]) + cos_weight * cos


@torch.no_grad()
def embed(model, tok_batch) -> torch.Tensor:
    out = model(input_ids=tok_batch["input_ids"], attention_mask=tok_batch["attention_mask"])
    return F.normalize(masked_mean(out.last_hidden_state, tok_batch["attention_mask"]).float(), dim=-1)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.time()
    mini = load_minilm()
    teacher = mini.model.eval()
    eval_batch = mini.tokenize(EVALUATION_SENTENCES)
    ref = embed(teacher, eval_batch)
    opts = {"preset": "nf4", "qat": QATConfig(learnable_scales=not args.no_learnable_scales)}
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {machine}")
    results: dict = {"args": vars(args), "torch": torch.__version__, "machine": machine,
                     "date": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip

    # ---- PTQ baseline: the same backend, no training ---------------------------------------------
    torch._dynamo.reset()
    with torch.no_grad():
        ptq = embed(torch.compile(copy.deepcopy(teacher), backend="qbackend", options={"preset": "nf4"}), eval_batch)
    results["ptq"] = q_ptq = embedding_quality(ref, ptq)
    print(f"PTQ NF4 (nested, b64): cosine mean {q_ptq['cosine_mean']:.5f} min {q_ptq['cosine_min']:.5f}")

    # ---- QAT distillation -------------------------------------------------------------------------
    student = copy.deepcopy(teacher)
    layers = prepare(student, opts)
    print(f"prepared {len(layers)} linear layers for QAT ({opts['qat']})")
    if not args.no_clip_init and opts["qat"].learnable_scales:
        cal_batch = mini.tokenize(CALIBRATION_SENTENCES)
        calibrate_clipping(student, lambda: student(**cal_batch))
        # PTQ with the calibrated clipping alone (eager deployment: no compile needed for a look)
        results["clip_init"] = q_init = embedding_quality(
            ref, embed(qbackend.convert(copy.deepcopy(student)), eval_batch)
        )
        print(f"PTQ NF4 with activation-aware clipping (the QAT start): cosine mean {q_init['cosine_mean']:.5f}")
    student.train()
    for m in student.modules():  # distillation: no dropout noise (the teacher is deterministic)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    # Embeddings are not quantized: freeze them (half of the model's parameters; no dense embedding grads).
    student.embeddings.requires_grad_(False)
    ratios = [p for n, p in student.named_parameters() if n.endswith("weight_ratio")]
    weights = [p for n, p in student.named_parameters() if p.requires_grad and not n.endswith("weight_ratio")]
    groups = [{"params": weights, "lr": args.lr}]
    if ratios:
        groups.append({"params": ratios, "lr": args.ratio_lr})
    opt = torch.optim.Adam(groups, fused=True)
    cstudent = torch.compile(student, backend="qbackend", options=opts)

    rng = random.Random(args.seed)
    corpus = training_corpus(args.corpus)
    words = [s.split() for s in corpus]
    print(f"training on {len(corpus)} sentences and their recombinations, {args.steps} steps of {args.batch}")
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=args.steps, pct_start=0.15, anneal_strategy="cos"
    )
    losses = []
    bar = tqdm(range(1, args.steps + 1), desc="QAT", unit="step", mininterval=2.0)
    for step in bar:
        batch = mini.tokenize(training_texts(rng, words, args.batch))
        with torch.no_grad():
            tout = teacher(**batch, output_hidden_states=True)
        sout = cstudent(**batch, output_hidden_states=True)
        loss = distill_loss(sout, tout, batch["attention_mask"], args.hidden_weight, args.cos_weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        if step == 1 or step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    results["loss_first_last10"] = [losses[0], sum(losses[-10:]) / len(losses[-10:])]

    # ---- deploy: the same compiled model under no_grad runs the real NF4 ops -----------------------
    student.eval()
    results["qat"] = q_qat = embedding_quality(ref, embed(cstudent, eval_batch))
    deployed = qbackend.convert(copy.deepcopy(student))  # eager deployment: QuantizedLinear modules
    results["qat_convert"] = q_conv = embedding_quality(ref, embed(deployed, eval_batch))
    train_batch = mini.tokenize(CALIBRATION_SENTENCES)
    results["qat_on_training_sentences"] = q_train = embedding_quality(embed(teacher, train_batch),
                                                                       embed(cstudent, train_batch))  # fmt: skip
    gap = 1.0 - q_ptq["cosine_mean"]
    results["recovered"] = recovered = (q_qat["cosine_mean"] - q_ptq["cosine_mean"]) / gap if gap > 0 else float("nan")
    results["seconds"] = time.time() - t_start
    print(f"QAT NF4 deployed (compiled, no_grad): cosine mean {q_qat['cosine_mean']:.5f} "
          f"min {q_qat['cosine_min']:.5f}, similarity corr {q_qat['similarity_corr']:.5f}")  # fmt: skip
    print(f"QAT NF4 deployed (qbackend.convert, eager): cosine mean {q_conv['cosine_mean']:.5f}")
    print(f"  (on the training sentences: cosine mean {q_train['cosine_mean']:.5f})")
    met = "met" if q_qat["cosine_mean"] >= TARGET else "NOT met"
    print(f"gap to fp32 recovered: {100 * recovered:.1f}% (PTQ {q_ptq['cosine_mean']:.5f} -> QAT "
          f"{q_qat['cosine_mean']:.5f}; target >= {TARGET}: {met}); total time {results['seconds']:.0f}s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
