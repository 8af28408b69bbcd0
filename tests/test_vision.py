"""The vision tower against Meta's reference and transformers' built-in Llama 4, plus its own invariants."""

from __future__ import annotations

import pytest
import torch
import transformers
from meta_reference import build_reference, cuda_is_noop, native_to_hf_state_dict
from transformers.models.llama4 import modeling_llama4 as builtin

from modeling_llama4 import Llama4Config, Llama4VisionConfig
from modeling_llama4.vision import Llama4MultiModalProjector, Llama4VisionModel, Llama4VisionRotaryEmbedding

TILE, PATCH, RATIO = 84, 14, 0.5  # 6 × 6 patches per tile → 3 × 3 = 9 tokens after the pixel shuffle
TEXT_DIM = 64


def meta_args(mlp_ratio: float) -> dict:
    """params.json of a tiny dense text model with a vision encoder of ``mlp_ratio``."""
    vision = dict(
        image_size=dict(height=TILE, width=TILE),
        patch_size=dict(height=PATCH, width=PATCH),
        dim=32,
        n_layers=2,
        n_heads=2,
        mlp_ratio=mlp_ratio,
        output_dim=48,
        pixel_shuffle_ratio=RATIO,
    )
    return dict(dim=TEXT_DIM, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=320, multiple_of=16, vision_args=vision)


def our_config(args: dict) -> Llama4Config:
    vision = args["vision_args"]
    vision_config = Llama4VisionConfig(
        hidden_size=vision["dim"],
        num_hidden_layers=vision["n_layers"],
        num_attention_heads=vision["n_heads"],
        intermediate_size=int(vision["mlp_ratio"] * vision["dim"]),
        image_size=TILE,
        patch_size=PATCH,
        pixel_shuffle_ratio=vision["pixel_shuffle_ratio"],
        vision_output_dim=vision["output_dim"],
        projector_input_dim=vision["output_dim"],
        projector_output_dim=vision["output_dim"],
    )
    text_config = dict(
        hidden_size=args["dim"], num_attention_heads=args["n_heads"], num_key_value_heads=args["n_heads"]
    )
    return Llama4Config(vision_config=vision_config, text_config=text_config)


def randomize_vision_(reference: torch.nn.Module, seed: int) -> None:
    """fp32 random vision weights that keep activations O(1), so attention (and its RoPE) is far from uniform.

    Meta's ``VisionEmbeddings`` casts its encoder to bf16; it is brought back to fp32 here.
    """
    reference.vision_embeddings.float()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if not name.startswith(("vision_embeddings.", "vision_projection.")):
                continue
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("class_embedding", "positional_embedding_vlm")):
                param.copy_(noise)
            elif param.ndim == 2:
                param.copy_(noise / param.shape[1] ** 0.5)
            else:
                param.copy_(0.1 * noise)


def build_pair(mlp_ratio: float, seed: int = 0):
    """Meta's reference and our (vision model, projector) holding the same weights."""
    args = meta_args(mlp_ratio)
    reference = build_reference(args, seed=seed)
    randomize_vision_(reference, seed)
    config = our_config(args)
    vision_model = Llama4VisionModel(config.vision_config).eval()
    projector = Llama4MultiModalProjector(config).eval()
    hf = native_to_hf_state_dict(reference.state_dict(), multimodal=True)
    for prefix, module in (("vision_model.", vision_model), ("multi_modal_projector.", projector)):
        module.load_state_dict({k[len(prefix) :]: v for k, v in hf.items() if k.startswith(prefix)}, strict=True)
    return reference, vision_model, projector


@pytest.fixture(scope="module")
def released_shape():
    """mlp_ratio = 1 / ratio² (4), as in the released models: transformers' built-in can load it too."""
    return build_pair(mlp_ratio=4.0)


def images(seed: int = 0) -> list[torch.Tensor]:
    """Two preprocessed images: one single tile, and a 2 × 2 tiling followed by its global view (5 tiles)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, TILE, TILE, generator=gen) * 2 - 1 for n in (1, 5)]


@torch.no_grad()
def meta_features(reference, image_list: list[torch.Tensor]) -> torch.Tensor:
    """Meta's projected image features for one sample holding ``image_list``: ``[total tokens, text dim]``.

    Every position of the dummy sequence is a ``<|patch|>`` token, so Meta's scatter lays the features out flat.
    """
    num_tokens = sum(len(tiles) for tiles in image_list) * int((TILE // PATCH * RATIO) ** 2)
    h_ref = torch.zeros(1, num_tokens, TEXT_DIM)
    mask = torch.ones(1, num_tokens, 1, dtype=torch.bool)
    with cuda_is_noop():
        embedding = reference.vision_embeddings([image_list], mask, h_ref)
    return reference.vision_projection(embedding)[0]


@torch.no_grad()
def our_features(vision_model, projector, image_list: list[torch.Tensor]) -> torch.Tensor:
    features = vision_model(torch.cat(image_list)).last_hidden_state  # [tiles, tokens per tile, D_out]
    return projector(features).flatten(0, 1)


@pytest.mark.parametrize("mlp_ratio", [4.0, 2.0])
def test_features_match_meta_reference(mlp_ratio):
    """mlp_ratio 2 makes ``intermediate_size`` (64) differ from the adapter's input width (32 / 0.5² = 128)."""
    reference, vision_model, projector = build_pair(mlp_ratio)
    image_list = images()
    expected = meta_features(reference, image_list)
    assert expected.shape == (6 * 9, TEXT_DIM)
    for implementation in ("sdpa", "eager"):
        vision_model.set_attn_implementation(implementation)
        got = our_features(vision_model, projector, image_list)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=implementation)


def test_transformers_builtin_cannot_load_other_mlp_ratios():
    """The peer sizes the adapter's fc1 from ``intermediate_size``: with mlp_ratio 2 Meta's weights do not fit."""
    _, vision_model, _ = build_pair(mlp_ratio=2.0)
    theirs = builtin.Llama4VisionModel(transformers.Llama4VisionConfig(**vision_model.config.to_dict()))
    with pytest.raises(RuntimeError, match="vision_adapter.mlp.fc1.weight"):
        theirs.load_state_dict(vision_model.state_dict())


@pytest.mark.parametrize("defect", ["rope_axes_swapped", "class_token_rotated"])
def test_meta_parity_catches_rope_defects(released_shape, monkeypatch, defect):
    """The parity test has power over the 2D RoPE details: each plausible slip moves the features."""
    reference, vision_model, projector = released_shape
    forward = Llama4VisionRotaryEmbedding.forward

    def broken(self, hidden_states):
        cos, sin = forward(self, hidden_states)
        if defect == "rope_axes_swapped":
            return cos.roll(cos.shape[-1] // 2, dims=-1), sin.roll(sin.shape[-1] // 2, dims=-1)
        class_token_as_first_patch = [*range(cos.shape[1] - 1), 0]
        return cos[:, class_token_as_first_patch], sin[:, class_token_as_first_patch]

    monkeypatch.setattr(Llama4VisionRotaryEmbedding, "forward", broken)
    image_list = images()
    error = (our_features(vision_model, projector, image_list) - meta_features(reference, image_list)).abs().max()
    assert error > 1e-3


@torch.no_grad()
def test_matches_transformers_builtin(released_shape, tmp_path):
    _, vision_model, projector = released_shape
    theirs = builtin.Llama4VisionModel(transformers.Llama4VisionConfig(**vision_model.config.to_dict())).eval()
    their_projector = builtin.Llama4MultiModalProjector(transformers.Llama4Config(**projector_config(projector)))
    assert theirs.state_dict().keys() == vision_model.state_dict().keys()
    assert their_projector.state_dict().keys() == projector.state_dict().keys()
    theirs.load_state_dict(vision_model.state_dict(), strict=True)
    their_projector.load_state_dict(projector.state_dict(), strict=True)

    pixel_values = torch.cat(images(seed=1))
    ours_out = vision_model(pixel_values, output_hidden_states=True)
    theirs_out = theirs(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(ours_out.last_hidden_state, theirs_out.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert len(ours_out.hidden_states) == len(theirs_out.hidden_states) == 3
    for got, expected in zip(ours_out.hidden_states, theirs_out.hidden_states):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        projector(ours_out.last_hidden_state), their_projector(theirs_out.last_hidden_state), rtol=1e-5, atol=1e-5
    )

    vision_model.save_pretrained(tmp_path)
    reloaded = Llama4VisionModel.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(pixel_values).last_hidden_state, ours_out.last_hidden_state)


def projector_config(projector: Llama4MultiModalProjector) -> dict:
    """transformers ``Llama4Config`` kwargs with the projector's vision and text widths."""
    out_features, in_features = projector.linear_1.weight.shape
    return dict(vision_config=dict(vision_output_dim=in_features), text_config=dict(hidden_size=out_features))


@torch.no_grad()
def test_attention_implementations_agree(released_shape):
    _, vision_model, _ = released_shape
    pixel_values = torch.cat(images(seed=2))
    outputs = {}
    for implementation in ("eager", "sdpa", "flex_attention"):
        vision_model.set_attn_implementation(implementation)
        outputs[implementation] = vision_model(pixel_values).last_hidden_state
    vision_model.set_attn_implementation("eager")
    attentions = vision_model(pixel_values, output_attentions=True).attentions
    vision_model.set_attn_implementation("sdpa")

    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["flex_attention"], outputs["eager"], rtol=1e-5, atol=1e-5)
    assert len(attentions) == 2 and attentions[0].shape == (6, 2, 37, 37)  # [tiles, heads, N + 1, N + 1]
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(6, 2, 37))


def test_gradient_checkpointing_gives_the_same_gradients(released_shape):
    _, trained, _ = released_shape
    pixel_values = torch.cat(images(seed=3))
    gradients = []
    for checkpointing in (False, True):
        model = Llama4VisionModel(trained.config)
        model.load_state_dict(trained.state_dict())
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(pixel_values).last_hidden_state.square().mean().backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()})
    assert all(grad is not None for grad in gradients[1].values())
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, msg=name)


def test_head_dim_must_split_into_x_and_y_pairs():
    with pytest.raises(ValueError, match="multiple of 4"):
        Llama4VisionModel(Llama4VisionConfig(hidden_size=36, num_attention_heads=6, image_size=28, patch_size=14))
