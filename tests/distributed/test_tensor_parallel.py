"""Tensor-parallel inference of quantized Llama layers on 2 CPU ranks, and the split rules."""

import pytest
import torch
from dist_worker import probe, qlora_model, quantized_model

from qbackend.distributed import QuantizedColwiseParallel, ShardingError, load_checkpoint, to_row_layout
from qbackend.distributed.layout import check_column_split, check_row_split
from qbackend.distributed.tensor_parallel import denest


@pytest.mark.parametrize("fmt", ["nf4", "int8", "int4"])
def test_tp_outputs_equal_the_single_process_quantized_model(two_ranks, fmt):
    _, results = two_ranks
    for res in results:
        torch.testing.assert_close(res[f"tp_{fmt}_out"], res[f"tp_{fmt}_ref"], rtol=1e-5, atol=2e-5)


def test_tp_biases_are_sharded_column_wise_and_added_once_row_wise(two_ranks):
    _, results = two_ranks
    for res in results:
        torch.testing.assert_close(res["tp_bias_out"], res["tp_bias_ref"], rtol=1e-5, atol=1e-5)


def test_tp_shards_codes_along_rows_and_columns(two_ranks):
    _, results = two_ranks
    res = results[0]
    # q_proj 128x128 column-wise: 64 rows of 64 code bytes; o_proj row-wise: 128 rows of 32 bytes
    assert res["tp_nf4_codes_local"] == ((64, 64), (128, 32))
    assert res["tp_nf4_placements"] == ("(Shard(dim=0),)", "(Shard(dim=1),)")
    assert res["tp_int8_codes_local"] == ((64, 128), (128, 64))


def test_tp_split_inside_a_block_is_refused_naming_the_layer(two_ranks):
    _, results = two_ranks
    msg = results[0]["tp_split_error"]
    assert msg is not None and "o_proj" in msg and "block" in msg


def test_split_rules():
    model = quantized_model()
    to_row_layout(model)
    o = model.get_submodule("model.layers.0.self_attn.o_proj")  # 128 x 128, NF4 blocks of 64
    check_column_split(o, "o", 2)
    with pytest.raises(ShardingError, match=r"o: in_features=128 does not split into 4 parts of whole blocks of 64"):
        check_column_split(o, "o", 4)
    check_row_split(o, "o", 4)
    with pytest.raises(ShardingError, match=r"o: out_features=128 rows do not divide over 3 ranks"):
        check_row_split(o, "o", 3)


def test_denest_keeps_the_layer_output():
    model = quantized_model()
    to_row_layout(model)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(3, layer.in_features)
    before = layer(x)
    denest(layer)
    assert "nested_codes" not in dict(layer.named_parameters()) and "absmax" in dict(layer.named_parameters())
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)


def _from_1rank_checkpoint(out):
    model = qlora_model(seed=7)
    load_checkpoint(model, out / "ckpt-1rank")
    return model


def test_tp_lora_layers_split_base_and_adapters_consistently(two_ranks):
    _, results = two_ranks
    for res in results:
        assert res["tp_lora_placements"] == {
            "q.A": "(Replicate(),)", "q.B": "(Shard(dim=0),)", "q.codes": "(Shard(dim=0),)",  # column-wise
            "down.A": "(Shard(dim=1),)", "down.B": "(Replicate(),)", "down.codes": "(Shard(dim=1),)",  # row-wise
        }  # fmt: skip
        assert res["tp_lora_local_shapes"] == {"q.B": (64, 4), "down.A": (4, 128)}  # halves of 128 rows / 256 columns


def test_tp_lora_outputs_and_adapter_gradients_equal_one_process(two_ranks):
    out, results = two_ranks
    want = torch.load(out / "ckpt-1rank-logits.pt")
    ref = _from_1rank_checkpoint(out)
    ids = probe()
    loss = ref(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 7 * 2  # A and B of 7 projections in 2 blocks
    for res in results:
        torch.testing.assert_close(res["tp_lora_logits"], want, rtol=1e-5, atol=2e-5)
        assert abs(res["tp_lora_loss"] - loss.item()) < 1e-5 * loss.item()
        assert res["tp_lora_grads"].keys() == grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(res["tp_lora_grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_tp_lora_layer_over_a_flat_base_is_refused():
    model = qlora_model()  # LoRA over QuantizedLinear bases, not yet in the row layout
    lora = model.get_submodule("model.layers.0.self_attn.q_proj")
    with pytest.raises(ShardingError, match=r"LoRA layer over QuantizedLinear: .*then to_row_layout\(model\)"):
        QuantizedColwiseParallel()._apply(lora, None)  # refused before the mesh is used
