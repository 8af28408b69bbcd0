"""Meta native Llama 4 state-dict names (module naming, merged shards) ⇄ Hugging Face Llama 4 names.

This is the one place the key mapping lives: the streaming converter, the HF → native converter and the parity
tests all use it. ``hf_tensors`` gives each HF tensor's recipe, ``hf_to_native_tensors`` undoes one. Sharded and
fused ("released") checkpoints are first brought to Meta's module naming (``conversion.native``), then mapped
here. Two transforms besides renaming: the router is stored transposed (``router_DE [D, E]`` → ``router.weight
[E, D]``) and each MoE layer's ``w1`` and ``w3`` ``[E, D, F]`` are concatenated into ``gate_up_proj [E, D, 2F]``.
q/k need no permutation: the HF layout keeps Meta's interleaved RoPE pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

TEXT_PREFIX = "language_model."

# (native regex, HF template); `{text}` is "language_model." for multimodal checkpoints and "" for text-only.
_TEXT_RULES: list[tuple[str, str]] = [
    (r"tok_embeddings\.weight", "{text}model.embed_tokens.weight"),
    (r"norm\.weight", "{text}model.norm.weight"),
    (r"output\.weight", "{text}lm_head.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", "{text}model.layers.{0}.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", "{text}model.layers.{0}.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attention\.wq\.weight", "{text}model.layers.{0}.self_attn.q_proj.weight"),
    (r"layers\.(\d+)\.attention\.wk\.weight", "{text}model.layers.{0}.self_attn.k_proj.weight"),
    (r"layers\.(\d+)\.attention\.wv\.weight", "{text}model.layers.{0}.self_attn.v_proj.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", "{text}model.layers.{0}.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.router_DE", "{text}model.layers.{0}.feed_forward.router.weight"),
    (r"layers\.(\d+)\.feed_forward\.experts\.w2", "{text}model.layers.{0}.feed_forward.experts.down_proj"),
    (
        r"layers\.(\d+)\.feed_forward\.shared_expert\.w1\.weight",
        "{text}model.layers.{0}.feed_forward.shared_expert.gate_proj.weight",
    ),
    (
        r"layers\.(\d+)\.feed_forward\.shared_expert\.w3\.weight",
        "{text}model.layers.{0}.feed_forward.shared_expert.up_proj.weight",
    ),
    (
        r"layers\.(\d+)\.feed_forward\.shared_expert\.w2\.weight",
        "{text}model.layers.{0}.feed_forward.shared_expert.down_proj.weight",
    ),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", "{text}model.layers.{0}.feed_forward.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", "{text}model.layers.{0}.feed_forward.up_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", "{text}model.layers.{0}.feed_forward.down_proj.weight"),
]

_VISION_ENCODER = r"vision_embeddings\.vision_encoder\."
_VISION_BLOCK = _VISION_ENCODER + r"transformer\.resblocks\.(\d+)\."
_VISION_RULES: list[tuple[str, str]] = [
    (_VISION_ENCODER + r"conv1\._linear\.weight", "vision_model.patch_embedding.linear.weight"),
    (_VISION_ENCODER + r"class_embedding", "vision_model.class_embedding"),
    (_VISION_ENCODER + r"positional_embedding_vlm", "vision_model.positional_embedding_vlm"),
    (_VISION_ENCODER + r"ln_pre\.(weight|bias)", "vision_model.layernorm_pre.{0}"),
    (_VISION_ENCODER + r"ln_post\.(weight|bias)", "vision_model.layernorm_post.{0}"),
    (_VISION_BLOCK + r"attn\.wq\.(weight|bias)", "vision_model.model.layers.{0}.self_attn.q_proj.{1}"),
    (_VISION_BLOCK + r"attn\.wk\.(weight|bias)", "vision_model.model.layers.{0}.self_attn.k_proj.{1}"),
    (_VISION_BLOCK + r"attn\.wv\.(weight|bias)", "vision_model.model.layers.{0}.self_attn.v_proj.{1}"),
    (_VISION_BLOCK + r"attn\.wo\.(weight|bias)", "vision_model.model.layers.{0}.self_attn.o_proj.{1}"),
    (_VISION_BLOCK + r"mlp\.c_fc\.(weight|bias)", "vision_model.model.layers.{0}.mlp.fc1.{1}"),
    (_VISION_BLOCK + r"mlp\.c_proj\.(weight|bias)", "vision_model.model.layers.{0}.mlp.fc2.{1}"),
    (_VISION_BLOCK + r"ln_1\.(weight|bias)", "vision_model.model.layers.{0}.input_layernorm.{1}"),
    (_VISION_BLOCK + r"ln_2\.(weight|bias)", "vision_model.model.layers.{0}.post_attention_layernorm.{1}"),
    (r"vision_embeddings\.vision_adapter\.mlp\.c_fc\.weight", "vision_model.vision_adapter.mlp.fc1.weight"),
    (r"vision_embeddings\.vision_adapter\.mlp\.c_proj\.weight", "vision_model.vision_adapter.mlp.fc2.weight"),
    (r"vision_projection\.weight", "multi_modal_projector.linear_1.weight"),
]

_RULES = [(re.compile(pattern), template) for pattern, template in _TEXT_RULES + _VISION_RULES]
_EXPERT_GATE = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.w1")
_EXPERT_UP = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.w3")
_GATE_UP_TEMPLATE = "{text}model.layers.{0}.feed_forward.experts.gate_up_proj"
_TRANSPOSED = re.compile(r"layers\.\d+\.feed_forward\.router_DE")


@dataclass(frozen=True)
class HFTensor:
    """How one HF tensor is made: its native ``sources`` concatenated on ``dim``, then transposed if ``transpose``."""

    name: str
    sources: tuple[str, ...]
    dim: int = 0
    transpose: bool = False


def hf_key(native_key: str, multimodal: bool) -> str | None:
    """HF name of a native tensor that maps one-to-one, or None for the expert w1/w3 halves of ``gate_up_proj``.

    Raises ``KeyError`` for a name this mapping does not know.
    """
    text = TEXT_PREFIX if multimodal else ""
    if _EXPERT_GATE.fullmatch(native_key) or _EXPERT_UP.fullmatch(native_key):
        return None
    for pattern, template in _RULES:
        match = pattern.fullmatch(native_key)
        if match:
            return template.format(*match.groups(), text=text)
    raise KeyError(f"unknown native Llama 4 tensor name: {native_key!r}")


def gate_up_key(layer: int, multimodal: bool) -> str:
    """HF name of the fused expert ``gate_up_proj [E, D, 2F]`` of MoE layer ``layer``."""
    return _GATE_UP_TEMPLATE.format(layer, text=TEXT_PREFIX if multimodal else "")


def hf_tensors(native_keys: Iterable[str], multimodal: bool) -> list[HFTensor]:
    """The HF tensors made from ``native_keys``, in their order (``gate_up_proj`` where its ``w1`` comes)."""
    recipes = []
    for key in native_keys:
        name = hf_key(key, multimodal)
        if name is not None:
            recipes.append(HFTensor(name, (key,), transpose=_TRANSPOSED.fullmatch(key) is not None))
            continue
        match = _EXPERT_GATE.fullmatch(key)
        if match:  # w1 [E, D, F] and w3 become one tensor [E, D, 2F]; w3 is consumed here
            up = f"layers.{match.group(1)}.feed_forward.experts.w3"
            recipes.append(HFTensor(gate_up_key(int(match.group(1)), multimodal), (key, up), dim=-1))
    return recipes


def hf_to_native_tensors(recipe: HFTensor, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Undo one recipe: the native tensors that made the HF ``tensor``, bit for bit."""
    if recipe.transpose:
        tensor = tensor.t().contiguous()
    if len(recipe.sources) == 1:
        return {recipe.sources[0]: tensor}
    parts = tensor.chunk(len(recipe.sources), dim=recipe.dim)
    # Copies: a slice would keep (and torch.save would write) the whole fused tensor's storage.
    return {key: part.clone(memory_format=torch.contiguous_format) for key, part in zip(recipe.sources, parts)}
