"""Distributed checkpoints: 2 ranks -> 1, 1 -> 2 ranks, into qbackend.load, bad layouts, interrupted saves."""

import pytest
import torch
from dist_worker import logits, qlora_model

import qbackend
from qbackend.distributed import (
    CheckpointLayoutError,
    consolidate,
    load_checkpoint,
    read_layout,
    save_checkpoint,
)
from qbackend.distributed import checkpoint as ckpt_mod
from qbackend.formats import Scheme
from qbackend.qat import add_lora, lora_parameters, quantize_base
from qbackend.workflows.weight_only.linear import QuantizedLinear


def test_saved_on_2_ranks_loads_in_1_process(two_ranks):
    out, results = two_ranks
    assert read_layout(out / "ckpt-2ranks")["saved_world_size"] == 2
    model = qlora_model(seed=7)  # other base and adapters: everything must come from the file
    load_checkpoint(model, out / "ckpt-2ranks")
    torch.testing.assert_close(logits(model), results[0]["fsdp_logits"], rtol=1e-5, atol=1e-5)


def test_saved_in_1_process_loads_on_2_ranks(two_ranks):
    out, results = two_ranks
    want = torch.load(out / "ckpt-1rank-logits.pt")
    for res in results:
        torch.testing.assert_close(res["loaded_from_1rank_logits"], want, rtol=1e-5, atol=1e-5)


def test_training_resumes_from_a_checkpoint_with_optimizer_state(two_ranks):
    _, results = two_ranks
    for res in results:
        rel = [abs(a - b) / abs(b) for a, b in zip(res["resumed_losses"], res["losses"][10:], strict=True)]
        assert len(rel) == 10 and max(rel) < 1e-6, rel


def test_consolidate_gives_a_file_qbackend_load_reads(two_ranks, tmp_path):
    out, results = two_ranks
    path = consolidate(out / "ckpt-2ranks", qlora_model(seed=7), tmp_path / "m.safetensors")
    loaded = qbackend.load(path, model=lambda: _lora_skeleton())
    assert isinstance(loaded.get_submodule("model.layers.1.mlp.down_proj.base"), QuantizedLinear)
    torch.testing.assert_close(logits(loaded), results[0]["fsdp_logits"], rtol=1e-5, atol=1e-5)


def _lora_skeleton():
    from dist_worker import TARGETS, llama

    m = llama()
    add_lora(m, r=4, alpha=8, target_modules=TARGETS)
    return m


def test_checkpoint_from_another_format_is_refused_naming_the_layer(tmp_path):
    save_checkpoint(qlora_model(), tmp_path / "ck")
    other = _lora_skeleton()
    quantize_base(other, Scheme("int", 4, granularity="block", blocksize=32))
    with pytest.raises(CheckpointLayoutError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj\.base'.*format"):
        load_checkpoint(other, tmp_path / "ck")
    float_model = _lora_skeleton()  # no quantized layer at all
    with pytest.raises(CheckpointLayoutError, match="quantized in the checkpoint but not in the model"):
        load_checkpoint(float_model, tmp_path / "ck")


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = qlora_model(seed=1)
    save_checkpoint(good, tmp_path / "ck")
    want = logits(good)
    real_save = ckpt_mod.dcp.save

    def dies_midway(state, checkpoint_id, **kwargs):
        real_save({k: v for i, (k, v) in enumerate(state.items()) if i < 5}, checkpoint_id=checkpoint_id, **kwargs)
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(ckpt_mod.dcp, "save", dies_midway)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_checkpoint(qlora_model(seed=2), tmp_path / "ck")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # the partial directory is gone
    model = qlora_model(seed=3)
    load_checkpoint(model, tmp_path / "ck")
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0)


def test_a_save_interrupted_between_its_renames_still_loads(tmp_path):
    good = qlora_model(seed=1)
    save_checkpoint(good, tmp_path / "ck")
    (tmp_path / "ck").rename(tmp_path / ".ck.old-abc")  # the state after the first rename of a commit
    model = qlora_model(seed=3)
    load_checkpoint(model, tmp_path / "ck")
    torch.testing.assert_close(logits(model), logits(good), rtol=0, atol=0)


def test_asking_for_optimizer_state_a_checkpoint_lacks(tmp_path):
    model = qlora_model()
    save_checkpoint(model, tmp_path / "ck")
    with pytest.raises(CheckpointLayoutError, match="holds no optimizer state"):
        load_checkpoint(model, tmp_path / "ck", optimizer=torch.optim.AdamW(lora_parameters(model)))


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointLayoutError, match="not a complete qbackend distributed checkpoint"):
        load_checkpoint(qlora_model(), tmp_path / "junk")
    with pytest.raises(CheckpointLayoutError, match="no such checkpoint"):
        load_checkpoint(qlora_model(), tmp_path / "nothing")
