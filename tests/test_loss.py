"""The chunked causal-LM loss (``modeling_llama4.loss``): the same loss and gradients as transformers' plain
``ForCausalLMLoss`` on materialised logits, and when the model takes it."""

from __future__ import annotations

import pytest
import torch

import modeling_llama4.loss
from modeling_llama4 import Llama4ForCausalLM
from modeling_llama4.tiny import SCOUT_LIKE, VOCAB, text_config_from_meta


def tiny_model() -> Llama4ForCausalLM:
    torch.manual_seed(0)
    return Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE)).train()


def tokens(batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))


def loss_and_gradients(model: Llama4ForCausalLM, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 tokens (the last one partial) instead of one chunk for the whole tiny batch."""
    monkeypatch.setattr(modeling_llama4.loss, "CHUNK_LOGITS", 7 * VOCAB)


@pytest.mark.parametrize(
    "loss_inputs",
    [
        pytest.param(lambda ids: dict(labels=ids), id="labels"),
        pytest.param(lambda ids: dict(labels=ids.masked_fill(ids % 3 == 0, -100)), id="ignored-labels"),
        pytest.param(lambda ids: dict(labels=ids, num_items_in_batch=torch.tensor(40)), id="num-items-in-batch"),
        pytest.param(lambda ids: dict(labels=ids, shift_labels=ids.roll(-1, dims=1)), id="shift-labels"),
    ],
)
def test_chunked_loss_and_gradients_equal_the_plain_loss(small_chunks, loss_inputs):
    model, ids = tiny_model(), tokens()
    inputs = dict(input_ids=ids, **loss_inputs(ids))
    plain_loss, plain_grads = loss_and_gradients(model, skip_logits=False, **inputs)
    loss, grads = loss_and_gradients(model, **inputs)  # training with labels: chunked by default
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == plain_grads.keys() and "lm_head.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bfloat16_loss_equals_the_plain_loss(small_chunks):
    model, ids = tiny_model().to(torch.bfloat16), tokens()
    plain_loss, plain_grads = loss_and_gradients(model, input_ids=ids, labels=ids, skip_logits=False)
    loss, grads = loss_and_gradients(model, input_ids=ids, labels=ids)
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-5)  # float32 CE on the same bf16 logits
    for name, grad in grads.items():  # bf16 rounding of chunk-by-chunk products
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-3, rtol=2e-2, msg=name)


def test_logits_are_skipped_only_when_training_with_labels():
    model, ids = tiny_model(), tokens()
    assert model(ids, labels=ids).logits is None
    assert model(ids).logits.shape == (*ids.shape, VOCAB)
    assert model(ids, labels=ids, skip_logits=False).logits is not None
    training_loss = model(ids, labels=ids).loss
    model.eval()
    evaluated = model(ids, labels=ids)
    assert evaluated.logits is not None
    torch.testing.assert_close(evaluated.loss, training_loss.detach(), atol=1e-6, rtol=1e-6)
    assert model(ids, labels=ids, skip_logits=True).logits is None


def test_a_custom_loss_function_gets_the_logits():
    model, ids = tiny_model(), tokens()
    seen = []

    def custom_loss(logits, labels, vocab_size, **kwargs):
        seen.append(logits.shape)
        return logits.float().square().mean()

    model.loss_function = custom_loss
    out = model(ids, labels=ids)
    assert seen == [(*ids.shape, VOCAB)] and out.logits is None
    torch.testing.assert_close(out.loss, model(ids, skip_logits=False).logits.float().square().mean())


def test_all_labels_ignored_gives_nan_like_the_plain_mean():
    model, ids = tiny_model(), tokens()
    labels = torch.full_like(ids, -100)
    assert model(ids, labels=labels).loss.isnan()
    assert model(ids, labels=labels, skip_logits=False).loss.isnan()


def test_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="labels hold 10 tokens but the hidden states 24"):
        modeling_llama4.loss.causal_lm_loss_from_hidden(torch.randn(2, 12, 8), torch.randn(5, 8), torch.zeros(10))
