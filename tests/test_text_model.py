"""The text backbone against Meta's reference and transformers' built-in Llama 4, plus its own invariants."""

from __future__ import annotations

import pytest
import torch
import transformers
from meta_reference import build_reference, native_to_hf_state_dict, reference_logits

import modeling_llama4
from modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from modeling_llama4.moe import Llama4TextMoe
from modeling_llama4.tiny import MAVERICK_LIKE, SCOUT_LIKE, VOCAB, text_config_from_meta

SEQ = 21  # > two chunks of 8


@pytest.fixture(scope="module", params=["scout", "maverick"])
def pair(request):
    """(Meta's reference, our model with the same weights, native params) for one tiny config."""
    args = SCOUT_LIKE if request.param == "scout" else MAVERICK_LIKE
    reference = build_reference(args, seed=1)
    ours = Llama4ForCausalLM(text_config_from_meta(args)).eval()
    ours.load_state_dict(native_to_hf_state_dict(reference.state_dict(), multimodal=False), strict=True)
    return reference, ours, args


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_meta_reference(pair):
    reference, ours, _ = pair
    ids = tokens()
    expected = reference_logits(reference, ids)
    for implementation in ("sdpa", "eager"):
        ours.set_attn_implementation(implementation)
        got = ours(ids).logits
        assert (got - expected).abs().max() <= 1e-5, implementation
    ours.set_attn_implementation("sdpa")


@torch.no_grad()
def test_temperature_tuning_and_chunking_are_exercised(pair):
    """Guard against a parity test that passes because the features never fire: breaking each changes logits."""
    reference, ours, args = pair
    ids = tokens()
    expected = reference_logits(reference, ids)
    for field, value in (("floor_scale", 10_000), ("attention_chunk_size", 64)):
        broken = Llama4ForCausalLM(text_config_from_meta(args, **{field: value})).eval()
        broken.load_state_dict(ours.state_dict())
        assert (broken(ids).logits - expected).abs().max() > 1e-2, field


@torch.no_grad()
def test_logits_match_transformers_builtin(pair, tmp_path):
    _, ours, _ = pair
    theirs = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**ours.config.to_dict())).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ids = tokens()
    assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-5

    ours.save_pretrained(tmp_path / "ours")
    loaded = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(loaded(ids).logits, theirs(ids).logits)
    theirs.save_pretrained(tmp_path / "theirs")
    reloaded = Llama4ForCausalLM.from_pretrained(tmp_path / "theirs").eval()
    assert torch.equal(reloaded(ids).logits, ours(ids).logits)


@torch.no_grad()
def test_generate_with_cache_equals_recompute_across_chunks(pair):
    _, ours, _ = pair
    prompt = tokens(batch=1, seq=5)
    generated = ours.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)
    step_by_step = prompt
    for _ in range(14):
        next_token = ours(step_by_step, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        step_by_step = torch.cat([step_by_step, next_token], dim=1)
    assert torch.equal(generated, step_by_step)


@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone(pair):
    _, ours, _ = pair
    long_row, short_row = tokens(1, 11, seed=3)[0], tokens(1, 6, seed=4)[0]
    pad = ours.config.pad_token_id
    batch = torch.stack([long_row, torch.cat([torch.full((5,), pad), short_row])])
    mask = (torch.arange(11) >= torch.tensor([[0], [5]])).long()
    together = ours.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    for row, prompt in enumerate((long_row, short_row)):
        alone = ours.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=pad)
        assert torch.equal(together[row, -12:], alone[0, -12:]), row


def test_sparse_moe_equals_dense_formula():
    config = text_config_from_meta(SCOUT_LIKE, num_experts_per_tok=2)
    moe = Llama4TextMoe(config)
    for parameter in moe.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    x = torch.randn(3, 7, config.hidden_size)
    with torch.no_grad():
        got = moe(x)
        flat = x.reshape(-1, config.hidden_size)
        logits = moe.router(flat)[2]
        top = logits.topk(2, dim=-1)
        gate = torch.zeros_like(logits).scatter(1, top.indices, torch.sigmoid(top.values))  # [T, E]
        expected = moe.shared_expert(flat)
        for e in range(config.num_local_experts):
            gate_up = (flat * gate[:, e : e + 1]) @ moe.experts.gate_up_proj[e]
            g, u = gate_up.chunk(2, dim=-1)
            expected = expected + (torch.nn.functional.silu(g) * u) @ moe.experts.down_proj[e]
    assert (got.reshape(-1, config.hidden_size) - expected).abs().max() < 1e-5


def test_grouped_and_loop_experts_agree():
    config = text_config_from_meta(SCOUT_LIKE)
    moe = Llama4TextMoe(config)
    for parameter in moe.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    x = torch.randn(40, config.hidden_size)
    counts = torch.tensor([10, 0, 25, 5])
    with torch.no_grad():
        grouped = moe.experts.forward_grouped(x, counts)
        loop = moe.experts.forward_loop(x, counts)
    assert torch.allclose(grouped, loop, atol=1e-5)


def test_backward_gradient_checkpointing_and_router_aux_loss():
    config = text_config_from_meta(SCOUT_LIKE, output_router_logits=True)
    model = Llama4ForCausalLM(config).train()
    model.activation_checkpointing_enable()
    ids = tokens()
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and len(out.router_logits) == config.num_hidden_layers
    out.loss.backward()
    assert model.model.layers[0].feed_forward.router.weight.grad.abs().sum() > 0
    assert model.model.layers[0].feed_forward.experts.gate_up_proj.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(hidden_size=64, num_attention_heads=5), "num_attention_heads"),
        (dict(num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads"),
        (dict(attention_chunk_size=0), "attention_chunk_size"),
        (dict(num_local_experts=-2), "num_local_experts"),
        (dict(num_local_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(num_hidden_layers=2, moe_layers=[3]), "moe_layers"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 0.5}), "rope_parameters"),
        (
            dict(
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=1e4,
                    factor=8.0,
                    low_freq_factor=4.0,
                    high_freq_factor=1.0,
                    original_max_position_embeddings=8192,
                )
            ),
            "high_freq_factor",
        ),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        Llama4TextConfig(**fields)


def test_auto_classes_resolve_to_this_package(tmp_path):
    config = text_config_from_meta(SCOUT_LIKE)
    Llama4ForCausalLM(config).save_pretrained(tmp_path)
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), Llama4TextConfig)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model) is Llama4ForCausalLM
    assert type(transformers.AutoModel.from_config(config)) is modeling_llama4.Llama4TextModel


def test_context_length_is_enforced():
    model = Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE, max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(tokens(1, 17))


def test_resize_token_embeddings_resizes_embedding_and_head():
    model = Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE))
    model.resize_token_embeddings(VOCAB + 16)
    assert model.lm_head.weight.shape[0] == model.model.embed_tokens.weight.shape[0] == VOCAB + 16
    assert model(torch.tensor([[VOCAB + 15, 5]])).logits.shape[-1] == VOCAB + 16
