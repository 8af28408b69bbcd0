"""Long context: the mask-free attention path, blocked prefill and the one-chunk cache stay exact, allocate
nothing tokens × tokens, and temperature tuning holds at millions of tokens."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers.cache_utils import DynamicCache

from modeling_llama4 import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration
from modeling_llama4.attention import causal_attention_at_end
from modeling_llama4.cache import Llama4Cache
from modeling_llama4.rope import attention_temperature
from modeling_llama4.tiny import SCOUT_LIKE, VOCAB, text_config_from_meta

CHUNK = SCOUT_LIKE["attention_chunk_size"]  # 8
SEQ = 45  # five chunks and a part


def tokens(batch: int, seq: int, seed: int = 0, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, high, (batch, seq), generator=torch.Generator().manual_seed(seed))


def scout_like(**overrides) -> Llama4ForCausalLM:
    torch.manual_seed(0)
    return Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE, **overrides)).eval()


@pytest.fixture(scope="module")
def models():
    """(ours on sdpa, ours on eager: the masked path, transformers' built-in), all with the same weights."""
    ours = scout_like()
    masked = scout_like()
    masked.set_attn_implementation("eager")
    builtin = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**ours.config.to_dict())).eval()
    builtin.load_state_dict(ours.state_dict())
    return ours, masked, builtin


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("prefill_block_size", [None, CHUNK, 12, 64])
def test_mask_free_logits_equal_masked_path_and_builtin(models, prefill_block_size):
    """Blocks aligned with the chunks (8), straddling them (12) and longer than the prompt (64); None: no cache."""
    ours, masked, builtin = models
    ids = tokens(2, SEQ)
    use_cache = prefill_block_size is not None
    got = ours(ids, use_cache=use_cache, prefill_block_size=prefill_block_size).logits
    assert max_diff(got, masked(ids).logits) <= 1e-5
    assert max_diff(got, builtin(ids).logits) <= 1e-5


@torch.no_grad()
def test_cached_continuation_in_several_tokens_equals_one_forward(models):
    """Feeding 13 tokens after a 20-token prefix: lower-right causal in both layer types, across chunk ends."""
    ours, _, _ = models
    ids = tokens(1, 34)
    first = ours(ids[:, :20], use_cache=True)
    second = ours(ids[:, 20:33], cache=first.cache, use_cache=True)
    third = ours(ids[:, 33:], cache=second.cache, use_cache=True)
    full = ours(ids).logits
    assert max_diff(torch.cat([first.logits, second.logits, third.logits], dim=1), full) <= 1e-5


def test_lower_right_causal_attention_and_its_gradients_equal_the_masked_formula():
    """Queries at the end of longer keys (GQA), with and without autograd (the CPU merge has no backward)."""
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(2, 4, 5, 16, generator=generator, requires_grad=True)
    key, value = (torch.randn(2, 2, 13, 16, generator=generator, requires_grad=True) for _ in range(2))
    visible = torch.arange(13)[None] <= torch.arange(8, 13)[:, None]  # query i at position 8 + i
    scores = query @ key.repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    expected = scores.masked_fill(~visible, -torch.inf).softmax(-1) @ value.repeat_interleave(2, 1)
    with torch.no_grad():
        assert max_diff(causal_attention_at_end(query, key, value, 0.25), expected) <= 1e-6
    got = causal_attention_at_end(query, key, value, 0.25)
    weights = torch.randn(got.shape, generator=generator)
    for a, b in zip(
        torch.autograd.grad((got * weights).sum(), (query, key, value)),
        torch.autograd.grad((expected * weights).sum(), (query, key, value)),
    ):
        assert max_diff(a, b) <= 1e-5


@torch.no_grad()
def test_greedy_generation_equals_builtin(models):
    ours, _, builtin = models
    prompt = tokens(2, 30, seed=1)
    kwargs = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), builtin.generate(prompt, **kwargs))


@torch.no_grad()
def test_generate_prefills_long_prompts_in_blocks(models):
    """By default in blocks of ``attention_chunk_size`` but at least ``MIN_PREFILL_BLOCK`` tokens (here: one
    block), else of ``prefill_block_size``, passed to ``generate``."""
    ours, _, _ = models
    seen = []
    hook = ours.model.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    kwargs = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    try:
        ours.generate(tokens(1, 20), **kwargs)
        ours.generate(tokens(1, 20), prefill_block_size=16, **kwargs)
    finally:
        hook.remove()
    assert seen == [20, 1, 1] + [16, 4, 1, 1]


@torch.no_grad()
def test_left_padded_batch_equals_builtin(models):
    """Padded rows have their own chunk boundaries: they take the masked path, exactly as the built-in."""
    ours, _, builtin = models
    pad = ours.config.pad_token_id
    rows = tokens(1, 27, seed=2)[0], tokens(1, 14, seed=3)[0]
    batch = torch.stack([rows[0], torch.cat([torch.full((13,), pad), rows[1]])])
    mask = (torch.arange(27) >= torch.tensor([[0], [13]])).long()
    real = mask.bool()
    assert (
        max_diff(ours(batch, attention_mask=mask).logits[real], builtin(batch, attention_mask=mask).logits[real])
        <= 1e-5
    )
    kwargs = dict(attention_mask=mask, max_new_tokens=15, do_sample=False, eos_token_id=None)
    together = ours.generate(batch, **kwargs)
    assert torch.equal(together, builtin.generate(batch, **kwargs))
    alone = ours.generate(rows[1][None], max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=pad)
    assert torch.equal(together[1, -15:], alone[0, -15:])


@torch.no_grad()
def test_cache_keeps_the_chunk_in_progress_and_reports_its_bytes(models):
    ours, _, _ = models
    config = ours.config
    out = ours.generate(
        tokens(1, 30),
        max_new_tokens=3,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    cache = out.cache
    assert isinstance(cache, Llama4Cache)
    stored = 32  # 30 prompt tokens and 2 of the 3 new ones (the last is sampled, never fed back)
    per_token = 2 * config.num_key_value_heads * config.head_dim * 4  # keys and values, fp32
    kept = [stored % CHUNK if kind == "chunked_attention" else stored for kind in config.layer_types]
    assert [layer.keys.shape[-2] for layer in cache.layers] == kept == [0, 0, 0, 32]
    assert cache.nbytes == sum(kept) * per_token


@torch.no_grad()
def test_assisted_decoding_needs_a_croppable_cache_and_then_matches_greedy(models):
    ours, _, _ = models
    torch.manual_seed(1)
    assistant = Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE)).eval()
    prompt = tokens(1, 13, seed=8)
    kwargs = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    with pytest.raises(ValueError, match="cropped"):
        ours.generate(prompt, assistant_model=assistant, **kwargs)
    assisted = ours.generate(prompt, assistant_model=assistant, cache=DynamicCache(config=ours.config), **kwargs)
    assert torch.equal(assisted, ours.generate(prompt, **kwargs))


def tiny_multimodal() -> Llama4ForConditionalGeneration:
    """Scout-like text model (chunks of 8) with a 2-layer vision tower: 56-px tiles → 4 ``<|patch|>`` each."""
    text = text_config_from_meta(SCOUT_LIKE).to_dict()
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=56,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        projector_input_dim=64,
        projector_output_dim=64,
        vision_output_dim=64,
    )
    config = Llama4Config(text_config=text, vision_config=vision, image_token_index=VOCAB - 1)
    torch.manual_seed(0)
    return Llama4ForConditionalGeneration(config).eval()


@torch.no_grad()
def test_multimodal_mask_free_equals_masked_path_and_builtin():
    ours = tiny_multimodal()
    masked = tiny_multimodal()
    masked.set_attn_implementation("eager")
    ids = tokens(1, 40, seed=4, high=VOCAB - 1)
    ids[0, [5, 6, 7, 8, 14, 15, 16, 17, 30, 31, 32, 33]] = VOCAB - 1  # three tiles, the second across a chunk end
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    got = ours(input_ids=ids, pixel_values=pixels, use_cache=True, prefill_block_size=12).logits
    assert max_diff(got, masked(input_ids=ids, pixel_values=pixels).logits) <= 1e-5

    # the built-in's own forward is broken in transformers 5.24: drive its parts (tests/test_multimodal.py)
    builtin = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**ours.config.to_dict())).eval()
    builtin.load_state_dict(ours.state_dict())
    features = builtin.get_image_features(pixel_values=pixels, return_dict=True).last_hidden_state
    embeds = builtin.get_input_embeddings()(ids)
    patches = (ids == VOCAB - 1)[..., None]
    embeds = embeds.masked_scatter(patches, builtin.multi_modal_projector(features.flatten(0, 1)))
    assert max_diff(got, builtin.language_model(inputs_embeds=embeds).logits) <= 1e-5
    kwargs = dict(pixel_values=pixels, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, prefill_block_size=12, **kwargs), masked.generate(ids, **kwargs))


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns (kernels' own outputs included)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


@torch.no_grad()
def test_16k_prefill_allocates_nothing_tokens_by_tokens():
    """``generate`` on a 16K-token prompt: no op returns more than tokens × hidden elements (T × T is 256× that).

    The same probe on the built-in (masks from ``masking_utils``) sees a tokens × tokens tensor at 1K tokens.
    """
    seq = 16 * 1024
    model = scout_like(attention_chunk_size=512, max_position_embeddings=2 * seq)
    prompt = tokens(1, seq)
    probe = LargestTensor()
    with probe:
        model.generate(prompt, max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert probe.numel <= seq * model.config.hidden_size, probe.numel

    builtin = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**model.config.to_dict())).eval()
    probe = LargestTensor()
    with probe:
        builtin(prompt[:, :1024], logits_to_keep=1)
    assert probe.numel >= 1024 * 1024


def test_temperature_is_exact_at_ten_million_tokens():
    floor_scale, attn_scale = 8192, 0.1
    positions = torch.tensor([[0, 8190, 8191, 9_999_999, 10_000_000, 10_002_430, 10_002_431, 2**24 + 5]])
    got = attention_temperature(positions, floor_scale, attn_scale).flatten()
    expected = [1 + attn_scale * math.log((p + 1) // floor_scale + 1) for p in positions.flatten().tolist()]
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert got[5] < got[6]  # at position 10,002,431, pos + 1 = 1221 · 8192 starts a new floor_scale block


@torch.no_grad()
def test_mask_free_path_at_absolute_positions_in_the_millions():
    """A block at position 3M (NoPE temperature and chunk boundaries from absolute positions): same as masked."""
    ours = scout_like(max_position_embeddings=4_000_000, floor_scale=8192)
    masked = scout_like(max_position_embeddings=4_000_000, floor_scale=8192)
    masked.set_attn_implementation("eager")
    ids = tokens(1, 20, seed=6)
    positions = torch.arange(3_000_000, 3_000_020)[None]  # chunk-aligned, as the masked path counts chunks by index
    got = ours(ids, position_ids=positions, use_cache=True, prefill_block_size=CHUNK).logits
    assert max_diff(got, masked(ids, position_ids=positions).logits) <= 1e-5
