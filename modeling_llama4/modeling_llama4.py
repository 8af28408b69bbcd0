"""Llama 4 text backbone (``Llama4TextModel``, ``Llama4ForCausalLM``) and the multimodal model.

Pre-norm decoder blocks: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``. Attention is GQA with iRoPE: RoPE
layers (optionally QK-normed, attending within their chunk when ``attention_chunk_size`` is set) interleaved
with NoPE layers (global causal attention, optional temperature tuning). Feed-forward is a dense SwiGLU or the
sparse MoE of ``moe.py``. State-dict keys are those of transformers' built-in Llama 4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import CompileConfig, GenerationConfig
from transformers.generation.continuous_batching import ContinuousBatchingManager, ContinuousMixin
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import causal_attention_at_end, chunked_causal_attention, eager_attention_forward
from .cache import Llama4Cache, check_cache, returns_only_cached_keys
from .configuration_llama4 import Llama4Config, Llama4TextConfig
from .continuous_batching import ContinuousBatchingView, cpu_batching_config, is_paged, paged_masks
from .loss import causal_lm_loss_from_hidden, fuses_with
from .moe import Llama4Router, Llama4TextExperts, Llama4TextMLP, Llama4TextMoe
from .quantization_fp8 import Llama4Fp8HfQuantizer  # noqa: F401  (registers the quantizers, also as remote code)
from .quantization_int4 import Llama4Int4Config  # noqa: F401
from .rope import Llama4TextRotaryEmbedding, apply_rotary_emb, attention_temperature, rope_inverse_frequencies
from .validation import Llama4GenerationMixin, check_multimodal_inputs, check_text_inputs
from .vision import Llama4MultiModalProjector, Llama4VisionModel


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` over the last dim, computed in fp32 and cast back (Meta's ``rmsnorm``)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Llama4TextRMSNorm(nn.Module):
    """RMSNorm with a learned scale, normalising in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class Llama4TextAttention(nn.Module):
    """GQA self-attention of one layer: RoPE + QK norm on RoPE layers, temperature tuning on NoPE layers."""

    def __init__(self, config: Llama4TextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.use_rope = bool(config.no_rope_layers[layer_idx])
        self.use_qk_norm = config.use_qk_norm and self.use_rope
        self.use_temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.norm_eps = config.rms_norm_eps
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        query_start: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend; with ``query_start`` (the first query's position, set by the model when no mask is needed) the
        mask-free kernels of ``attention.py`` run instead of the configured attention implementation."""
        batch, seq, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim)  # [B, S, H, d]
        key = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim)  # [B, S, H_kv, d]
        value = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim)

        if self.use_rope:
            cos, sin = position_embeddings
            query, key = apply_rotary_emb(query, cos, sin), apply_rotary_emb(key, cos, sin)
            if self.use_qk_norm:
                query, key = rms_normalize(query, self.norm_eps), rms_normalize(key, self.norm_eps)
        elif self.use_temperature_tuning:
            temperature = attention_temperature(position_ids, self.config.floor_scale, self.config.attn_scale)
            query = (query * temperature).to(query.dtype)

        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if is_paged(cache):  # continuous batching: the update also fills kwargs with this layer's cache indices
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        elif cache is not None:
            key, value = cache.update(key, value, self.layer_idx, position_ids=position_ids)

        if query_start is not None:
            return self.o_proj(self.mask_free_attention(query, key, value, query_start).reshape(batch, seq, -1)), None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(batch, seq, -1)), attn_weights

    def mask_free_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_start: int
    ) -> torch.Tensor:
        """``query [B, H, S, d]`` at positions ``query_start + [0, S)`` over the most recent ``key/value``
        (chunked layers: within the chunk; NoPE layers: every earlier key) → ``[B, S, H, d]``."""
        dropout = self.attention_dropout if self.training else 0.0
        if self.config.layer_types[self.layer_idx] == "chunked_attention":
            chunk = self.config.attention_chunk_size
            output = chunked_causal_attention(query, key, value, self.scaling, query_start, chunk, dropout)
        else:
            output = causal_attention_at_end(query, key, value, self.scaling, dropout)
        return output.transpose(1, 2)


class Llama4TextDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: attention then a dense SwiGLU or sparse MoE feed-forward, each with a residual."""

    def __init__(self, config: Llama4TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Llama4TextAttention(config, layer_idx)
        self.is_moe_layer = layer_idx in config.moe_layers
        if self.is_moe_layer:
            self.feed_forward = Llama4TextMoe(config)
        else:
            self.feed_forward = Llama4TextMLP(config, intermediate_size=config.intermediate_size_mlp)
        self.input_layernorm = Llama4TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Llama4TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + attn_out
        return hidden_states + self.feed_forward(self.post_attention_layernorm(hidden_states))


class Llama4PreTrainedModel(PreTrainedModel):
    """Weight init and the transformers integration flags shared by every Llama 4 model class."""

    config_class = Llama4Config
    config: Llama4Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = False
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # with a static cache; compiled, the routed experts take static-shape kernels
    _skip_keys_device_placement = ["cache"]

    @property
    def is_gradient_checkpointing(self) -> bool:
        """transformers' deprecated alias of ``is_activation_checkpointing`` (5.24+), without its ``FutureWarning``:
        PEFT reads this name on every adapter load (``PeftModel.__init__``), so the warning reached every LoRA user."""
        return self.is_activation_checkpointing

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """``generate``'s default dynamic cache becomes a ``Llama4Cache`` (chunked layers keep one chunk), except
        as an assistant model, whose cache must roll back."""
        user_cache = model_kwargs.get("cache")
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        default_cache = user_cache is None and type(model_kwargs.get("cache")) is DynamicCache
        if default_cache and not generation_config.is_assistant:
            model_kwargs["cache"] = Llama4Cache(self.config)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """``experts_implementation``: unset or ``"eager"`` is this port's sparse per-expert compute (a grouped
        matmul on a GPU that supports it); any name in transformers' ``ExpertsInterface`` (``"batched_mm"``,
        ``"grouped_mm"``, hub kernels) routes the dense routed experts through that kernel (``moe.py``)."""
        if requested_experts in (None, "eager"):
            return "eager"
        if requested_experts not in ALL_EXPERTS_FUNCTIONS:
            raise ValueError(
                f"experts_implementation={requested_experts!r} is not one of 'eager' or transformers' "
                f"experts kernels {sorted(ALL_EXPERTS_FUNCTIONS.valid_keys())}"
            )
        return requested_experts

    def get_compiled_call(self, compile_config: CompileConfig | None) -> Callable:
        """The compiled ``__call__`` that ``generate`` runs its decode steps with when ``compile_config`` (or a
        static cache on an accelerator) asks for it. transformers skips every ``llama4`` model type here (its
        built-in model does not compile whole); this port's decode step compiles as one graph with a static cache."""
        compile_config = compile_config or getattr(self.generation_config, "compile_config", None) or CompileConfig()
        options = compile_config.to_dict()
        if getattr(self, "_llama4_compiled_call", (None, None))[0] != options:
            self._llama4_compiled_call = (options, torch.compile(self.__call__, **options))
        return self._llama4_compiled_call[1]

    def init_continuous_batching(
        self,
        generation_config: GenerationConfig | None = None,
        continuous_batching_config=None,
        workload_hints=None,
    ) -> ContinuousBatchingManager:
        """transformers' continuous batching manager (also behind ``generate_batch`` and ``transformers serve
        --continuous-batching``), run on a view of this model whose chunked layers the paged cache holds as
        sliding windows of one chunk (``continuous_batching.py``). Text requests only: they carry token ids. On a
        CPU, unset cache sizes are bounded (``cpu_batching_config``), not taken from free RAM."""
        if self.device.type == "cpu":
            continuous_batching_config = cpu_batching_config(continuous_batching_config)
        view = self.__dict__.setdefault("_continuous_batching_view", ContinuousBatchingView(self))
        return ContinuousMixin.init_continuous_batching(
            view, generation_config, continuous_batching_config, workload_hints
        )

    def destroy_cached_continuous_batching_manager(self) -> None:
        """Destroy the manager kept by ``generate_batch(..., persistent_manager=True)`` (kept on the view)."""
        view = self.__dict__.get("_continuous_batching_view")
        if view is not None:
            ContinuousMixin.destroy_cached_continuous_batching_manager(view)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        config = self.config.get_text_config()
        if isinstance(module, Llama4TextExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=config.initializer_range)
        elif isinstance(module, Llama4TextRotaryEmbedding):
            init.copy_(module.inv_freq, rope_inverse_frequencies(config))


# Blocked prefill bounds memory by the block, but splits each expert's batch with it: below ~2048 tokens a block
# leaves the experts matmuls of a few rows (prefill 40% slower relative to a dense model at 256-token blocks).
MIN_PREFILL_BLOCK = 2048


def block_spans(start: int, length: int, block: int) -> list[slice]:
    """Split ``length`` tokens at positions ``start + [0, length)`` at multiples of ``block``: local slices."""
    first = min(length, block - start % block)
    return [slice(0, first)] + [slice(i, min(i + block, length)) for i in range(first, length, block)]


class Llama4TextModel(Llama4PreTrainedModel):
    """Embeddings → decoder layers → final norm. RoPE tables (and masks, where padding needs them) are built once
    per forward, or once per block of a blocked prefill."""

    config_class = Llama4TextConfig
    config: Llama4TextConfig
    _no_split_modules = ["Llama4TextDecoderLayer"]
    input_modalities = ("text",)
    _can_record_outputs = {
        "attentions": Llama4TextAttention,
        "hidden_states": Llama4TextDecoderLayer,
        "router_logits": OutputRecorder(Llama4Router, index=2),
    }

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [Llama4TextDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Llama4TextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Llama4TextRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        prefill_block_size: int | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        """Run the decoder. Unpadded inputs under sdpa take the mask-free path (nothing tokens × tokens is
        built); with a cache, prompts longer than ``prefill_block_size`` (default: ``attention_chunk_size``, at
        least ``MIN_PREFILL_BLOCK``; without chunks 8192) are run in blocks of that many tokens, each filling the
        cache. Padded batches, other attention
        implementations and ``attention_mask`` dicts take the masked path (exact, but its masks are
        tokens × tokens)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        check_text_inputs(self.config, input_ids, inputs_embeds, attention_mask, cache)
        inputs = input_ids if inputs_embeds is None else inputs_embeds  # [B, S] or [B, S, D]
        batch, seq = inputs.shape[:2]
        if use_cache and cache is None:
            cache = Llama4Cache(self.config)
        elif cache is not None and not is_paged(cache) and not torch.compiler.is_compiling():
            check_cache(self.config, cache)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(seq, device=inputs.device) + past_seen_tokens).unsqueeze(0)
        if not torch.compiler.is_compiling():  # reads a value: once per eager step, never inside a compiled graph
            self._check_context_length(position_ids)

        query_start = self._mask_free_query_start(attention_mask, position_ids, cache)
        if query_start is None:
            if inputs_embeds is None:
                inputs_embeds = self.embed_tokens(input_ids)
            masks = attention_mask
            if is_paged(cache):  # continuous batching: the manager's masks, by the paged cache's layer types
                masks = paged_masks(self.config, attention_mask, position_ids, kwargs)
            elif not isinstance(masks, dict):  # `generate` may have built them already
                masks = self._build_masks(inputs_embeds, attention_mask, cache, position_ids)
            hidden_states = self.norm(self._decode(inputs_embeds, position_ids, masks, cache, None, **kwargs))
        else:
            block = prefill_block_size or max(self.config.attention_chunk_size or 8192, MIN_PREFILL_BLOCK)
            if cache is None or torch.is_grad_enabled() or self._records_outputs(kwargs):
                block = seq  # nowhere to carry keys / activations kept for backward anyway / one record per layer
            masks = dict.fromkeys(self.config.layer_types)
            hidden_states = None  # [B, S, D], filled block by block: no other buffer of the prompt's length
            for span in block_spans(query_start, seq, block):
                embeds = self.embed_tokens(input_ids[:, span]) if inputs_embeds is None else inputs_embeds[:, span]
                out = self._decode(embeds, position_ids[:, span], masks, cache, query_start + span.start, **kwargs)
                out = self.norm(out)
                if hidden_states is None:
                    hidden_states = out.new_empty(batch, seq, out.shape[-1])
                hidden_states[:, span] = out
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)

    def _decode(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        masks: dict[str, torch.Tensor | None],
        cache: Cache | None,
        query_start: int | None,
        **kwargs,
    ) -> torch.Tensor:
        """``hidden_states [B, S, D]`` through every decoder layer (one mask per layer type)."""
        position_embeddings = self.rotary_emb(position_ids)
        for layer, layer_type in zip(self.layers, self.config.layer_types):
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                attention_mask=masks[layer_type],
                cache=cache,
                query_start=query_start,
                **kwargs,
            )
        return hidden_states

    def _mask_free_query_start(
        self, attention_mask: torch.Tensor | dict | None, position_ids: torch.Tensor, cache: Cache | None
    ) -> int | None:
        """The first query's position when attention needs no mask, else None.

        Mask-free means: sdpa, a cache whose layers return only the cached keys (not a static cache's buffer with
        its empty slots), no padding (no 2-D mask, or one of all ones; not the per-layer-type masks ``generate``
        builds for a static cache), and every row at the same run of consecutive positions. Left-padded rows have
        chunk boundaries of their own, so they take the masked path. The masked path reads no values: it is the
        one a compiled decode step takes.
        """
        if self.config._attn_implementation != "sdpa" or position_ids.numel() == 0 or is_paged(cache):
            return None
        if not returns_only_cached_keys(cache) or isinstance(attention_mask, dict):
            return None
        if attention_mask is not None and (attention_mask.ndim != 2 or not bool(attention_mask.all())):
            return None
        start = int(position_ids[0, 0])
        expected = torch.arange(start, start + position_ids.shape[-1], device=position_ids.device)
        return start if bool((position_ids == expected).all()) else None

    def _records_outputs(self, kwargs: dict) -> bool:
        """Whether hidden states, attentions or router logits are being recorded for this forward."""
        return any(
            kwargs.get(f"output_{name}", getattr(self.config, f"output_{name}", False))
            for name in self._can_record_outputs
        )

    def _build_masks(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor | None]:
        """One mask per layer type: causal for NoPE layers, causal within the chunk for chunked RoPE layers."""
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        builders = {"full_attention": create_causal_mask, "chunked_attention": create_chunked_causal_mask}
        return {layer_type: builders[layer_type](**mask_kwargs) for layer_type in set(self.config.layer_types)}

    def _check_context_length(self, position_ids: torch.Tensor) -> None:
        last_position = int(position_ids.max()) if position_ids.numel() else 0
        if last_position >= self.config.max_position_embeddings:
            raise ValueError(
                f"Input reaches position {last_position}, past the model's context of "
                f"max_position_embeddings={self.config.max_position_embeddings} tokens; shorten the prompt or "
                "the number of new tokens."
            )


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch-style auxiliary loss ``E · Σ_e f_e · P_e`` over all MoE layers (1 when perfectly balanced).

    ``f_e`` is the fraction of routed (token, expert) slots sent to expert e and ``P_e`` the mean softmax
    probability of e; padding tokens (``attention_mask == 0``) are left out.
    """
    logits = torch.cat([layer_logits.float() for layer_logits in router_logits], dim=0)  # [L·T, E]
    probs = logits.softmax(dim=-1)
    chosen = nn.functional.one_hot(logits.topk(top_k, dim=-1).indices, num_experts).sum(1).float()  # [L·T, E]
    if attention_mask is None:
        weights = torch.ones(logits.shape[0], 1, device=logits.device)
    else:
        attention_mask = attention_mask[:, -(router_logits[0].shape[0] // attention_mask.shape[0]) :]  # new tokens
        weights = attention_mask.reshape(1, -1).expand(len(router_logits), -1).reshape(-1, 1).float()
        weights = weights.to(logits.device)
    tokens = weights.sum().clamp(min=1.0)
    fraction_routed = (chosen * weights).sum(0) / (tokens * top_k)
    mean_probability = (probs * weights).sum(0) / tokens
    return num_experts * (fraction_routed * mean_probability).sum()


class Llama4ForCausalLM(Llama4PreTrainedModel, Llama4GenerationMixin):
    """Text-only Llama 4 with a language-modelling head (separate from the input embedding)."""

    config_class = Llama4TextConfig
    config: Llama4TextConfig
    _no_split_modules = ["Llama4TextDecoderLayer"]
    base_model_prefix = "language_model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    input_modalities = ("text",)

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config)
        self.model = Llama4TextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def init_parallel_plans(self) -> None:
        """The plans, without the config's base-model rules unprefixed. transformers adds those to a model that has no
        ``base_model_prefix`` attribute, taking it for its own base model; this one's prefix is ``language_model``,
        the multimodal checkpoints' (stripped when their text weights load here), while its base model ``self.model``
        brings its rules prefixed ``model.``. The unprefixed copies name nothing here (warned about when applied)."""
        super().init_parallel_plans()
        config = self.config
        for plan, base_rules in (
            (self._tp_plan, config.base_model_tp_plan),
            (self._ep_plan, config.base_model_ep_plan),
            (self._fsdp_plan, config.base_model_fsdp_plan),
        ):
            for rule in base_rules or {}:
                plan.pop(rule, None)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prefill_block_size: int | None = None,
        skip_logits: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Logits for ``logits_to_keep`` last positions (0: all); with ``labels``, the shifted LM loss.

        ``skip_logits`` (default: training with ``labels``): return no logits and compute the loss chunk by chunk
        from the hidden states (``loss.py``), never holding the ``[tokens, vocab]`` logits.

        With ``output_router_logits`` (or ``config.output_router_logits``) the router logits of every MoE layer
        are returned and, when labels are given, ``router_aux_loss_coef`` times the load-balancing loss is added.
        With a cache, prompts longer than ``prefill_block_size`` (default ``attention_chunk_size``, at least
        ``MIN_PREFILL_BLOCK``) are prefilled in blocks of that many tokens (``generate`` passes it through).
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            prefill_block_size=prefill_block_size,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        logits = loss = aux_loss = None
        if skip_logits and labels is not None and fuses_with(self.lm_head) and self.loss_function is ForCausalLMLoss:
            loss = causal_lm_loss_from_hidden(hidden_states, self.lm_head.weight, labels, **kwargs)
        else:
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            logits = None if skip_logits else logits
        if output_router_logits and outputs.router_logits:
            aux_loss = load_balancing_loss(
                outputs.router_logits,
                self.config.num_local_experts,
                self.config.num_experts_per_tok,
                attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None,
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


@dataclass
class Llama4CausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """``MoeCausalLMOutputWithPast`` plus the projected image features fed to the language model, if any.

    ``image_hidden_states``: ``[num_tiles · tokens_per_tile, text_hidden_size]``.
    """

    image_hidden_states: torch.FloatTensor | None = None


class Llama4ForConditionalGeneration(Llama4PreTrainedModel, Llama4GenerationMixin):
    """Early-fusion multimodal Llama 4: projected image features replace the ``<|patch|>`` token embeddings.

    Text-only inputs go straight to the language model. During ``generate`` the images are encoded once, at
    prefill: ``pixel_values`` is dropped from later decode steps.
    """

    config_class = Llama4Config
    config: Llama4Config
    _no_split_modules = ["Llama4TextDecoderLayer", "Llama4VisionEncoderLayer"]
    _tp_plan = {"language_model.lm_head": "colwise_gather_output"}
    input_modalities = ("image", "text")

    def __init__(self, config: Llama4Config):
        super().__init__(config)
        self.vision_model = Llama4VisionModel(config.vision_config)
        self.multi_modal_projector = Llama4MultiModalProjector(config)
        self.language_model = Llama4ForCausalLM(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def set_decoder(self, decoder: nn.Module) -> None:
        self.language_model.set_decoder(decoder)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles ``[num_tiles, 3, S, S]`` → projected features ``[num_tiles · tokens_per_tile, text_hidden_size]``."""
        tiles = self.vision_model(pixel_values).last_hidden_state  # [num_tiles, tokens_per_tile, vision_output_dim]
        return self.multi_modal_projector(tiles.reshape(-1, tiles.shape[-1]))

    def merge_image_features(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write ``image_features`` into the ``<|patch|>`` positions of ``inputs_embeds [B, S, D]``, in order."""
        if input_ids is not None:
            patch_mask = input_ids == self.config.image_token_id
        else:
            patch_embedding = self.get_input_embeddings().weight[self.config.image_token_id]
            patch_mask = (inputs_embeds == patch_embedding).all(-1)
        num_patch_tokens = int(patch_mask.sum())
        if num_patch_tokens != image_features.shape[0]:
            raise ValueError(
                f"The prompt has {num_patch_tokens} image patch tokens (id {self.config.image_token_id}) but the "
                f"images give {image_features.shape[0]} features; build the prompt with the processor so each "
                "image's token layout matches its tiles."
            )
        mask = patch_mask.unsqueeze(-1).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prefill_block_size: int | None = None,
        **kwargs,
    ) -> Llama4CausalLMOutputWithPast:
        """As ``Llama4ForCausalLM.forward``, with ``pixel_values [num_tiles, 3, S, S]`` for the prompt's images."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        check_multimodal_inputs(self.config, input_ids, pixel_values, cache)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values.to(self.vision_model.dtype))
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            prefill_block_size=prefill_block_size,
            **kwargs,
        )
        return Llama4CausalLMOutputWithPast(**outputs, image_hidden_states=image_features)


__all__ = [
    "Llama4PreTrainedModel",
    "Llama4TextModel",
    "Llama4ForCausalLM",
    "Llama4CausalLMOutputWithPast",
    "Llama4ForConditionalGeneration",
]
