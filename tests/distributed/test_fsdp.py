"""FSDP2 QLoRA on 2 CPU ranks (gloo) against the same QLoRA in one process."""

import pytest
import torch
from dist_worker import qlora_model
from torch import nn

from qbackend.distributed import ShardingError, shard_qlora
from qbackend.formats import Scheme
from qbackend.workflows.weight_only.linear import QuantizedLinear


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


class _Mesh:
    """Stands for a device mesh of ``n`` ranks: the row check runs before FSDP2 touches the mesh."""

    def __init__(self, n: int) -> None:
        self.n = n

    def size(self) -> int:
        return self.n


def test_rows_that_do_not_divide_the_world_are_refused_naming_the_layer():
    model = qlora_model()  # 128-row attention projections, 256-row gate/up
    with pytest.raises(ShardingError) as err:
        shard_qlora(model, _Mesh(3))
    msg = str(err.value)
    assert msg.startswith("model.layers.0.self_attn.q_proj.base: out_features=128 rows do not divide over 3 ranks")
    assert "e.g. 2, 4, 8, 16" in msg and "allow_uneven_rows=True" in msg
    assert type(model.get_submodule("model.layers.0.self_attn.q_proj.base")) is QuantizedLinear  # nothing changed


def test_a_layer_whose_rows_would_split_a_block_is_refused_before_sharding():
    model = nn.Sequential(QuantizedLinear.from_weight(torch.randn(8, 96), None, Scheme("nf4", 4, blocksize=64)))
    with pytest.raises(ShardingError, match=r"^0: in_features=96 is not a multiple of the block size 64"):
        shard_qlora(model, _Mesh(2), blocks=[])
    assert type(model[0]) is QuantizedLinear


def test_uneven_rows_refused_on_2_ranks_and_padded_with_allow_uneven_rows(two_ranks):
    _, results = two_ranks
    for res in results:
        assert res["uneven_error"].startswith("2.base: out_features=65 rows do not divide over 2 ranks")
        assert "no world size > 1 divides every layer's rows" in res["uneven_error"]
        rel = [abs(a - b) / abs(b) for a, b in zip(res["uneven_losses"], res["uneven_ref_losses"], strict=True)]
        assert len(rel) == 5 and max(rel) < 1e-5, rel
    # FSDP2 pads the shorter shard: rank 0 holds 33 rows of the second layer, rank 1 32
    local = [r["uneven_nbytes"][0] for r in results]
    assert local[0] > local[1] and sum(local) == results[0]["uneven_nbytes"][1]
