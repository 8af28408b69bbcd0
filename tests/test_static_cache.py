"""Caches a user may pass (static, dynamic, transformers' ``cache_implementation="static"``) give the default cache's
tokens and logits or are refused; the static decode step compiles as one graph; ``experts_implementation`` selects
transformers' expert kernels with the same logits."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer, StaticCache

from modeling_llama4 import Llama4ForCausalLM
from modeling_llama4.tiny import SCOUT_LIKE, VOCAB, text_config_from_meta

CHUNK = SCOUT_LIKE["attention_chunk_size"]  # 8: prompt + new tokens span three chunks
PROMPT, NEW = 13, 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE)).eval()


def prompt(batch: int = 1, seq: int = PROMPT) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(5))


def greedy(model: Llama4ForCausalLM, input_ids: torch.Tensor, **kwargs):
    return model.generate(
        input_ids, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs
    )


def max_logit_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


CACHES = {
    "cache_implementation='static'": lambda model: dict(cache_implementation="static"),
    "StaticCache": lambda model: dict(cache=StaticCache(config=model.config, max_cache_len=PROMPT + NEW)),
    "DynamicCache()": lambda model: dict(cache=DynamicCache()),
    "DynamicCache(config)": lambda model: dict(cache=DynamicCache(config=model.config)),
}


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_generation_with_any_cache_equals_the_default_cache(model, cache, padded):
    input_ids = prompt(batch=2)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[0, :3] = 0
        input_ids[0, :3] = model.config.pad_token_id
    expected = greedy(model, input_ids, attention_mask=attention_mask)
    out = greedy(model, input_ids, attention_mask=attention_mask, **CACHES[cache](model))
    assert torch.equal(out.sequences, expected.sequences)
    assert max_logit_diff(out, expected) <= 1e-5


@torch.no_grad()
def test_static_cache_passed_to_forward_gives_the_uncached_logits(model):
    """Prefill then one token at a time through a ``StaticCache``: each step's logits equal one full forward."""
    input_ids = prompt(seq=PROMPT + NEW)
    expected = model(input_ids).logits
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
    logits = [model(input_ids[:, :PROMPT], cache=cache).logits]
    for position in range(PROMPT, PROMPT + NEW):
        logits.append(model(input_ids[:, position : position + 1], cache=cache).logits)
    assert (torch.cat(logits, dim=1) - expected).abs().max().item() <= 1e-5


def test_static_chunked_layers_hold_one_chunk_not_max_cache_len(model):
    cache = StaticCache(config=model.config, max_cache_len=64)
    greedy(model, prompt(), cache=cache)
    held = {
        layer_type: {
            layer.keys.shape[-2] for layer, t in zip(cache.layers, model.config.layer_types) if t == layer_type
        }
        for layer_type in set(model.config.layer_types)
    }
    assert held == {"chunked_attention": {CHUNK}, "full_attention": {64}}


def test_caches_that_drop_keys_a_query_sees_are_refused(model):
    short_window = text_config_from_meta(SCOUT_LIKE, attention_chunk_size=CHUNK // 2)
    with pytest.raises(ValueError, match=r"StaticCache cannot serve layer 0 \(chunked_attention\).*fewer than"):
        model(prompt(), cache=StaticCache(config=short_window, max_cache_len=64))
    sliding_everywhere = Cache(layers=[DynamicSlidingWindowLayer(sliding_window=64) for _ in model.config.layer_types])
    with pytest.raises(ValueError, match=r"Cache cannot serve layer 3 \(full_attention\).*global-attention"):
        model(prompt(), cache=sliding_everywhere)


@pytest.mark.slow
def test_static_decode_step_compiles_as_one_graph_and_generates_the_eager_tokens(model):
    """``torch._dynamo.explain``: one graph, no break. ``generate``'s own compiled decode (``compile_config``,
    fullgraph) gives the eager tokens; after the first step specialises on the Python length transformers' static
    sliding layer keeps, the next is generic and no later step recompiles. (Backend "eager": dynamo's tracing is
    what is tested; inductor's CPU code generation would take minutes here.)"""
    torch._dynamo.reset()
    input_ids = prompt()
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
    with torch.no_grad():
        model(input_ids, cache=cache)
        explained = torch._dynamo.explain(model.forward)(
            input_ids=input_ids[:, -1:], cache=cache, position_ids=torch.tensor([[PROMPT]])
        )
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)

    expected = greedy(model, input_ids, cache_implementation="static")
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # transformers compiles generate's decode on accelerators only
    torch._dynamo.reset()
    counters.clear()
    out = greedy(model, input_ids, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(out.sequences, expected.sequences)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.fixture(scope="module")
def top2_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE, num_experts_per_tok=2)).eval()
    path = tmp_path_factory.mktemp("top2")
    model.save_pretrained(path)
    return path, model


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_experts_implementation_gives_the_sparse_loop_logits(top2_checkpoint, implementation):
    path, reference = top2_checkpoint
    model = Llama4ForCausalLM.from_pretrained(path, experts_implementation=implementation).eval()
    assert model.get_experts_implementation() == {"": implementation}
    input_ids = prompt(batch=2)
    assert (model(input_ids).logits - reference(input_ids).logits).abs().max().item() <= 1e-5


def test_default_experts_implementation_is_the_sparse_loop_and_unknown_names_are_refused(top2_checkpoint):
    path, reference = top2_checkpoint
    assert reference.get_experts_implementation() == {"": "eager"}
    with pytest.raises(ValueError, match="experts_implementation='nope' is not one of"):
        Llama4ForCausalLM.from_pretrained(path, experts_implementation="nope")
