"""Generation and offload paths on the text model: streaming, pipelines, device_map offload (tensor and expert
parallel: test_parallel.py)."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers

from modeling_llama4 import Llama4ForCausalLM
from modeling_llama4.tiny import SCOUT_LIKE, VOCAB, text_config_from_meta


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny text checkpoint and the model it came from."""
    torch.manual_seed(0)
    model = Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE)).eval()
    path = tmp_path_factory.mktemp("tiny-text")
    model.save_pretrained(path)
    return path, model


def prompt_ids(seq: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, seq), generator=torch.Generator().manual_seed(5))


class IdStreamer(transformers.generation.streamers.BaseStreamer):
    """Collects the token ids ``generate`` streams, after the prompt."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1))

    def end(self) -> None:
        pass


@torch.no_grad()
def test_streamer_receives_the_generated_tokens_from_a_thread(checkpoint):
    _, model = checkpoint
    streamer = IdStreamer()
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    thread = threading.Thread(target=model.generate, args=(prompt_ids(),), kwargs=dict(kwargs, streamer=streamer))
    thread.start()
    thread.join(timeout=60)
    expected = model.generate(prompt_ids(), **kwargs)
    streamed = torch.cat(streamer.chunks[1:])  # the first chunk is the prompt
    assert torch.equal(streamed, expected[0, -6:])


@torch.no_grad()
def test_generate_stops_on_any_of_several_eos_ids(checkpoint):
    _, model = checkpoint
    free_run = model.generate(prompt_ids(), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    stop_at = int(free_run[0, -5])  # the 4th new token
    stopped = model.generate(prompt_ids(), max_new_tokens=8, do_sample=False, eos_token_id=[VOCAB - 1, stop_at])
    first = (free_run[0, 9:] == stop_at).nonzero()[0].item()
    assert stopped.shape[1] == 9 + first + 1


@torch.no_grad()
def test_device_map_offload_gives_the_same_logits(checkpoint, tmp_path):
    path, model = checkpoint
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        path,
        device_map="auto",
        max_memory={"cpu": "200KB"},
        offload_folder=str(tmp_path / "offload"),
    )
    assert "disk" in set(offloaded.hf_device_map.values())
    ids = prompt_ids()
    assert torch.allclose(offloaded(ids).logits, model(ids).logits, atol=1e-5)


@torch.no_grad()
def test_chunked_layers_cache_at_most_one_chunk(checkpoint):
    _, model = checkpoint
    out = model(prompt_ids(seq=30), use_cache=True)
    chunk = model.config.attention_chunk_size
    for layer, layer_type in zip(out.cache.layers, model.config.layer_types):
        kept = layer.keys.shape[-2]
        assert kept == (30 if layer_type == "full_attention" else 30 % chunk), layer_type  # the chunk in progress
