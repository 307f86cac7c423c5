"""AWQ's 1/s folded into the producing op in compiled graphs (method option ``fold``)."""

from __future__ import annotations

import copy
import gc

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


def _float_tensors_shaped_like(model, shape) -> int:
    """Live float tensors of ``shape`` that are not parameters of ``model`` (a census of the heap)."""
    gc.collect()
    params = {p.data_ptr() for p in model.parameters()}
    fake = torch._subclasses.FakeTensor
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, fake)
               and o.is_floating_point() and tuple(o.shape) == shape and o.data_ptr() not in params)  # fmt: skip


def test_a_layer_quantized_from_folded_rows_keeps_no_float_copy_and_an_in_place_change_is_caught(llama):
    m, cal = llama
    ids = torch.randint(0, 100, (2, 5))
    up = m.model.layers[0].mlp.up_proj.weight
    saved = up.detach().clone()
    torch._dynamo.reset()
    baseline = _float_tensors_shaped_like(m, tuple(up.shape))
    compiled = torch.compile(m, backend="qbackend", options=_opts(cal, True))
    try:
        with torch.no_grad():
            first = compiled(input_ids=ids).logits
            # up_proj (2 layers) is quantized from its rows divided by down_proj's s: no copy of them stays
            assert _float_tensors_shaped_like(m, tuple(up.shape)) == baseline
            assert torch.equal(compiled(input_ids=ids).logits, first)  # unchanged weights: no false alarm
            up.mul_(1.5)  # the user's parameter, in place
            with pytest.raises(StaleWeightError, match="up_proj.*changed in place.*recompile"):
                compiled(input_ids=ids)
            up.copy_(saved)  # version moved on: still an error, never the old codes silently
            with pytest.raises(StaleWeightError, match="up_proj"):
                compiled(input_ids=ids)
    finally:
        with torch.no_grad():
            up.copy_(saved)
        torch._dynamo.reset()


def test_the_folded_entry_alone_refuses_to_requantize_from_the_unfolded_parameter(llama):
    from qbackend.testing.capture import capture_graph
    from qbackend.workflows.weight_only.lower import FoldedEntry
    from qbackend.workflows.weight_only.pipeline import run_weight_only

    m, cal = llama
    with torch.no_grad():
        captured = capture_graph(m, input_ids=torch.randint(0, 100, (1, 4)))
    result = run_weight_only(captured.gm, qbackend.QuantConfig.from_options(_opts(cal, True)))
    torch._dynamo.reset()
    folded = [lw for lw in result.lowered if isinstance(lw.entry, FoldedEntry)]
    assert sorted(lw.param.fqn for lw in folded) == [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)]
    assert not result.report.sections["awq_fold"][0].weights  # the fold report keeps no copy either
    lw = folded[0]
    up = captured.example_inputs[lw.param.input_index]
    assert up is m.model.layers[0].mlp.up_proj.weight
    codes = [t.clone() for t in lw.entry.kw.tensors if t is not None]
    saved = up.detach().clone()
    try:
        assert not lw.entry.is_stale(up)
        with torch.no_grad():
            up.add_(0.01)
        assert lw.entry.is_stale(up)
        with pytest.raises(StaleWeightError, match="up_proj.*next layer's 1/s.*recompile"):
            lw.entry.refresh(up)
        after = [t for t in lw.entry.kw.tensors if t is not None]
        assert all(torch.equal(a, b) for a, b in zip(codes, after, strict=True))  # nothing re-quantized
    finally:
        with torch.no_grad():
            up.copy_(saved)


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
