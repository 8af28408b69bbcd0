"""The private names of transformers, torch and PEFT this package still uses, in one table with their contract.

Each :class:`UpstreamName` says what the package relies on (a function's parameters, an op's schema), for which
releases, why, and where. ``tests/test_upstream.py`` checks every entry against
the installed releases in seconds, so a release that moves one of them fails one named test instead of the
distributed or remote-code tests that would trip over it. To add a name: append an entry to ``UPSTREAM_NAMES``.

The releases CI checks (setup.cfg): transformers 5.24 and 5.25, torch 2.14, PEFT 0.21. This module imports only
the standard library and names its objects by dotted path, so nothing here runs at ``import modeling_llama4``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class UpstreamName:
    """One private upstream name and what the package expects of it.

    ``path`` is the dotted path of the object (an op overload for torch ops: ``torch.ops.aten.<op>.default``).
    Exactly one expectation is set:

    - ``parameters``: the parameter names, in order, of each form the code supports, keyed by the releases that have
      that form (the installed one must be one of them);
    - ``schema``: the op's schema as ``str(op._schema)`` prints it.
    """

    path: str
    serves: str
    purpose: str
    used_in: str
    parameters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    schema: str | None = None


UPSTREAM_NAMES: tuple[UpstreamName, ...] = (
    UpstreamName(
        path="transformers.generation.continuous_batching.ContinuousMixin.init_continuous_batching",
        serves="transformers 5.24, 5.25",
        purpose="public, but called with a ContinuousBatchingView as self: the override relies on it reading only "
        "config, device, dtype, generation_config and _cached_continuous_batching_manager of the model it is given, "
        "and on the manager reading layer_types/sliding_window from config.get_text_config()",
        used_in="modeling_llama4/modeling_llama4.py: Llama4PreTrainedModel.init_continuous_batching",
        parameters={"5.24, 5.25": ("self", "generation_config", "continuous_batching_config", "workload_hints")},
    ),
    UpstreamName(
        path="transformers.generation.continuous_batching.PagedAttentionCache.update",
        serves="transformers 5.24, 5.25",
        purpose="the paged cache's update takes the attention kwargs (cu_seq_lens, read/write indices) to fill them "
        "in place, unlike Cache.update: attention calls it with kwargs=",
        used_in="modeling_llama4/modeling_llama4.py: Llama4TextAttention.forward",
        parameters={"5.24, 5.25": ("self", "key_states", "value_states", "layer_idx", "kwargs")},
    ),
    UpstreamName(
        path="transformers.modeling_utils.PreTrainedModel._load_pretrained_model",
        serves="transformers 5.24, 5.25",
        purpose="overridden on Llama4PreTrainedModel by the installed package so that under a device mesh each rank "
        "reads only its slices of the safetensors files (sharded_loading.rank_state_dict)",
        used_in="modeling_llama4/package_methods.py: _load_pretrained_model (installed by modeling_llama4/__init__.py)",
        parameters={"5.24, 5.25": ("model", "state_dict", "checkpoint_files", "load_config", "expected_keys")},
    ),
    UpstreamName(
        path="transformers.distributed.tensor_parallel.TensorParallelLayer.install_forward",
        serves="transformers 5.24 (module, mesh), 5.25 (module, mesh, *, config, mesh_manager)",
        purpose="MoeTensorParallel overrides it to run the whole MoE layer on local shards with one all-reduce, "
        "AttentionHeadsCheck to refuse a tp size past the KV heads at load; the overrides accept both forms",
        used_in="modeling_llama4/parallel.py: MoeTensorParallel, AttentionHeadsCheck",
        parameters={
            "5.24": ("self", "module", "mesh"),
            "5.25": ("self", "module", "mesh", "config", "mesh_manager"),
        },
    ),
    UpstreamName(
        path="transformers.distributed.parallel_utils.ALL_PARALLEL_STYLES.register",
        serves="transformers 5.24, 5.25",
        purpose="registers the style names the config's tp/ep plans use (llama4_attention, llama4_moe, "
        "llama4_grouped_gemm): the only registry transformers' plans read",
        used_in="modeling_llama4/parallel.py (module level)",
        parameters={"5.24, 5.25": ("key", "value")},
    ),
    UpstreamName(
        path="transformers.distributed.expert_parallel.MoEParamShard.__init__",
        serves="transformers 5.24, 5.25",
        purpose="ExpertShard (the llama4_grouped_gemm style) is transformers' grouped_gemm shard of whole experts",
        used_in="modeling_llama4/parallel.py: ExpertShard(Shard(0), shards_expert_dim=True)",
        parameters={"5.24, 5.25": ("self", "placement", "shards_expert_dim")},
    ),
    UpstreamName(
        path="transformers.distributed.expert_parallel.MoEParamShard.shard_param",
        serves="transformers 5.24, 5.25",
        purpose="ExpertShard extends it: after transformers shards an expert weight, it gives the experts module the "
        "routed call ep_dispatch_experts wraps and the expert mesh",
        used_in="modeling_llama4/parallel.py: ExpertShard.shard_param",
        parameters={"5.24, 5.25": ("self", "module", "param", "mesh")},
    ),
    UpstreamName(
        path="torch.distributed.tensor.placement_types._StridedShard.__init__",
        serves="torch 2.14",
        purpose="the interleaved [gate; up] placement of quantized experts' buffers under tensor parallel (no public "
        "placement for it; transformers' packed_rowwise uses it too)",
        used_in="modeling_llama4/parallel.py: shard_quantized_experts",
        parameters={"torch 2.14": ("self", "dim", "split_factor", "sf")},
    ),
    UpstreamName(
        path="transformers.generation.utils.GenerationMixin._prepare_cache_for_generation",
        serves="transformers 5.24, 5.25",
        purpose="overridden so generate's default dynamic cache becomes a Llama4Cache (chunked layers keep one chunk); "
        "no public route swaps the default cache",
        used_in="modeling_llama4/modeling_llama4.py: Llama4PreTrainedModel._prepare_cache_for_generation",
        parameters={
            "5.24, 5.25": (
                "self",
                "generation_config",
                "model_kwargs",
                "generation_mode",
                "batch_size",
                "max_cache_length",
            )
        },
    ),
    UpstreamName(
        path="transformers.generation.utils.GenerationMixin._validate_generated_length",
        serves="transformers 5.24, 5.25",
        purpose="extended to refuse a generate length past max_position_embeddings before the first token: the total "
        "length is resolved only inside generate",
        used_in="modeling_llama4/validation.py: Llama4GenerationMixin._validate_generated_length",
        parameters={"5.24, 5.25": ("self", "generation_config", "input_ids_length", "has_default_max_length")},
    ),
    UpstreamName(
        path="transformers.processing_utils.ProcessorMixin._check_special_mm_tokens",
        serves="transformers 5.24, 5.25",
        purpose="extended to count only the template's image placeholders, not <|image|> typed in message text (no "
        "public hook); if it moves, typed placeholders raise transformers' count mismatch, nothing silent",
        used_in="modeling_llama4/processing_llama4.py: Llama4Processor._check_special_mm_tokens",
        parameters={"5.24, 5.25": ("self", "text", "text_inputs", "modalities")},
    ),
    UpstreamName(
        path="torch.ops.aten._weight_int4pack_mm_for_cpu.default",
        serves="torch 2.14",
        purpose="the int4 CPU matmul of int4 experts (no dequantized copy of the weight)",
        used_in="modeling_llama4/int4.py: int4_matmul",
        schema="aten::_weight_int4pack_mm_for_cpu(Tensor self, Tensor mat2, int qGroupSize, Tensor qScaleAndZeros) "
        "-> Tensor",
    ),
    UpstreamName(
        path="torch.ops.aten._convert_weight_to_int4pack_for_cpu.default",
        serves="torch 2.14",
        purpose="repacks checkpoint int4 weights into the layout _weight_int4pack_mm_for_cpu reads",
        used_in="modeling_llama4/int4.py: to_kernel_layout",
        schema="aten::_convert_weight_to_int4pack_for_cpu(Tensor self, int innerKTiles) -> Tensor",
    ),
    UpstreamName(
        path="torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default",
        serves="torch 2.14",
        purpose="CPU flash attention returning the log-sum-exp, to merge prefix and causal-block attention "
        "without a mask",
        used_in="modeling_llama4/attention.py: _merged_prefix_and_block_attention_cpu",
        schema="aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, "
        "float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) "
        "-> (Tensor output, Tensor logsumexp)",
    ),
    UpstreamName(
        path="torch.ops.mkldnn._linear_pointwise.default",
        serves="torch 2.14",
        purpose="matmul by a weight prepacked in oneDNN's blocked layout (packed experts)",
        used_in="modeling_llama4/packed_experts.py: packed_matmul, packing_available",
        schema="mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, "
        "str? algorithm) -> Tensor Y",
    ),
    UpstreamName(
        path="torch.ops.mkldnn._reorder_linear_weight.default",
        serves="torch 2.14",
        purpose="packs an expert weight into oneDNN's blocked layout once",
        used_in="modeling_llama4/packed_experts.py: pack_weight",
        schema="mkldnn::_reorder_linear_weight(Tensor self, int? batch_size=None) -> Tensor Y",
    ),
    UpstreamName(
        path="peft.tuners.lora.LoraModel._create_new_module",
        serves="peft 0.21",
        purpose="wrapped once (the one class-level change the package makes outside registration) so that this "
        "package's routed-experts modules get the per-expert LoRA layer; PEFT has no model- or module-side hook, and "
        "every other module goes to PEFT's method unchanged",
        used_in="modeling_llama4/adapters.py: enable_expert_lora",
        parameters={"0.21": ("lora_config", "adapter_name", "target", "kwargs")},
    ),
)


def resolve(path: str) -> Any:
    """The object at the dotted ``path``: the longest importable module prefix, then attributes.

    Raises ``ImportError`` when no prefix imports and ``AttributeError`` when an attribute is missing.
    """
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"no importable module in {path!r}")


def contract_violation(entry: UpstreamName) -> str | None:
    """What about ``entry`` the installed releases break (``None`` when they keep the contract)."""
    try:
        obj = resolve(entry.path)
    except (ImportError, AttributeError, RuntimeError) as error:
        return f"{entry.path} is gone ({type(error).__name__}: {error})"
    if entry.parameters:
        found = tuple(inspect.signature(obj).parameters)
        if found not in entry.parameters.values():
            expected = "; ".join(f"{releases}: {names}" for releases, names in entry.parameters.items())
            return f"{entry.path} takes {found}, expected one of {expected}"
    if entry.schema is not None and str(obj._schema) != entry.schema:
        return f"{entry.path} has schema {obj._schema}, expected {entry.schema}"
    return None
