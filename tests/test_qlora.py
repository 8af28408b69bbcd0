"""QLoRA: per-expert LoRA (``lora_experts``) on int4 routed experts (``quantization_int4``)."""

from __future__ import annotations

import pytest
import torch

from modeling_llama4.tiny import SCOUT_LIKE, VOCAB, text_config_from_meta

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers.trainer_utils import validate_quantization_for_training  # noqa: E402

from modeling_llama4 import Llama4ForCausalLM  # noqa: E402
from modeling_llama4.lora_experts import Llama4ExpertsLoraLayer  # noqa: E402
from modeling_llama4.moe import Llama4TextExperts  # noqa: E402
from modeling_llama4.quantization_int4 import Llama4Int4Config, Llama4Int4TextExperts  # noqa: E402

GROUP = 16  # divides the tiny hidden size (64) and expert size (48)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Scout-like model whose experts move the logits (gain 0.25, as in test_int4), saved."""
    torch.manual_seed(0)
    model = Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE))
    for module in model.modules():
        if isinstance(module, Llama4TextExperts):
            for weight in (module.gate_up_proj, module.down_proj):
                torch.nn.init.normal_(weight, std=0.25 * weight.shape[1] ** -0.5)
    path = tmp_path_factory.mktemp("dense")
    model.save_pretrained(path)
    return path


def int4_model(path, **kwargs) -> Llama4ForCausalLM:
    config = Llama4Int4Config(group_size=GROUP)
    return Llama4ForCausalLM.from_pretrained(path, quantization_config=config, **kwargs).eval()


def expert_lora(**kwargs) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["experts"], **kwargs})


def tokens(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def int4_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The int4 buffers of a model or of the model a PeftModel wraps, under the unwrapped names."""
    buffers = model.get_base_model().named_buffers() if hasattr(model, "get_base_model") else model.named_buffers()
    return {
        name.replace("base_layer.", ""): b.clone() for name, b in buffers if name.endswith(("_qweight", "_scales"))
    }


def lora_layers(model: torch.nn.Module) -> list[Llama4ExpertsLoraLayer]:
    return [module for module in model.modules() if isinstance(module, Llama4ExpertsLoraLayer)]


def test_fresh_adapter_is_the_int4_base(checkpoint):
    model, ids = int4_model(checkpoint), tokens()
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)
    base_logits = logits(model, ids)
    peft_model = get_peft_model(model, expert_lora(target_modules=["experts", "q_proj"]))
    validate_quantization_for_training(peft_model)  # what Trainer checks
    layers = lora_layers(peft_model)
    assert len(layers) == 4 and all(isinstance(layer.get_base_layer(), Llama4Int4TextExperts) for layer in layers)
    assert layers[0].lora_gate_A["default"].dtype == torch.float32
    torch.testing.assert_close(logits(peft_model, ids), base_logits, atol=1e-6, rtol=0)


def test_lora_on_int4_equals_dense_experts_on_dequantized_weights_and_dequantizes_routed_experts_only(checkpoint):
    """``init_lora_weights=False``: the sparse forward equals dense experts on ``ŵ + s·(BA)ᵀ``."""
    layer = lora_layers(get_peft_model(int4_model(checkpoint), expert_lora(init_lora_weights=False)))[0]
    int4 = layer.get_base_layer()
    dense = Llama4TextExperts(int4_model(checkpoint).config)
    delta_gate_up, delta_down = layer.get_delta_weights("default")
    with torch.no_grad():
        weights = [int4.expert_weights(expert, torch.float32) for expert in range(int4.num_experts)]
        dense.gate_up_proj.copy_(torch.stack([gate_up for gate_up, _ in weights]) + delta_gate_up)
        dense.down_proj.copy_(torch.stack([down for _, down in weights]) + delta_down)
    computed = []
    project = int4.project
    int4.project = lambda x, expert, projection: computed.append(expert) or project(x, expert, projection)
    x, tokens_per_expert = torch.randn(10, int4.hidden_size), torch.tensor([3, 0, 5, 2])
    with torch.no_grad():
        torch.testing.assert_close(layer(x, tokens_per_expert), dense.forward_loop(x, tokens_per_expert))
    assert sorted(set(computed)) == [0, 2, 3]


def test_gradients_reach_the_adapters_of_routed_experts_only(checkpoint):
    peft_model = get_peft_model(int4_model(checkpoint), expert_lora(init_lora_weights=False))
    routed = {}

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        routed[module] = args[1] > 0  # tokens_per_expert [E]

    for layer in lora_layers(peft_model):
        layer.register_forward_hook(record)
    ids = tokens(batch=1, seq=2)  # at most 2 of the 4 experts get tokens in each layer
    peft_model.train()
    peft_model(ids).logits.square().mean().backward()  # every position counts (a LM loss skips the last one)
    assert len(routed) == 4 and not all(mask.all() for mask in routed.values())
    for layer, mask in routed.items():
        for name in layer.adapter_layer_names:
            grad = getattr(layer, name)["default"].grad  # [E, ...]
            assert torch.equal(grad.flatten(1).abs().sum(1) > 0, mask), name
    assert all(buffer.grad is None for buffer in peft_model.buffers())


def test_training_moves_only_the_adapters_and_they_save_and_load(checkpoint, tmp_path):
    model, ids = int4_model(checkpoint), tokens()
    frozen, base_logits = int4_buffers(model), logits(model, ids)
    peft_model = get_peft_model(model, expert_lora(target_modules=["experts", "v_proj"]))
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(5):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    after = int4_buffers(peft_model)
    assert after.keys() == frozen.keys() and all(torch.equal(after[name], frozen[name]) for name in frozen)

    peft_model.eval()
    expected = logits(peft_model, ids)
    assert (expected - base_logits).abs().max() > 1e-2
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(int4_model(checkpoint), tmp_path / "adapter")
    assert len(lora_layers(loaded)) == 4
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-6, rtol=0)


def test_merge_after_dequantize_equals_the_adapted_int4_model(checkpoint):
    """``dequantize()`` swaps the int4 experts (under the LoRA layers) for dense ones of ŵ; merging works."""
    model, ids = int4_model(checkpoint), tokens()
    peft_model = get_peft_model(model, expert_lora(target_modules=["experts", "q_proj"], init_lora_weights=False))
    adapted = logits(peft_model, ids)
    peft_model.get_base_model().dequantize(dtype=torch.float32)
    assert not hasattr(peft_model.config, "quantization_config") and not lora_layers(peft_model)[0]._int4_base()
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, Llama4Int4TextExperts) for m in merged.modules())
    assert not any(p.requires_grad for n, p in merged.named_parameters() if "experts" in n)
    torch.testing.assert_close(logits(merged, ids), adapted, atol=1e-5, rtol=0)


def test_merge_is_refused_and_unload_gives_the_base(checkpoint):
    model, ids = int4_model(checkpoint), tokens()
    base_logits = logits(model, ids)
    peft_model = get_peft_model(model, expert_lora(init_lora_weights=False))
    with pytest.raises(ValueError, match="Cannot merge LoRA adapters into int4 experts"):
        peft_model.merge_and_unload()
    assert not lora_layers(peft_model)[0].merged
    unloaded = peft_model.unload()
    assert isinstance(unloaded.model.layers[0].feed_forward.experts, Llama4Int4TextExperts)
    torch.testing.assert_close(logits(unloaded, ids), base_logits, atol=0, rtol=0)


def test_bfloat16_model_keeps_float32_adapters(checkpoint):
    peft_model = get_peft_model(int4_model(checkpoint, dtype=torch.bfloat16), expert_lora(init_lora_weights=False))
    ids = tokens()
    peft_model.train()
    loss = peft_model(ids, labels=ids).loss
    loss.backward()
    layer = lora_layers(peft_model)[0]
    assert torch.isfinite(loss) and layer.lora_down_B["default"].grad.dtype == torch.float32


def test_float32_adapters_on_bfloat16_rows_keep_no_float32_copy_of_the_rows(checkpoint):
    """The float32 adapters read float32 casts of the routed bf16 rows; autograd keeps the bf16 rows (cast again in
    backward) and, in float32, only the factors and the rank-r projections ``x Aᵀ``: each has r in its shape."""
    peft_model = get_peft_model(int4_model(checkpoint, dtype=torch.bfloat16), expert_lora(init_lora_weights=False))
    layer = lora_layers(peft_model.train())[0]
    x = torch.randn(10, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x, torch.tensor([3, 0, 5, 2]))
    float_saved = [tuple(t.shape) for t in saved if t.dtype == torch.float32]
    assert float_saved and all(layer.r["default"] in shape for shape in float_saved), float_saved
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.lora_gate_A["default"].grad.abs().sum() > 0
