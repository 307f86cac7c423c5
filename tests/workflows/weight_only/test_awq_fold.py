"""AWQ's 1/s folded into the producing op in compiled graphs (method option ``fold``)."""

from __future__ import annotations

import copy

import pytest
import torch

import qbackend
from qbackend.passes.weight_cache import StaleWeightError

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)  # fmt: skip
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a few large input channels, as in trained models
        for layer in m.model.layers:
            layer.input_layernorm.weight.mul_(1 + 4 * (torch.arange(128) % 13 == 0))
    return m


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                  vocab_size=100, max_position_embeddings=64)  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _cal(model):
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 100, (2, 32), generator=g)} for _ in range(2)]
    return qbackend.calibrate(model, batches, hessian=True, progress=False)


@pytest.fixture(scope="module")
def llama():
    m = _llama()
    return m, _cal(m)


def _opts(cal, fold, exclude=("lm_head",)):
    method = {"name": "awq", "grid": 5, "clip": False, "fold": fold}
    return {"preset": "int4", "min_params": 0, "exclude": list(exclude), "method": method, "calibration": cal}


def _run(model, opts, ids):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend="qbackend", options=opts)(input_ids=ids).logits


def test_norm_folds_equal_the_same_scales_as_explicit_multiplies_and_are_reported(llama):
    m, cal = llama
    ids = torch.randint(0, 100, (2, 11))
    # down_proj not quantized: every fold is into a norm (no quantized producer), so both must agree exactly
    opts = _opts(cal, True, exclude=("lm_head", "down_proj"))
    folded = _run(m, opts, ids)
    multiplied = _run(m, _opts(cal, "multiply", exclude=("lm_head", "down_proj")), ids)
    torch.testing.assert_close(folded, multiplied, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    assert float((folded - ref).norm() / ref.norm()) < 0.3  # it computes the model (up to int4 error)
    torch._dynamo.reset()
    report = qbackend.explain(m, ids, **opts)
    fold = report.sections["awq_fold"][0]
    kinds = {g.layers[0].rsplit(".", 1)[-1]: g.kind for g in fold.groups}
    assert kinds == {"q_proj": "param_mul", "gate_proj": "param_mul", "o_proj": "skipped"}, fold.table()
    assert [len(g.layers) for g in fold.exact] == [3, 2, 3, 2]  # one s per q/k/v and per gate/up group
    assert "merges attention heads" in fold.skipped[0].reason
    rows = {r.layer.rsplit(".", 1)[-1]: r for r in report.sections["awq"][0].rows}
    assert rows["q_proj"].input_scale == rows["up_proj"].input_scale == "folded"
    assert "input_layernorm" in rows["v_proj"].note and "post_attention_layernorm" in rows["up_proj"].note
    assert rows["o_proj"].input_scale in ("multiply", "none") and "not folded" in rows["o_proj"].note or \
        rows["o_proj"].input_scale == "none"  # fmt: skip


def test_down_proj_folds_into_up_proj_rows_and_the_model_stays_as_accurate(llama):
    m, cal = llama
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    err = {f: float((_run(m, _opts(cal, f), ids) - ref).norm() / ref.norm()) for f in (True, False)}
    assert err[True] < 1.3 * err[False], err  # one s per group: close to per-layer s and multiplies
    torch._dynamo.reset()
    report = qbackend.explain(m, ids, **_opts(cal, True))
    fold = report.sections["awq_fold"][0]
    down = [g for g in fold.groups if g.layers[0].endswith("down_proj")]
    assert [g.kind for g in down] == ["linear_rows", "linear_rows"] and down[0].target.endswith("mlp.up_proj")
    assert "model.layers.0.mlp.up_proj.weight" in down[0].params


def test_bert_has_no_exact_fold_every_layer_keeps_its_multiply_with_the_reason():
    m = _bert()
    cal = _cal(m)
    ids = torch.randint(0, 100, (2, 9))
    opts = {"preset": "int4", "min_params": 0, "exclude": ["pooler.dense"], "calibration": cal,
            "method": {"name": "awq", "grid": 5, "clip": False}}  # fmt: skip
    torch._dynamo.reset()
    report = qbackend.explain(m, ids, **opts)
    fold = report.sections["awq_fold"][0]
    assert fold.groups and not fold.exact and len(fold.skipped) == len(fold.groups), fold.table()
    rows = report.sections["awq"][0].rows
    assert all(r.input_scale in ("multiply", "none") for r in rows)
    assert any(r.input_scale == "multiply" and "not folded" in r.note for r in rows)
    torch._dynamo.reset()  # same outputs as AWQ with fold off: nothing was folded
    with torch.no_grad():
        a = torch.compile(m, backend="qbackend", options=opts)(input_ids=ids).last_hidden_state
        torch._dynamo.reset()
        opts_off = {**opts, "method": {**opts["method"], "fold": False}}
        b = torch.compile(m, backend="qbackend", options=opts_off)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_folded_norm_weight_changed_in_place_is_a_clear_error_to_recompile(llama):
    m, cal = llama
    ids = torch.randint(0, 100, (2, 5))
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="qbackend", options=_opts(cal, True))
    norm = m.model.layers[0].input_layernorm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            compiled(input_ids=ids)
            norm.mul_(1.5)
            with pytest.raises(StaleWeightError, match="input_layernorm.*AWQ folded"):
                compiled(input_ids=ids)
    finally:
        with torch.no_grad():
            norm.copy_(saved)
        torch._dynamo.reset()


def test_fold_option_is_validated():
    from qbackend.workflows.weight_only import MethodConfig, MethodConfigError

    with pytest.raises(MethodConfigError, match="fold must be"):
        MethodConfig(name="awq", fold="yes")  # type: ignore[arg-type]


def test_module_form_holds_the_folds_equals_the_compiled_model_and_saves_and_loads_identically(llama, tmp_path):
    m, cal = llama
    ids = torch.randint(0, 100, (2, 11))
    compiled = _run(m, _opts(cal, True), ids)
    q = copy.deepcopy(m)
    report = qbackend.quantize_(q, _opts(cal, True))
    assert [g.kind for g in report.sections["awq_fold"][0].exact].count("linear_rows") == 2
    layer = q.model.layers[0]
    assert layer.self_attn.q_proj.input_scale is None and layer.mlp.down_proj.input_scale is None
    assert not torch.equal(layer.input_layernorm.weight, m.model.layers[0].input_layernorm.weight)  # holds w / s
    with torch.no_grad():
        y = q(input_ids=ids).logits
    torch.testing.assert_close(y, compiled, rtol=1e-4, atol=1e-4)  # linear_rows included: same codes, same s
    qbackend.save(q, tmp_path / "awq.safetensors")
    loaded = qbackend.load(tmp_path / "awq.safetensors", model=_llama())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, y)
    assert torch.equal(loaded.model.layers[0].input_layernorm.weight, layer.input_layernorm.weight)
