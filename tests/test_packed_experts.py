"""``pack_experts``: the routed experts in oneDNN's packed layout give the dense model's logits, gradients to the
inputs and checkpoint, and unpack back to the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from modeling_llama4 import Llama4ForCausalLM
from modeling_llama4.moe import Llama4TextExperts
from modeling_llama4.packed_experts import (
    Llama4PackedTextExperts,
    pack_experts,
    packing_available,
    unpack_experts,
)
from modeling_llama4.tiny import MAVERICK_LIKE, SCOUT_LIKE, VOCAB, text_config_from_meta

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN CPU kernels")


def model_pair(args: dict) -> tuple[Llama4ForCausalLM, Llama4ForCausalLM]:
    torch.manual_seed(0)
    dense = Llama4ForCausalLM(text_config_from_meta(args)).eval()
    for experts in (m for m in dense.modules() if isinstance(m, Llama4TextExperts)):
        torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
        torch.nn.init.normal_(experts.down_proj, std=0.1)
    return dense, pack_experts(copy.deepcopy(dense))


@pytest.mark.parametrize("args", [SCOUT_LIKE, MAVERICK_LIKE], ids=["scout", "maverick"])
def test_packed_logits_and_generation_match_dense(args):
    dense, packed = model_pair(args)
    assert any(isinstance(m, Llama4PackedTextExperts) for m in packed.modules())
    assert not any(type(m) is Llama4TextExperts for m in packed.modules())
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (packed(ids).logits - dense(ids).logits).abs().max() <= 1e-5
        generate = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(packed.generate(ids, **generate), dense.generate(ids, **generate))


def test_gradient_reaches_the_inputs():
    dense, packed = model_pair(SCOUT_LIKE)
    ids = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (dense, packed):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds).logits.square().mean().backward()
        grads.append(embeds.grad)
    assert (grads[0] - grads[1]).abs().max() <= 1e-5


def test_state_dict_is_the_dense_checkpoint_and_unpacking_restores_it():
    dense, packed = model_pair(MAVERICK_LIKE)
    expected = dense.state_dict()
    saved = packed.state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    unpacked = unpack_experts(packed)
    assert not any(isinstance(m, Llama4PackedTextExperts) for m in unpacked.modules())
    assert all(torch.equal(value, expected[key]) for key, value in unpacked.state_dict().items())


def test_experts_off_cpu_are_refused():
    config = text_config_from_meta(SCOUT_LIKE)
    with torch.device("meta"):
        experts = Llama4TextExperts(config)
    with pytest.raises(ValueError, match="run on CPU"):
        Llama4PackedTextExperts(config, experts)
