"""End to end, the user's path: Meta's native checkpoint → ``llama4-convert`` → Auto classes → a chat with two
images, against Meta's reference (ChatFormat + VisionEmbeddings + Transformer) and transformers' built-in."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import transformers
from meta_reference import build_reference, cuda_is_noop
from PIL import Image
from test_conversion import VISION_ARGS, native_state, write_native

import modeling_llama4
from conversion.convert import convert_native_to_hf

FULL_VOCAB_ARGS = dict(VISION_ARGS, vocab_size=202048, max_seq_len=256)  # the real tokenizer's ids


def image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(Meta's reference in fp32, the converted checkpoint's folder), from one tiny random multimodal model."""
    reference = build_reference(FULL_VOCAB_ARGS, seed=7)
    reference.vision_embeddings.float()  # Meta keeps its vision encoder in bf16; compare in fp32
    root = tmp_path_factory.mktemp("e2e")
    tokenizer_model = modeling_llama4.default_tokenizer_model_path()
    state = {key: tensor.float().clone() for key, tensor in native_state(reference).items()}
    reference.load_state_dict(state)  # both sides hold the same (bf16-representable) weights
    native = write_native(root / "native", FULL_VOCAB_ARGS, state, tokenizer_model)
    return reference, convert_native_to_hf(native, root / "hf", dtype="float32", instruct=True)


@pytest.fixture(scope="module")
def ours(converted):
    _, path = converted
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=True)
    return model, processor


IMAGES = [image(60, 150, seed=1), image(30, 40, seed=2)]  # a tiled image (+ global view) and a one-tile one


def chat_messages():
    return [
        {"role": "system", "content": "You describe pictures."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": IMAGES[0]},
                {"type": "text", "text": "Compare this one"},
                {"type": "image", "image": IMAGES[1]},
                {"type": "text", "text": " with that one."},
            ],
        },
    ]


def meta_chat(reference):
    """Token ids, tiles and logits of the chat the way Meta's generation code computes them."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama4.args import ModelArgs
    from llama_models.llama4.chat_format import ChatFormat
    from llama_models.llama4.datatypes import MaskedEmbedding, TransformerInput
    from llama_models.llama4.tokenizer import Tokenizer

    tokenizer = Tokenizer(modeling_llama4.default_tokenizer_model_path())
    chat = ChatFormat(tokenizer, vision_args=ModelArgs(**FULL_VOCAB_ARGS).vision_args, max_num_chunks=16)
    user = [
        RawMediaItem(data=png_bytes(IMAGES[0])),
        RawTextItem(text="Compare this one"),
        RawMediaItem(data=png_bytes(IMAGES[1])),
        RawTextItem(text=" with that one."),
    ]
    prompt = chat.encode_dialog_prompt(
        [RawMessage(role="system", content="You describe pictures."), RawMessage(role="user", content=user)]
    )
    ids = torch.tensor([prompt.tokens])
    mask = (ids == tokenizer.special_tokens["<|patch|>"]).unsqueeze(-1)
    with torch.inference_mode(), cuda_is_noop():
        h = reference.tok_embeddings(ids)
        embedding = reference.vision_embeddings([[tile.float() for tile in prompt.images]], mask, h)
        logits = reference(TransformerInput(ids, 0, MaskedEmbedding(embedding=embedding, mask=mask))).logits
    return ids, torch.cat(prompt.images), logits


def test_chat_with_two_images_matches_meta(converted, ours):
    reference, _ = converted
    model, processor = ours
    inputs = processor.apply_chat_template(
        chat_messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids, tiles, expected = meta_chat(reference)
    assert torch.equal(inputs["input_ids"], ids)
    assert inputs["pixel_values"].shape[0] > 2 and torch.equal(inputs["pixel_values"], tiles)  # tiled + global + 1
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits - expected).abs().max() <= 1e-5


def test_matches_transformers_builtin_parts(converted, ours):
    """The built-in's multimodal forward raises in 5.24 (``AttributeError: 'MoeCausalLMOutputWithPast' object has
    no attribute 'image_outputs'``): drive its vision tower, projector and LM by hand."""
    _, path = converted
    model, processor = ours
    builtin = transformers.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor.apply_chat_template(
        chat_messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        features = builtin.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        projected = builtin.multi_modal_projector(features.last_hidden_state.flatten(0, 1))
        embeds = builtin.get_input_embeddings()(inputs["input_ids"])
        patch = (inputs["input_ids"] == builtin.config.image_token_id)[..., None]
        expected = builtin.language_model(inputs_embeds=embeds.masked_scatter(patch, projected)).logits
        assert (model(**inputs).logits - expected).abs().max() <= 1e-5


def test_generate_with_images_encodes_them_once(ours, monkeypatch):
    model, processor = ours
    inputs = processor.apply_chat_template(
        chat_messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    calls = []
    original = model.get_image_features
    monkeypatch.setattr(model, "get_image_features", lambda pixels: calls.append(pixels.shape) or original(pixels))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert len(calls) == 1


def test_patch_count_mismatch_names_both_counts(ours):
    model, processor = ours
    inputs = processor(text="<|image|>Hi", images=[IMAGES[1]], return_tensors="pt")
    ids = inputs["input_ids"]
    first_patch = int((ids[0] == model.config.image_token_id).nonzero()[0])
    ids = torch.cat([ids[:, :first_patch], ids[:, first_patch + 1 :]], dim=1)  # one <|patch|> too few
    with pytest.raises(ValueError, match=r"3 image patch tokens .* 4 features"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"])


def test_text_only_inputs_work_unchanged(ours):
    model, processor = ours
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    ids = torch.tensor(inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model.language_model(input_ids=ids).logits)


def test_image_text_to_text_pipeline(ours):
    model, processor = ours
    pipe = transformers.pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(text=chat_messages(), max_new_tokens=3, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)


def test_text_generation_pipeline(ours):
    model, processor = ours
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=processor.tokenizer)
    out = pipe([{"role": "user", "content": "Hello"}], max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"][-1]["role"] == "assistant"
