"""Continuous batching (transformers' ``generate_batch`` / ``init_continuous_batching``): each request's tokens equal
its own greedy ``generate``, the chunked layers served by the paged cache as one-chunk sliding windows plus the
chunk mask; the model's config is untouched; prompts with images are refused, not silently mis-read."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching import RequestStatus

import modeling_llama4.continuous_batching as continuous_batching
from modeling_llama4 import Llama4ForCausalLM, Llama4ForConditionalGeneration
from modeling_llama4.tiny import SCOUT_LIKE, VOCAB, text_config_from_meta, tiny_config

CHUNK = SCOUT_LIKE["attention_chunk_size"]  # 8: prompts of 3 to 21 tokens and 12 new ones span up to 5 chunks
LENGTHS = (3, 13, 8, 21, 5, 17)
# Small pages and batches: prompts longer than a batch are prefilled over several steps, the window wraps its pages.
PAGED = dict(num_blocks=64, max_batch_tokens=16, page_size=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE)).eval()


def prompts(vocab: int = VOCAB) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in LENGTHS]


def greedy(new_tokens: int = 12) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def batched(model, inputs: list[list[int]]) -> list[list[int]]:
    """Each prompt's generated tokens through ``generate_batch``, in prompt order."""
    outputs = model.generate_batch(
        inputs,
        generation_config=greedy(),
        continuous_batching_config=ContinuousBatchingConfig(**PAGED),
        progress_bar=False,
    )
    by_prompt = {tuple(out.prompt_ids): out for out in outputs.values()}
    assert all(out.status == RequestStatus.FINISHED for out in outputs.values()), outputs
    return [by_prompt[tuple(prompt)].generated_tokens for prompt in inputs]


def one_at_a_time(model, inputs: list[list[int]]) -> list[list[int]]:
    return [model.generate(torch.tensor([p]), generation_config=greedy())[0, len(p) :].tolist() for p in inputs]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_generate_batch_equals_each_requests_own_generate(model, attn_implementation):
    model.set_attn_implementation(attn_implementation)
    try:
        inputs = prompts()
        assert batched(model, inputs) == one_at_a_time(model, inputs)
    finally:
        model.set_attn_implementation("sdpa")
    assert model.config.layer_types == ["chunked_attention"] * 3 + ["full_attention"]  # the model's own, untouched
    assert getattr(model.config, "sliding_window", None) is None


def test_without_the_chunk_mask_the_tokens_differ(model, monkeypatch):
    """The sliding window alone lets queries see the previous chunk: the chunk mask is what makes the tokens equal."""
    monkeypatch.setattr(
        continuous_batching,
        "_chunk_start_mask",
        lambda position_ids, cu_q, cu_k, num_keys, chunk: torch.zeros(position_ids.shape[-1], num_keys, dtype=bool),
    )
    inputs = prompts()
    assert batched(model, inputs) != one_at_a_time(model, inputs)


def test_the_manager_api_streams_and_keeps_a_persistent_manager(model):
    inputs = prompts()[:2]
    manager = model.init_continuous_batching(
        generation_config=greedy(), continuous_batching_config=ContinuousBatchingConfig(**PAGED)
    )
    manager.start()
    try:
        request_ids = [manager.add_request(p, max_new_tokens=12, streaming=True) for p in inputs]
        streamed = {}
        for request_id in request_ids:
            for out in manager.request_id_iter(request_id):
                streamed[request_id] = out.generated_tokens
    finally:
        manager.stop(block=True)
    assert [streamed[request_id] for request_id in request_ids] == one_at_a_time(model, inputs)

    model.generate_batch(inputs, generation_config=greedy(), progress_bar=False, persistent_manager=True)
    kept = model.init_continuous_batching()
    assert kept is model._continuous_batching_view._cached_continuous_batching_manager
    model.destroy_cached_continuous_batching_manager()
    assert not hasattr(model._continuous_batching_view, "_cached_continuous_batching_manager")


@pytest.fixture(scope="module")
def multimodal():
    torch.manual_seed(0)
    return Llama4ForConditionalGeneration(tiny_config()).eval()


def test_multimodal_model_batches_text_requests(multimodal):
    inputs = prompts(vocab=300)
    assert batched(multimodal, inputs) == one_at_a_time(multimodal, inputs)
    assert multimodal.config.text_config.layer_types == ["chunked_attention", "full_attention"]


def test_a_prompt_with_image_tokens_is_refused(multimodal):
    image_prompt = prompts(vocab=300)[0] + [multimodal.config.image_token_id] * 4
    (out,) = multimodal.generate_batch(
        [image_prompt], generation_config=greedy(), continuous_batching_config=ContinuousBatchingConfig(**PAGED)
    ).values()
    assert out.status == RequestStatus.FAILED
    assert "image patch tokens" in out.error and "generate(" in out.error


def test_paged_config_is_a_view(model):
    view = continuous_batching.paged_config(model.config)
    assert view.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert view.sliding_window == CHUNK
    assert model.config.layer_types[0] == "chunked_attention"
    nested = continuous_batching.paged_config(copy.deepcopy(tiny_config()))
    assert nested.get_text_config().layer_types == ["sliding_attention", "full_attention"]


def test_a_config_reused_after_generate_batch_gets_an_error_naming_the_stop_marker(model):
    """The manager writes eos_token_id = -1 into a config without one; generate then says what that -1 is."""
    config = greedy()
    paged = ContinuousBatchingConfig(**PAGED)
    model.generate_batch(prompts()[:1], generation_config=config, continuous_batching_config=paged, progress_bar=False)
    assert config.eos_token_id == -1
    with pytest.raises(ValueError, match="continuous batching's 'no stop token' marker"):
        model.generate(torch.tensor([prompts()[0]]), generation_config=config)


def test_on_a_cpu_unset_cache_sizes_are_bounded_not_taken_from_free_ram(model):
    manager = model.init_continuous_batching(generation_config=greedy())
    config = manager.continuous_batching_config
    assert config.max_batch_tokens == continuous_batching.CPU_BATCH_TOKENS
    assert config.num_blocks * config.page_size == continuous_batching.CPU_CACHE_TOKENS
    mine = ContinuousBatchingConfig(num_blocks=7, page_size=16)
    kept = model.init_continuous_batching(greedy(), mine).continuous_batching_config
    assert (kept.num_blocks, kept.page_size, kept.max_batch_tokens) == (7, 16, continuous_batching.CPU_BATCH_TOKENS)
    assert mine.max_batch_tokens is None  # the caller's config is not modified
