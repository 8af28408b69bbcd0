"""Bad configs and bad model inputs: a ValueError naming the field or input, before any computation."""

from __future__ import annotations

import re

import pytest
import torch

from modeling_llama4 import Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig, Llama4VisionConfig
from modeling_llama4.tiny import SCOUT_LIKE, TILE_SIZE, VOCAB, text_config_from_meta, tiny_config
from modeling_llama4.validation import _check_token_ids

# Configs


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}, "rope_theta"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, "rope_theta"),
        ({"hidden_act": "swishy"}, "hidden_act"),
        ({"pad_token_id": VOCAB}, "pad_token_id"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_key_value_heads": 2.0}, "num_key_value_heads"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
        ({"use_qk_norm": "yes"}, "use_qk_norm"),
        ({"moe_layers": "all"}, "moe_layers"),
        ({"no_rope_layers": [1, "0", 1, 1]}, "no_rope_layers"),
        ({"max_position_embeddings": -5}, "max_position_embeddings"),
    ],
)
def test_bad_text_config(overrides, field):
    with pytest.raises(ValueError, match=rf"`{field}|{field}'\]`"):
        text_config_from_meta(SCOUT_LIKE, **overrides)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 16.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attention_chunk_size": 0}, "`attention_chunk_size` = 0"),
        ({"floor_scale": 0}, "`floor_scale` = 0"),
        ({"attn_scale": float("nan")}, "`attn_scale` = nan"),
        ({"rms_norm_eps": float("inf")}, "`rms_norm_eps` = inf"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}},
            r"`rope_parameters\['rope_theta'\]` = inf",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
            r"`rope_parameters\['rope_theta'\]` = nan",
        ),
        ({"rope_parameters": dict(LLAMA3_ROPE, factor=0.0)}, r"`rope_parameters\['factor'\]` = 0.0"),
        ({"rope_parameters": dict(LLAMA3_ROPE, factor=float("inf"))}, r"`rope_parameters\['factor'\]` = inf"),
        (
            {"rope_parameters": dict(LLAMA3_ROPE, high_freq_factor=-1.0)},
            r"`rope_parameters\['high_freq_factor'\]` = -1.0",
        ),
        ({"rope_parameters": dict(LLAMA3_ROPE, high_freq_factor=0.5)}, "expected >= low_freq_factor"),
    ],
)
def test_bad_values_built_directly(overrides, message):
    """`Llama4TextConfig(...)` as a user calls it: a ValueError naming the field and its value."""
    with pytest.raises(ValueError, match=message):
        Llama4TextConfig(num_hidden_layers=2, **overrides)


def test_scout_rope_saves_and_loads_without_warnings(tmp_path, caplog):
    """Scout's llama3 parameters (high == low == 1) are valid; transformers' own check would warn about them."""
    config = Llama4TextConfig(num_hidden_layers=2, rope_parameters=dict(LLAMA3_ROPE))
    config.save_pretrained(tmp_path)  # runs the config's validators, `validate_rope` included
    loaded = Llama4TextConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == LLAMA3_ROPE
    assert not [record for record in caplog.records if record.levelno >= 30], caplog.text


def test_bad_rope_theta_as_legacy_field():
    with pytest.raises(ValueError, match=r"`rope_parameters\['rope_theta'\]` = -5.0"):
        Llama4TextConfig(rope_theta=-5.0)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_act": "nope"}, "hidden_act"),
        ({"num_channels": 0}, "num_channels"),
        ({"hidden_size": "x"}, "hidden_size"),
    ],
)
def test_bad_vision_config(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        Llama4VisionConfig(**overrides)


def test_valid_config_accepts_ints_for_floats():
    config = text_config_from_meta(SCOUT_LIKE, rms_norm_eps=1, router_aux_loss_coef=0)
    assert config.rms_norm_eps == 1


# Model inputs


@pytest.fixture(scope="module")
def text_model() -> Llama4ForCausalLM:
    torch.manual_seed(0)
    return Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE)).eval()


@pytest.fixture(scope="module")
def multimodal() -> Llama4ForConditionalGeneration:
    torch.manual_seed(0)
    return Llama4ForConditionalGeneration(tiny_config()).eval()


@pytest.mark.parametrize(
    "input_ids, message",
    [
        (torch.tensor([[1, VOCAB]]), rf"input_ids holds token id {VOCAB}, outside the vocabulary \[0, {VOCAB}\)"),
        (torch.tensor([[-3, 4]]), rf"input_ids holds token id -3, outside the vocabulary \[0, {VOCAB}\)"),
        (torch.zeros(1, 0, dtype=torch.long), r"input_ids is empty \(shape \(1, 0\)\)"),
        (torch.tensor([1, 2, 3]), r"input_ids must be an integer tensor \[batch, sequence\]"),
        (torch.tensor([[1.0, 2.0]]), r"input_ids must be an integer tensor"),
    ],
)
def test_bad_input_ids(text_model, input_ids, message):
    with pytest.raises(ValueError, match=message):
        text_model(input_ids=input_ids)


def test_token_range_is_read_at_prefill_only_off_the_cpu(text_model):
    """Off the CPU, reading the ids' range waits for the device: decode steps skip it (``meta`` stands in for an
    accelerator here: reading its values would raise), prefill and CPU ids do not."""
    ids = torch.arange(1, 6)[None]
    with torch.no_grad():
        cache = text_model(input_ids=ids, use_cache=True).cache
    _check_token_ids(torch.zeros(1, 1, dtype=torch.long, device="meta"), VOCAB, cache)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _check_token_ids(torch.tensor([[VOCAB]]), VOCAB, cache)
    with pytest.raises(Exception, match="meta"):
        _check_token_ids(torch.zeros(1, 1, dtype=torch.long, device="meta"), VOCAB, None)


def test_bad_inputs_embeds(text_model):
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, sequence >= 1, hidden_size=64\]"):
        text_model(inputs_embeds=torch.zeros(1, 3, 32))


@pytest.mark.parametrize("mask_length", [4, 6])
def test_attention_mask_of_the_wrong_length(text_model, mask_length):
    with pytest.raises(ValueError, match=rf"attention_mask has shape \(1, {mask_length}\), expected \(1, 5\)"):
        text_model(input_ids=torch.arange(1, 6)[None], attention_mask=torch.ones(1, mask_length, dtype=torch.long))


def test_attention_mask_with_a_cache(text_model):
    """A cached forward's mask covers the past and the new tokens; only the new ones is refused."""
    ids = torch.arange(1, 6)[None]
    with torch.no_grad():
        cache = text_model(input_ids=ids, use_cache=True).cache
        text_model(input_ids=torch.tensor([[7]]), attention_mask=torch.ones(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 1\), expected \(1, 7\)"):
            text_model(input_ids=torch.tensor([[8]]), attention_mask=torch.ones(1, 1, dtype=torch.long), cache=cache)


def test_router_aux_loss_on_a_cached_forward(text_model):
    ids = torch.arange(1, 6)[None]
    with torch.no_grad():
        full = text_model(input_ids=ids, use_cache=True, output_router_logits=True)
        step = text_model(
            input_ids=torch.tensor([[7]]),
            attention_mask=torch.ones(1, 6, dtype=torch.long),
            cache=full.cache,
            output_router_logits=True,
        )
    assert torch.isfinite(step.aux_loss) and torch.isfinite(full.aux_loss)


def test_generate_past_the_context_is_refused_up_front(text_model):
    prompt = torch.arange(1, 121)[None]  # max_position_embeddings is 128
    with pytest.raises(ValueError, match=r"lower max_new_tokens to at most 8"):
        text_model.generate(prompt, max_new_tokens=9, do_sample=False)
    assert text_model.generate(prompt, max_new_tokens=8, do_sample=False).shape == (1, 128)


@pytest.mark.parametrize(
    "mask",
    [
        torch.ones(1, 4, dtype=torch.long),  # shorter than the prompt: used to fail in rope.py
        torch.ones(1, 6, dtype=torch.long),  # longer: used to be accepted
        torch.ones(5, dtype=torch.long),  # 1-D: used to raise IndexError
        torch.ones(1, 5, 5, dtype=torch.long),
        torch.ones(1, 1, 5, 5, dtype=torch.long),
        torch.ones(2, 5, dtype=torch.long),  # one row per prompt
    ],
    ids=lambda mask: "x".join(map(str, mask.shape)),
)
def test_generate_with_an_attention_mask_of_the_wrong_shape(text_model, mask):
    message = rf"attention_mask has shape {re.escape(str(tuple(mask.shape)))}, expected \(1, 5\)"
    with pytest.raises(ValueError, match=message):
        text_model.generate(torch.arange(1, 6)[None], attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_generate_with_a_padded_mask_still_works(text_model):
    prompt = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = text_model.generate(prompt, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eos_token_id": VOCAB + 5}, rf"eos_token_id = {VOCAB + 5} holds token id {VOCAB + 5}"),
        ({"eos_token_id": [2, VOCAB]}, rf"eos_token_id = \[2, {VOCAB}\] holds token id {VOCAB}"),
        ({"bos_token_id": -1}, r"bos_token_id = -1 holds token id -1"),
        ({"pad_token_id": VOCAB}, rf"pad_token_id = {VOCAB} holds token id {VOCAB}"),
    ],
)
def test_generate_with_special_token_ids_outside_the_vocabulary(text_model, overrides, message):
    with pytest.raises(ValueError, match=rf"{message}, outside the vocabulary \[0, {VOCAB}\)"):
        text_model.generate(torch.arange(1, 6)[None], max_new_tokens=2, do_sample=False, **overrides)


def test_generate_from_a_prompt_longer_than_the_context(text_model):
    prompt = torch.arange(1, 141)[None] % VOCAB  # max_position_embeddings is 128
    message = (
        "the prompt is 140 tokens long, but the model's context is max_position_embeddings=128 tokens, so no token "
        "can be generated: shorten the prompt to at most 127 tokens"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        text_model.generate(prompt, max_new_tokens=2, do_sample=False)


def patch_prompt(model: Llama4ForConditionalGeneration, patches: int) -> torch.Tensor:
    return torch.tensor([[200000] + [model.config.image_token_id] * patches + [200008]])


def test_patch_tokens_without_pixel_values(multimodal):
    with pytest.raises(ValueError, match=r"input_ids holds image patch tokens \(id 200092\) but no pixel_values"):
        multimodal(input_ids=patch_prompt(multimodal, 4))


@pytest.mark.parametrize(
    "shape", [(1, 1, TILE_SIZE, TILE_SIZE), (3, TILE_SIZE, TILE_SIZE), (1, 3, TILE_SIZE, TILE_SIZE + 14)]
)
def test_bad_pixel_values(multimodal, shape):
    with pytest.raises(ValueError, match=rf"pixel_values must be image tiles of shape \('num_tiles', 3, {TILE_SIZE}"):
        multimodal(input_ids=patch_prompt(multimodal, 4), pixel_values=torch.zeros(shape))


def test_multimodal_token_ids(multimodal):
    vocab = multimodal.config.text_config.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids holds token id {vocab}, outside the vocabulary"):
        multimodal(input_ids=torch.tensor([[1, vocab]]))


def test_multimodal_generate_with_an_image_still_works(multimodal):
    pixel_values = torch.randn(1, 3, TILE_SIZE, TILE_SIZE)
    for use_cache in (True, False):
        out = multimodal.generate(
            input_ids=patch_prompt(multimodal, 4), pixel_values=pixel_values, max_new_tokens=2, use_cache=use_cache
        )
        assert out.shape == (1, 8)
