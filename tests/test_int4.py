"""int4 routed experts: the packed format, the quantized module, the transformers round trip, memory on paper."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from modeling_llama4 import Llama4Config, Llama4ForCausalLM, Llama4VisionConfig
from modeling_llama4.moe import Llama4TextExperts
from modeling_llama4.quantization_int4 import (
    Llama4Int4Config,
    Llama4Int4TextExperts,
    dequantize_int4,
    footprint_bytes,
    kv_cache_bytes,
    official_configs,
    parameter_counts,
    quantize_experts,
    quantize_int4,
)
from modeling_llama4.tiny import MAVERICK_LIKE, SCOUT_LIKE, VOCAB, text_config_from_meta

GROUP = 16  # divides the tiny hidden size (64) and expert size (48)
MAX_LOGIT_DELTA = 0.1  # measured 0.048 on the tiny model below (logit std 0.16); top-1 agreement 98%


def tokens(batch: int = 8, seq: int = 21, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    """A tiny Scout-like fp32 model, saved, and the model.

    Its experts get a quarter of unit gain (std ``0.25 / sqrt(fan_in)``) so that they move the logits: at the default
    init (std 0.02) they barely do. From gain 0.5 on, the int4 error flips routing decisions in later layers and
    top-1 agreement of this random model (whose logits are near-ties) drops below 75%.
    """
    torch.manual_seed(0)
    model = Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE)).eval()
    for module in model.modules():
        if isinstance(module, Llama4TextExperts):
            for weight in (module.gate_up_proj, module.down_proj):
                torch.nn.init.normal_(weight, std=0.25 * weight.shape[1] ** -0.5)
    path = tmp_path_factory.mktemp("dense")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def quantized(dense_checkpoint):
    path, _ = dense_checkpoint
    return Llama4ForCausalLM.from_pretrained(path, quantization_config=Llama4Int4Config(group_size=GROUP)).eval()


def test_round_trip_error_within_half_a_scale():
    weight = torch.randn(3, 128, 40)
    weight[0, 5, 7] = 40.0  # an outlier only widens its own group
    weight[1, :32] = 0.0  # all-zero groups stay zero
    qweight, scales = quantize_int4(weight, group_size=32)
    assert qweight.dtype == torch.uint8 and qweight.shape == (3, 64, 40)
    assert scales.dtype == torch.bfloat16 and scales.shape == (3, 4, 40)
    restored = dequantize_int4(qweight, scales, torch.float32)
    bound = scales.float().repeat_interleave(32, dim=1) / 2
    assert ((restored - weight).abs() <= bound * (1 + 1e-6)).all()
    assert (restored[1, :32] == 0).all()


def test_quantize_experts_gives_the_module_buffers():
    config = text_config_from_meta(SCOUT_LIKE)
    experts = Llama4TextExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    tensors = quantize_experts(experts.gate_up_proj.detach(), experts.down_proj.detach(), GROUP)
    module = Llama4Int4TextExperts(config, GROUP)
    assert {name: t.shape for name, t in tensors.items()} == {name: b.shape for name, b in module.named_buffers()}


def test_forward_equals_dense_experts_on_dequantized_weights_and_skips_idle_experts():
    config = text_config_from_meta(SCOUT_LIKE)
    dense = Llama4TextExperts(config)
    torch.nn.init.normal_(dense.gate_up_proj, std=0.1)
    torch.nn.init.normal_(dense.down_proj, std=0.1)
    quantized = Llama4Int4TextExperts.from_dense(dense, config, GROUP)
    with torch.no_grad():
        dense.gate_up_proj.copy_(
            dequantize_int4(quantized.gate_up_proj_qweight, quantized.gate_up_proj_scales, torch.float32)
        )
        dense.down_proj.copy_(dequantize_int4(quantized.down_proj_qweight, quantized.down_proj_scales, torch.float32))
    tokens_per_expert = torch.tensor([3, 0, 5, 0])
    x = torch.randn(8, config.hidden_size)
    dequantized = []
    expert_weights = quantized.expert_weights
    quantized.expert_weights = lambda expert, dtype: dequantized.append(expert) or expert_weights(expert, dtype)
    with torch.no_grad():
        torch.testing.assert_close(quantized(x, tokens_per_expert), dense.forward_loop(x, tokens_per_expert))
    assert dequantized == [0, 2]


@torch.no_grad()
def test_quantized_logits_close_to_the_original(dense_checkpoint, quantized):
    _, original = dense_checkpoint
    ids = tokens()
    expected, got = original(ids).logits, quantized(ids).logits
    agreement = (expected.argmax(-1) == got.argmax(-1)).float().mean()
    delta = (expected - got).abs().max()
    assert agreement >= 0.95, agreement
    assert 1e-2 < delta <= MAX_LOGIT_DELTA, delta  # quantization changed something, within the documented bound


def test_only_routed_experts_are_quantized(quantized):
    layer = quantized.model.layers[0]
    assert isinstance(layer.feed_forward.experts, Llama4Int4TextExperts)
    assert not any(
        name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name, _ in quantized.named_parameters()
    )
    assert layer.feed_forward.shared_expert.gate_proj.weight.dtype == layer.self_attn.q_proj.weight.dtype
    assert quantized.config.quantization_config.group_size == GROUP


@torch.no_grad()
def test_saved_checkpoint_reloads_to_identical_logits(quantized, tmp_path):
    quantized.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "llama4_int4", "bits": 4, "group_size": GROUP}
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.feed_forward.experts.gate_up_proj_qweight").get_dtype() == "U8"
        assert "model.layers.0.feed_forward.experts.gate_up_proj" not in f.keys()
    reloaded = Llama4ForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens()
    assert torch.equal(reloaded(ids).logits, quantized(ids).logits)
    assert reloaded.get_memory_footprint() == quantized.get_memory_footprint()


def test_footprint_matches_the_formula(dense_checkpoint, quantized):
    _, original = dense_checkpoint
    counts = parameter_counts(original.config)
    assert sum(counts.values()) == original.num_parameters()
    rotary = sum(b.numel() * b.element_size() for name, b in original.named_buffers() if "rotary" in name)
    assert original.get_memory_footprint() == footprint_bytes(counts, dtype_bytes=4) + rotary
    assert quantized.get_memory_footprint() == footprint_bytes(counts, dtype_bytes=4, int4_group_size=GROUP) + rotary


@pytest.mark.parametrize("args", [SCOUT_LIKE, MAVERICK_LIKE], ids=["scout", "maverick"])
def test_parameter_counts_by_part(args):
    config = text_config_from_meta(args, attention_bias=True, tie_word_embeddings=True)
    model = Llama4ForCausalLM(config)
    assert sum(parameter_counts(config).values()) == model.num_parameters()
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert parameter_counts(config)["routed experts"] == experts


def test_vision_count_matches_the_peer_modules():
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=28)
    vision.update(patch_size=14, vision_output_dim=24, projector_input_dim=40, projector_output_dim=40)
    text = text_config_from_meta(SCOUT_LIKE)
    ours = Llama4Config(text_config=text, vision_config=Llama4VisionConfig(**vision))
    peer_config = transformers.Llama4Config(text_config=text.to_dict(), vision_config=vision)
    peer_vision = transformers.Llama4VisionModel(peer_config.vision_config)
    peer_projector = transformers.models.llama4.modeling_llama4.Llama4MultiModalProjector(peer_config)
    peer = sum(p.numel() for module in (peer_vision, peer_projector) for p in module.parameters())
    assert parameter_counts(ours)["vision"] == peer


def test_official_sizes():
    configs = official_configs()
    scout, maverick = (parameter_counts(configs[name]) for name in ("Scout", "Maverick"))
    assert 108e9 < sum(scout.values()) < 110e9  # "109B total"
    assert 398e9 < sum(maverick.values()) < 402e9  # "400B total"
    for counts, experts in ((scout, 16), (maverick, 128)):
        active = sum(counts.values()) - counts["vision"] - counts["routed experts"] * (1 - 1 / experts)
        assert 17e9 < active < 17.5e9  # "17B active"
    # 12 global layers hold all 131072 tokens, 36 chunked ones 8192: 4 KiB per token per layer in bf16.
    assert kv_cache_bytes(configs["Scout"], 131072) == (12 * 131072 + 36 * 8192) * 4096


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=8), "only 4-bit"),
        (dict(group_size=0), "positive even"),
        (dict(group_size=128, scheme="nf4"), "Unknown"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Llama4Int4Config(**kwargs)


@pytest.mark.parametrize("group_size, name", [(32, "intermediate_size"), (96, "hidden_size")])
def test_group_size_must_divide_the_model(dense_checkpoint, group_size, name):
    path, _ = dense_checkpoint
    with pytest.raises(ValueError, match=name):
        Llama4ForCausalLM.from_pretrained(path, quantization_config=Llama4Int4Config(group_size=group_size))
