"""Where the NF4 (QAT) student's embedding error sits, per evaluation set (a diagnostic of examples/qat_minilm.py).

The student's deployed weights (fake-quantized, fp32 arithmetic) go into a float copy of MiniLM; then
single layers, single blocks and single layer kinds are put back to float, and the embedding error
(1 - mean cosine vs fp32) is measured on every evaluation set. Also: the per-sentence cosines and the
relative hidden-state error after every block.

    python benchmarks/results/qat_generalize/attribute.py                 # PTQ with activation-aware clipping
    python benchmarks/results/qat_generalize/attribute.py --student S.pt  # a student saved by --save-student
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
from pathlib import Path

import torch

from qbackend.demo import CALIBRATION_SENTENCES
from qbackend.qat import QATConfig, calibrate_clipping, prepare

EXAMPLE = Path(__file__).parents[3] / "examples" / "qat_minilm.py"


def load_example():
    spec = importlib.util.spec_from_file_location("qat_minilm_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--student", help="state_dict saved by examples/qat_minilm.py --save-student")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(1)
    ex = load_example()
    mini = ex.load_minilm()
    teacher = mini.model.eval()
    sets = ex.evaluation_sets()
    batches = {k: mini.tokenize(v) for k, v in sets.items()}
    refs = {k: ex.embed(teacher, b) for k, b in batches.items()}

    student = copy.deepcopy(teacher)
    prepare(student, {"preset": "nf4", "qat": QATConfig(learnable_scales=True)})
    if args.student:
        student.load_state_dict(torch.load(args.student, weights_only=True))
    else:
        cal = mini.tokenize(CALIBRATION_SENTENCES)
        calibrate_clipping(student, lambda: student(**cal))
    # the deployed weights, in a plain float model (fp32 arithmetic; biases/LayerNorms as trained)
    deployed = copy.deepcopy(teacher)
    sd = {k: v for k, v in student.state_dict().items() if ".qat." not in k}
    deployed.load_state_dict(sd)
    names = []
    with torch.no_grad():
        dmods = dict(deployed.named_modules())
        for name, m in student.named_modules():
            if isinstance(m, torch.nn.Linear) and hasattr(m, "qat") and "pooler" not in name:
                dmods[name].weight.copy_(m.qat.fake_quant_weight(m.weight))
                names.append(name)
    tmods = dict(teacher.named_modules())

    def err(model) -> dict[str, float]:
        return {k: 1.0 - float((ex.embed(model, b) * refs[k]).sum(-1).mean()) for k, b in batches.items()}

    def with_float(layers: list[str]) -> dict[str, float]:
        m = copy.deepcopy(deployed)
        mods = dict(m.named_modules())
        with torch.no_grad():
            for n in layers:
                mods[n].weight.copy_(tmods[n].weight)
        return err(m)

    base = err(deployed)
    out = {"base": base, "layers": {}, "blocks": {}, "kinds": {}}
    print("deployed student: 1 - cosine " + ", ".join(f"{k} {v:.5f}" for k, v in base.items()))
    kinds = sorted({n.split(".", 3)[3] for n in names if n.startswith("encoder.layer.")})
    for kind in kinds:
        out["kinds"][kind] = with_float([n for n in names if n.endswith(kind)])
    for b in range(6):
        out["blocks"][str(b)] = with_float([n for n in names if n.startswith(f"encoder.layer.{b}.")])
    for n in names:
        out["layers"][n] = with_float([n])
    # hidden-state error after every block
    out["hidden_rel_err"] = {}
    with torch.no_grad():
        for k, b in batches.items():
            hs = deployed(**b, output_hidden_states=True).hidden_states
            ht = teacher(**b, output_hidden_states=True).hidden_states
            mask = b["attention_mask"].unsqueeze(-1).float()
            out["hidden_rel_err"][k] = [float((((s - t) ** 2) * mask).sum() / ((t**2) * mask).sum())
                                        for s, t in zip(hs[1:], ht[1:], strict=True)]  # fmt: skip
        # per-sentence cosines
        out["per_sentence"] = {}
        for k, b in batches.items():
            cos = (ex.embed(deployed, b) * refs[k]).sum(-1)
            ntok = b["attention_mask"].sum(1)
            out["per_sentence"][k] = sorted(zip(cos.tolist(), ntok.tolist(), sets[k], strict=True))

    def row(label, d):
        cells = " | ".join(f"{d[k]:.5f} ({100 * (base[k] - d[k]) / base[k]:+.0f}%)" for k in base)
        return f"| {label} | {cells} |"

    print("| back to float | " + " | ".join(f"1-cos {k} (share of the error removed)" for k in base) + " |")
    print("|---|" + "---:|" * len(base))
    print(row("nothing", base))
    for kind, d in out["kinds"].items():
        print(row(f"every {kind}", d))
    for b, d in out["blocks"].items():
        print(row(f"block {b}", d))
    for n, d in sorted(out["layers"].items(), key=lambda kv: -(base["docstrings"] - kv[1]["docstrings"]))[:10]:
        print(row(n, d))
    print("relative hidden-state error after each block:")
    for k, v in out["hidden_rel_err"].items():
        print(f"  {k}: " + " ".join(f"{x:.4f}" for x in v))
    for k, v in out["per_sentence"].items():
        cs = [c for c, _, _ in v]
        print(
            f"{k}: per-sentence cosine min {cs[0]:.4f} p25 {cs[len(cs) // 4]:.4f} median {cs[len(cs) // 2]:.4f} "
            f"max {cs[-1]:.4f}; worst: " + "; ".join(f"{c:.4f} ({t} tok) {s[:50]!r}" for c, t, s in v[:3])
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
