"""QLoRA: a frozen NF4 (nested) base + trainable LoRA adapters, ours and peft's, through the backend."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.testing import CompileCounterWithBackend

from qbackend import QuantizedLinear
from qbackend.core.backend import guard_weights, run_passes
from qbackend.core.config import QuantConfig
from qbackend.qat import LoRALinear, add_lora, dequantize_base, lora_parameters, quantize_base

D_IN, D_HID, D_OUT = 96, 160, 24


class Block(nn.Module):
    """A small MLP-with-projections model: the layer names LoRA usually targets."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D_IN, D_HID)
        self.v_proj = nn.Linear(D_HID, D_HID, bias=False)
        self.o_proj = nn.Linear(D_HID, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(torch.relu(self.v_proj(torch.relu(self.q_proj(x)))))


def qlora_model(seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
    torch.manual_seed(seed)
    model = Block()
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"], dtype=dtype)
    quantize_base(model)
    return model


def counted_backend(options=None) -> CompileCounterWithBackend:
    """qbackend's passes + AOT autograd without Inductor (fast compiles)."""
    config = QuantConfig.from_options(options)

    def backend(gm, example_inputs):
        result = run_passes(gm, config)
        return guard_weights(aot_eager(gm, example_inputs), result, config)

    return CompileCounterWithBackend(backend)


def test_lora_linear_starts_as_the_base_and_trains_only_adapters():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    x = torch.randn(3, 32)
    expected = base(x)
    layer = LoRALinear(base, r=4, alpha=8)
    assert torch.equal(layer(x), expected)  # B starts at zero
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(base, r=0, alpha=1)


def test_quantize_base_frees_float_weights_and_keeps_adapters():
    torch.manual_seed(0)
    model = Block()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    add_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    names = quantize_base(model)
    assert set(names) == {"q_proj.base", "v_proj.base", "o_proj"}
    assert isinstance(model.q_proj.base, QuantizedLinear) and model.q_proj.base.scheme.name == "nf4-b64-nested"
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # no float base weight anywhere
    kept = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert kept < 0.35 * float_bytes
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"
    }  # fmt: skip


def _saved_float_sizes(model: nn.Module, x: torch.Tensor) -> list[int]:
    sizes: list[int] = []

    def pack(t):
        if t.is_floating_point():
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sizes


def test_base_saves_no_float_weight_for_backward():
    model = qlora_model()
    x = torch.randn(5, D_IN)
    base_numels = [D_HID * D_IN, D_HID * D_HID, D_OUT * D_HID]
    saved = _saved_float_sizes(model, x)
    assert not any(n in base_numels for n in saved), saved
    ref = copy.deepcopy(model)
    dequantize_base(ref)
    assert sum(_saved_float_sizes(ref, x)) > sum(saved) + D_HID * D_HID  # the float base saves its weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_through_the_backend_equals_dequantized_float_base(dtype):
    """Compiled QLoRA training == the same training on the dequantized float base, step for step."""
    model = qlora_model(1, dtype)
    ref = copy.deepcopy(model)
    dequantize_base(ref)
    counter = counted_backend()
    cmodel = torch.compile(model, backend=counter)
    opt = torch.optim.AdamW(lora_parameters(model), lr=5e-3)
    opt_ref = torch.optim.AdamW(lora_parameters(ref), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, D_IN, generator=g), torch.randn(16, D_OUT, generator=g)
    losses = []
    for _ in range(8):
        loss = ((cmodel(x) - t) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss_ref = ((ref(x) - t) ** 2).mean()
        loss_ref.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        losses.append(float(loss))
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-6)
    assert losses[-1] < 0.9 * losses[0]
    assert counter.frame_count == 1
    for p, q in zip(lora_parameters(model), lora_parameters(ref), strict=True):
        assert p.dtype == dtype
        tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(p, q, **tol)


def test_peft_wrapped_tiny_llama_equals_dequantized_float_base():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    names = quantize_base(model)
    assert any(n.endswith("q_proj.base_layer") for n in names) and not any("lm_head" in n for n in names)
    ref = copy.deepcopy(model)
    dequantize_base(ref)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    opt_ref = torch.optim.AdamW(lora_parameters(ref), lr=1e-2)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    first = None
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss_ref = ref(input_ids=ids, labels=ids).loss
        loss_ref.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        first = first if first is not None else float(loss)
    assert float(loss) < first
