"""FSDP2 QLoRA on 2 CPU ranks (gloo) against the same QLoRA in one process."""

import pytest
import torch


def test_fsdp_qlora_matches_single_process_step_for_step(two_ranks):
    _, results = two_ranks
    for res in results:
        assert len(res["losses"]) == len(res["ref_losses"]) == 20
        rel = [abs(a - b) / abs(b) for a, b in zip(res["losses"], res["ref_losses"], strict=True)]
        assert max(rel) < 1e-5, rel
        assert res["losses"][-1] < res["losses"][0] - 0.2  # the adapters really learn the task
        assert res["adapter_max_abs_diff"] < 1e-4  # and end where the 1-process run ends


def test_only_adapters_train_and_the_base_is_unchanged(two_ranks):
    _, results = two_ranks
    for res in results:
        assert res["adapters_moved"]
        assert res["base_unchanged"]


def test_quantized_base_is_sharded_not_replicated(two_ranks):
    _, results = two_ranks
    for res in results:
        assert res["quantized_not_dtensor"] == []
        assert res["quantized_param_placements"] == ["(Shard(dim=0),)"]
        local, total = res["quantized_nbytes"]
        assert 0.45 < local / total < 0.55, (local, total)
    assert sum(r["quantized_nbytes"][0] for r in results) == results[0]["quantized_nbytes"][1]


def test_fsdp_forward_matches_single_process(two_ranks):
    _, results = two_ranks
    res = results[0]
    torch.testing.assert_close(res["fsdp_logits"], res["ref_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fsdp_qlora_with_int_bases(two_ranks, fmt):
    _, results = two_ranks
    for res in results:
        rel = [abs(a - b) / abs(b) for a, b in zip(res[f"fsdp_{fmt}_losses"], res[f"fsdp_{fmt}_ref"], strict=True)]
        assert len(rel) == 5 and max(rel) < 1e-5, rel


def test_bf16_mixed_precision_casts_activations_never_codes_or_constants(two_ranks):
    _, results = two_ranks
    for res in results:
        seen = res["fsdp_bf16_dtypes_seen"]
        assert seen["x"] == "torch.bfloat16"
        assert seen["codes"] == seen["nested_codes"] == "torch.uint8"
        assert seen["nested_absmax"] == seen["nested_offset"] == "torch.float32"
        # bf16 activations and adapters: close to the fp32 run, not equal
        rel = [abs(a - b) / abs(b) for a, b in zip(res["fsdp_bf16_losses"], res["ref_losses"][:5], strict=True)]
        assert max(rel) < 2e-2, rel


@pytest.mark.slow
def test_fsdp_qlora_under_torch_compile(tmp_path, ranks):
    results = ranks("compile", tmp_path, env={"QB_STEPS": "3"}, timeout=600)
    for res in results:
        rel = [abs(a - b) / abs(b) for a, b in zip(res["losses"], res["ref_losses"], strict=True)]
        assert len(rel) == 3 and max(rel) < 1e-5, rel
        assert res["base_unchanged"] and res["adapters_moved"]
