"""Distributed checkpoints: 2 ranks -> 1, 1 -> 2 ranks, into qbackend.load, bad layouts, interrupted saves."""

import shutil
import signal

import pytest
import torch
from dist_worker import logits, qlora_model

import qbackend
from qbackend.distributed import (
    CheckpointLayoutError,
    CheckpointSaveError,
    consolidate,
    load_checkpoint,
    read_layout,
    save_checkpoint,
    to_row_layout,
)
from qbackend.distributed import checkpoint as ckpt_mod
from qbackend.distributed.tensor_parallel import denest
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


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = qlora_model(seed=1)
    save_checkpoint(good, tmp_path / "ck")
    want = logits(good)
    real_save = ckpt_mod.dcp.save

    def dies_midway(state, checkpoint_id, **kwargs):
        real_save({k: v for i, (k, v) in enumerate(state.items()) if i < 5}, checkpoint_id=checkpoint_id, **kwargs)
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(ckpt_mod.dcp, "save", dies_midway)
    with pytest.raises(CheckpointSaveError, match=r"ck: the save did not complete on rank 0 \(RuntimeError: killed "
                       r"mid-save\); the previous checkpoint is unchanged"):  # fmt: skip
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


def test_tp_checkpoint_loads_in_one_process_and_into_qbackend_load(two_ranks, tmp_path):
    out, results = two_ranks
    layout = read_layout(out / "ckpt-tp")
    assert layout["saved_world_size"] == 2
    assert layout["layers"]["model.layers.0.self_attn.q_proj.base"]["scheme"]["nested"] is False  # decoded by TP
    model = qlora_model(seed=7)  # nested layers: decoded the same way before loading
    load_checkpoint(model, out / "ckpt-tp")
    torch.testing.assert_close(logits(model), results[0]["tp_lora_logits"], rtol=1e-5, atol=2e-5)
    path = consolidate(out / "ckpt-tp", qlora_model(seed=7), tmp_path / "tp.safetensors")
    loaded = qbackend.load(path, model=_lora_skeleton)
    layer = loaded.get_submodule("model.layers.0.self_attn.q_proj.base")
    assert isinstance(layer, QuantizedLinear) and layer.scheme.name == "nf4-b64"
    torch.testing.assert_close(logits(loaded), results[0]["tp_lora_logits"], rtol=1e-5, atol=2e-5)


def test_tp_checkpoint_reloads_under_fsdp2(two_ranks):
    _, results = two_ranks
    for res in results:
        torch.testing.assert_close(res["fsdp_from_tp_logits"], res["tp_lora_logits"], rtol=1e-5, atol=2e-5)
        msg = res["tp_into_sharded_error"]
        assert msg is not None and "model.layers.0.self_attn.q_proj.base" in msg and "load into the model before" in msg


def test_checkpoint_missing_a_ranks_file_is_refused(two_ranks, tmp_path):
    out, _ = two_ranks
    shutil.copytree(out / "ckpt-2ranks", tmp_path / "ck")
    (tmp_path / "ck" / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointLayoutError, match=r"data file '__1_0.distcp' is missing .*saved by 2 rank"):
        load_checkpoint(qlora_model(), tmp_path / "ck")


def test_checkpoint_of_another_layout_version_is_refused(tmp_path):
    save_checkpoint(qlora_model(), tmp_path / "ck")
    manifest = tmp_path / "ck" / ckpt_mod.MANIFEST
    manifest.write_text(manifest.read_text().replace('"layout": "rows"', '"layout": "flat"'))
    with pytest.raises(CheckpointLayoutError, match=r"layout version 1 / 'flat' is not supported"):
        load_checkpoint(qlora_model(), tmp_path / "ck")


def test_nested_checkpoint_into_a_tp_split_model_says_to_load_first(tmp_path):
    save_checkpoint(qlora_model(), tmp_path / "ck")
    model = qlora_model()
    to_row_layout(model)
    denest(model.get_submodule("model.layers.0.self_attn.q_proj.base"))  # as tensor parallel leaves it
    with pytest.raises(CheckpointLayoutError, match=r"q_proj\.base'.*format nf4.*load before parallelize_module"):
        load_checkpoint(model, tmp_path / "ck")


def test_rank_killed_mid_save_keeps_the_previous_checkpoint(tmp_path, ranks):
    rank0, rank1 = ranks("kill_mid_save", tmp_path, check=False, timeout=240)
    assert rank1["returncode"] == -signal.SIGKILL, rank1["output"]
    assert rank0["returncode"] == 0, rank0["output"]
    kind, msg = rank0["save_error"]
    assert kind == "CheckpointSaveError" and "the previous checkpoint is unchanged" in msg, msg
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck")] == []  # the partial save is gone
    model = qlora_model(seed=5)
    load_checkpoint(model, tmp_path / "ck")
    torch.testing.assert_close(logits(model), rank0["good_logits"], rtol=1e-5, atol=1e-5)


def test_a_partial_save_left_by_a_killed_rank_0_is_removed_by_the_next_save(tmp_path):
    stale = tmp_path / ".ck.partial-0123456789ab"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half")
    save_checkpoint(qlora_model(), tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
