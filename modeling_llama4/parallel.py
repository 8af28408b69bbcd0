"""Tensor- and expert-parallel MoE for transformers' distributed engine (``tp_plan`` / ``DistributedConfig``).

Registers the parallel styles the Llama 4 text config's plans name: ``"llama4_attention"`` (every ``self_attn``)
refuses a tensor-parallel size that does not divide the KV heads (:class:`AttentionHeadsCheck`), and

- ``"llama4_moe"`` (``base_model_tp_plan``, every ``feed_forward``). Tensor parallel: with the routed experts
  sharded along their hidden dim I (``gate_up_proj [E, D, 2I]`` keeps a gate and an up slice of each expert,
  ``down_proj [E, I, D]`` the matching rows) and the shared expert sharded the same way, each rank computes its
  slice of the shared expert and of *only the routed* experts, locally, with the MoE's own sparse dispatch: both
  are partial sums of the MoE output, added before one all-reduce per MoE layer.
- ``"llama4_grouped_gemm"`` (``base_model_ep_plan``, the expert weights). Expert parallel: transformers'
  ``grouped_gemm`` (``E/W`` whole experts per rank), plus transformers' routed experts call, which its
  ``ep_dispatch_experts`` rule drives: every rank routes identically and runs only the (token, expert) pairs of
  its own experts; the implementation that ``DistributedConfig.ep_implementation`` names combines the ranks'
  outputs (an all-reduce when the ranks share the batch, ``tp_size == ep_size``: the routed call adds the
  tensor-parallel shared expert's partial output first, so that this is the MoE's one all-reduce; all-to-all
  otherwise).

Quantized experts (int4, FP8) keep their tensors in buffers, which transformers' plans do not reach (their rules
shard parameters). Under tensor parallel the MoE style gives them the slices of the weights they quantize
(:func:`shard_quantized_experts`); under expert parallel the quantizer exposes them to the plan as frozen parameters
for the time it is applied (:func:`expose_quantized_experts`, :func:`add_quantized_expert_rules`) and
``llama4_grouped_gemm`` makes each a buffer again once sharded by expert. Either way the loader reads only this
rank's share. Per-expert LoRA added after loading: under tensor parallel its adapters are sliced with the experts
(:func:`shard_expert_lora`); under expert parallel each rank holds the adapters of its own experts only
(``lora_experts``).

Shape names: T tokens, D hidden size, E experts (L = E/W on this rank), k experts per token, I expert hidden size,
W ranks, M routed rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed import ProcessGroup, get_process_group_ranks
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from transformers.distributed.expert_parallel import MoEParamShard
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
from transformers.distributed.tensor_parallel import TensorParallelLayer

# The MoE's sharded parts: each computes a partial sum of the MoE output from the replicated input.
SHARDED_PARTS = ("shared_expert", "experts")


@contextlib.contextmanager
def local_parameters(module: nn.Module) -> Iterator[None]:
    """Run ``module`` and its children on the local shards of their DTensor parameters: each is replaced, for the
    block, by its ``to_local()`` view, so the plain-tensor kernels (the sparse dispatch, the quantized experts) see
    this rank's shard and autograd carries their gradients back to the DTensor parameters."""
    sharded = [
        (owner, name, param)
        for owner in module.modules()
        for name, param in owner.named_parameters(recurse=False)
        if isinstance(param, DTensor)
    ]
    for owner, name, param in sharded:
        owner._parameters[name] = param.to_local()  # a view, not a Parameter: nn.Module's setattr would refuse it
    try:
        yield
    finally:
        for owner, name, param in sharded:
            owner._parameters[name] = param


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum, in place) in forward; identity in backward, where every rank holds the whole output's
    gradient already."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.mark_dirty(partial)
        torch.distributed.all_reduce(partial, group=group)
        return partial

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _SumGradientOverRanks(torch.autograd.Function):
    """Identity in forward; in backward the gradient all-reduced (summed) over the ranks: a replicated input whose
    users on each rank (its shards of a layer) give only a partial gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may hand the same tensor to other users
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_ranks(partial: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``partial`` (this rank's partial sum) summed over ``group``, in place: the whole output on every rank."""
    if torch.is_grad_enabled() and partial.requires_grad:
        return _SumOverRanks.apply(partial, group)
    torch.distributed.all_reduce(partial, group=group)
    return partial


def sum_gradient_over_ranks(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``tensor`` unchanged, its gradient summed over ``group`` in backward; ``tensor`` itself when no gradient flows
    (at inference an autograd function per call is pure overhead)."""
    if torch.is_grad_enabled() and tensor.requires_grad:
        return _SumGradientOverRanks.apply(tensor, group)
    return tensor


def layer_wildcard(name: str) -> str:
    """``name`` as transformers' plans spell it: layer numbers (``.3.`` or a final ``.3``) become ``*``."""
    return re.sub(r"\.\d+(\.|$)", lambda match: ".*" + match.group(1), name)


class MoeTensorParallel(TensorParallelLayer):
    """One all-reduce per MoE layer: ``out = all_reduce(shared_slice(x) + Σ routed expert slices(x · score))``.

    The plan shards the parameters (``"colwise"`` / ``"rowwise"`` / ``"packed_rowwise"`` rules on the weights
    themselves, so their Linear modules get no hooks of their own); this style runs the whole MoE on the local
    shards. The router stays replicated, so every rank routes identically. In backward, the input gradient of each
    sharded part is partial and is summed over the ranks (:func:`sum_gradient_over_ranks`); the output all-reduce passes the
    gradient through unchanged. Dense feed-forward layers (Maverick's interleaved ones) keep their own Linear rules.

    With expert-parallel routed experts (``DistributedConfig(tp_size=W, ep_size=W)``) only the shared expert is
    sharded here, and the MoE runs :func:`expert_parallel_moe`, which adds its partial output to the routed experts'
    before their all-reduce.
    """

    def install_forward(self, module: nn.Module, mesh, *, config=None, mesh_manager=None) -> nn.Module:
        """Run ``module`` (a MoE layer) on its local shards with one all-reduce. transformers 5.24 calls this with
        ``(module, mesh)``, 5.25 adds the model's text ``config`` and its ``mesh_manager`` as keywords."""
        if not all(hasattr(module, part) for part in SHARDED_PARTS):
            return module
        if dict(module.experts.named_buffers()):  # quantized experts: their buffers get the weights' placements
            shard_quantized_experts(module.experts, mesh)
        group = mesh.get_group()
        sharded_experts = module.experts

        def experts_are_split() -> bool:
            """Whether the expert-parallel plan, applied after this one, gave each rank whole experts
            (``DistributedConfig(tp_size=W, ep_size=W)``): then the MoE runs :func:`expert_parallel_moe`."""
            return getattr(sharded_experts, "expert_mesh", None) is not None

        def reduce_shared_input_grad(part: nn.Module, args: tuple) -> tuple:
            return (sum_gradient_over_ranks(args[0], group), *args[1:])

        def reduce_experts_input_grad(part: nn.Module, args: tuple) -> tuple:
            return args if experts_are_split() else reduce_shared_input_grad(part, args)

        module.shared_expert.register_forward_pre_hook(reduce_shared_input_grad)
        module.experts.register_forward_pre_hook(reduce_experts_input_grad)
        module.shared_expert_group = group  # the shared expert's output is a partial sum over it
        module.experts.tensor_parallel_size = mesh.size()  # ranks sharing a batch: expert LoRA's data-parallel count
        partial_forward = module.forward

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            if experts_are_split():  # the routed experts' reduction sums the shared expert's share too
                with local_parameters(module):
                    return expert_parallel_moe(module, hidden_states)
            if module.experts is not sharded_experts:  # per-expert LoRA added since the load: slice its adapters too
                shard_expert_lora(module.experts, sharded_experts, mesh)
            with local_parameters(module):
                out = partial_forward(hidden_states)  # [B, S, D], this rank's share
            return sum_over_ranks(out, group)

        module.forward = forward
        return module


class AttentionHeadsCheck(TensorParallelLayer):
    """The attention layer's rule (``"llama4_attention"``): refuses, when the plan is applied (at load, before any
    weight is read), a tensor-parallel size that cuts attention heads apart.

    transformers' ``colwise`` / ``rowwise`` rules on q/k/v/o split each projection into ``tp_size`` equal slices,
    which hold whole heads only when ``tp_size`` divides ``num_key_value_heads`` (and ``num_attention_heads``): past
    the KV heads a rank would get part of a head and attention would fail on its shapes, or be wrong. The projections
    keep their own rules; this one installs nothing."""

    def install_forward(self, module: nn.Module, mesh, *, config=None, mesh_manager=None) -> nn.Module:
        check_heads_split(module.config, mesh.size())
        return module


def check_heads_split(config, tp_size: int) -> None:
    """Raise a ``ValueError`` naming the sizes that work when ``tp_size`` ranks cannot each hold whole heads."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if kv_heads % tp_size == 0 and heads % tp_size == 0:
        return
    sizes = [size for size in range(1, kv_heads + 1) if kv_heads % size == 0 and heads % size == 0]
    raise ValueError(
        f"Tensor parallel over {tp_size} ranks splits attention by heads, but num_key_value_heads = {kv_heads} "
        f"(num_attention_heads = {heads}) is not a multiple of {tp_size}: a rank would hold part of a KV head. "
        f"Use a tensor-parallel size in {sizes} and the other ranks for data or expert parallel, e.g. "
        f"`DistributedConfig(tp_size={sizes[-1]}, fsdp_size={max(tp_size // sizes[-1], 1)}, ...)`."
    )


# The per-expert LoRA factors that run along the experts' hidden dim I, by that dim: under tensor parallel each rank
# keeps its slice of them (gate/up B [E, I, r], down A [E, r, I]); the others (gate/up A, down B) stay whole.
SHARDED_LORA_FACTORS = {"lora_gate_B": 1, "lora_up_B": 1, "lora_down_A": 2}


def shard_expert_lora(lora: nn.Module, sharded_experts: nn.Module, mesh) -> None:
    """Per-expert LoRA (``lora_experts``) on tensor-parallel experts, sharded with them: each rank keeps its I slice
    of the gate/up ``B [E, I/W, r]`` and down ``A [E, r, I/W]`` (``SHARDED_LORA_FACTORS``, sliced in place, so an
    optimizer made before the first forward keeps them) and the other factors whole, so its adapters give its slice's
    part of the update and the MoE's all-reduce sums them. A sliced factor's gradient is exact on its rank; a whole
    factor's is a partial sum over the ranks, all-reduced in backward: every rank takes the one-process step. The
    experts' input gradient is summed over the ranks, as without LoRA.

    ``state_dict`` gathers the slices (every rank calls it, as for transformers' sharded weights: ``Trainer`` and
    PEFT's ``save_pretrained`` on every rank) and ``load_state_dict`` takes whole factors, so saved adapters are the
    one-process adapters.
    """
    if getattr(lora, "get_base_layer", lambda: None)() is not sharded_experts:
        raise NotImplementedError(
            f"The routed experts were replaced by {type(lora).__name__} after a tensor-parallel load: only per-expert "
            "LoRA (`lora_experts`) knows how to run on sharded experts."
        )
    rank, world, group = mesh.get_local_rank(), mesh.size(), mesh.get_group()
    if sharded_experts.intermediate_size % world:
        raise ValueError(
            f"Per-expert LoRA under tensor parallel: intermediate_size = {sharded_experts.intermediate_size} does not "
            f"split evenly over {world} ranks; use a tensor-parallel size that divides it."
        )

    def reduce_input_grad(part: nn.Module, args: tuple) -> tuple:
        if not part._adapters_in_use():  # the base experts' own hook reduces it
            return args
        return (sum_gradient_over_ranks(args[0], group), *args[1:])

    def all_reduce_grad(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    def sliced_factors(prefix: str, keys) -> Iterator[tuple[str, int]]:
        """``(state-dict key, I dim)`` of the factors this rank holds a slice of."""
        for key in keys:
            factor, _, adapter = key.removeprefix(prefix).partition(".")
            if key.startswith(prefix) and factor in SHARDED_LORA_FACTORS and adapter in getattr(lora, factor):
                if getattr(getattr(lora, factor)[adapter], "_tensor_parallel", None) == "sliced":
                    yield key, SHARDED_LORA_FACTORS[factor]

    def gather_slices(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for key, dim in list(sliced_factors(prefix, state_dict)):
            slices = [torch.empty_like(state_dict[key]) for _ in range(world)]
            torch.distributed.all_gather(slices, state_dict[key].contiguous(), group=group)
            state_dict[key] = torch.cat(slices, dim=dim)

    def slice_whole(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        for key, dim in list(sliced_factors(prefix, state_dict)):
            if state_dict[key].shape[dim] == sharded_experts.intermediate_size:
                state_dict[key] = state_dict[key].chunk(world, dim=dim)[rank]

    if not hasattr(lora, "_tensor_parallel_hooks"):
        lora._tensor_parallel_hooks = [
            lora.register_forward_pre_hook(reduce_input_grad),
            lora.register_state_dict_post_hook(gather_slices),
            lora.register_load_state_dict_pre_hook(slice_whole),
        ]
    for name, param in lora.named_parameters():  # adapters added since the last forward too
        factor = name.partition(".")[0]
        if not factor.startswith("lora_") or hasattr(param, "_tensor_parallel"):
            continue
        if factor in SHARDED_LORA_FACTORS:
            param.data = param.data.chunk(world, dim=SHARDED_LORA_FACTORS[factor])[rank].clone()
            param._tensor_parallel = "sliced"
        else:
            param.register_hook(all_reduce_grad)
            param._tensor_parallel = "whole"


# Tensor parallel: each quantized tensor takes the placement of the weight it quantizes, gate_up along 2I (a gate and an
# up slice), down along I. FP8's ``down_proj_scale [E, D, 1]`` (one per output column of a weight split along its
# input) stays whole on every rank, as transformers keeps a rowwise layer's ``weight_scale``.
_GATE_UP = _StridedShard(dim=-1, split_factor=2)
QUANTIZED_TP_PLACEMENTS = {
    "gate_up_proj_qweight": _GATE_UP,  # int4 [E, D/2, 2I]
    "gate_up_proj_scales": _GATE_UP,  # int4 [E, D/G, 2I]
    "down_proj_qweight": Shard(-2),  # int4 [E, I/2, D]
    "down_proj_scales": Shard(-2),  # int4 [E, I/G, D]
    "gate_up_proj": _GATE_UP,  # FP8 [E, D, 2I]
    "gate_up_proj_scale": _GATE_UP,  # FP8 [E, 1, 2I]
    "down_proj": Shard(-2),  # FP8 [E, I, D]
}


def shard_quantized_experts(experts: nn.Module, mesh) -> None:
    """Give quantized experts' meta buffers the tensor-parallel placements of the weights they quantize
    (``QUANTIZED_TP_PLACEMENTS``), so that the loader reads only this rank's slices. Quantizing on load, the dense
    tensors arrive sharded the same way and are quantized locally. :func:`keep_local_shards` turns the loaded
    DTensors into plain local buffers before the CPU kernel's repack.

    Int4 groups run along each weight's input dim, so the group size G must divide the local I of down_proj: then
    every rank's groups are the one-process groups and the shards dequantize exactly.
    """
    world, inner, group = mesh.size(), experts.intermediate_size, getattr(experts, "group_size", None)
    if group is not None and (inner % world or (inner // world) % group or (inner // world) % 2):
        raise ValueError(
            f"Int4 experts under tensor parallel: each of the {world} ranks holds intermediate_size / {world} = "
            f"{inner / world:g} rows of down_proj, which must be a whole, even multiple of the int4 group size "
            f"{group}; use a tensor-parallel size or a group size that divides intermediate_size = {inner}."
        )
    for name, meta in experts.named_buffers(recurse=False):
        if name in QUANTIZED_TP_PLACEMENTS:
            placement = QUANTIZED_TP_PLACEMENTS[name]
            experts.register_buffer(name, distribute_tensor(meta, mesh, [placement], src_data_rank=None))


def keep_local_shards(module: nn.Module) -> None:
    """Replace ``module``'s own DTensor parameters and buffers (the quantized slices the loader gave this rank) by
    plain buffers holding the local shards: the quantized kernels and ``state_dict`` see this rank's share only."""
    tensors = {**dict(module.named_buffers(recurse=False)), **dict(module.named_parameters(recurse=False))}
    for name, tensor in tensors.items():
        if isinstance(tensor, DTensor):
            module._parameters.pop(name, None)
            module.register_buffer(name, tensor.to_local().detach())


def check_quantized_linears_unsharded(model: nn.Module, linear_types: tuple[type, ...]) -> None:
    """Quantized linear layers (int4 shared experts, FP8 linears) keep their weights in buffers that tensor
    parallel's Linear rules do not shard: refuse them under ``tp_size > 1`` rather than compute wrong outputs."""
    tp_size = getattr(getattr(model.config, "distributed_config", None), "tp_size", 1)
    quantized = [name for name, module in model.named_modules() if isinstance(module, linear_types)]
    if tp_size > 1 and quantized:
        raise NotImplementedError(
            f"Quantized linear layers ({quantized[0]} and {len(quantized) - 1} more) under tensor parallel "
            f"(tp_size={tp_size}): tensor parallel shards quantized routed experts only. Keep the other layers in "
            "bf16 (int4: `quantize_shared_expert=False`; FP8: list them in `modules_to_not_convert`, as Meta's "
            "FP8 checkpoints do), or use expert parallel with FSDP: `DistributedConfig(fsdp_size=N, ep_size=N)`."
        )


# --- expert parallel ---------------------------------------------------------------------------------------------

# Why parameters for a while: transformers' plans (``_expand_parallel_plan``) list parameters only, and the experts
# module's own rule is transformers' ``ep_dispatch_experts``, so a tensor reaches ``llama4_grouped_gemm`` (which
# also sets the local expert count and the routed call) only as a parameter. They are buffers again before FSDP2
# wraps the experts and before loading, so FSDP2, optimizers and ``state_dict`` see what a one-process load gives.
_EXPOSED = "_buffers_exposed_to_expert_plan"


def expose_quantized_experts(model: nn.Module, experts_type: type) -> None:
    """Under ``DistributedConfig(ep_size > 1)``, re-register the buffers of every ``experts_type`` module of
    ``model`` (meta, before the plans apply) as frozen parameters, so that the expert-parallel plan shards them.
    Its dense load slots (quantizing on load) become buffers once sharded too: the loader quantizes and drops them."""
    if getattr(getattr(model.config, "distributed_config", None), "ep_size", 1) <= 1:
        return
    for module in model.modules():
        if isinstance(module, experts_type):
            buffers = dict(module.named_buffers(recurse=False))
            for name, buffer in buffers.items():
                del module._buffers[name]
                module.register_parameter(name, nn.Parameter(buffer, requires_grad=False))
            setattr(module, _EXPOSED, frozenset(dict(module.named_parameters(recurse=False))))


def add_quantized_expert_rules(model: nn.Module, plan: dict[str, str]) -> None:
    """The quantizers' ``update_parallel_plan``: each exposed quantized tensor (``experts.gate_up_proj_qweight``,
    ``experts.down_proj_scale`` ...) gets the rule of the weight it quantizes (``experts.gate_up_proj`` ...)."""
    exposed = {
        layer_wildcard(f"{module_name}.{name}")
        for module_name, module in model.named_modules()
        for name in getattr(module, _EXPOSED, ())
    }
    for key, style in list(plan.items()):
        owner, _, weight = key.rpartition(".")
        if weight in ("gate_up_proj", "down_proj"):
            plan.update({name: style for name in exposed if name.startswith(f"{owner}.{weight}")})


def routed_experts_forward(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts call on this rank's L experts: rows ``[M, D]``, local expert ids and weights ``[M, k]``.

    Llama 4 scales an expert's *input* by the router score, so ``expert_parallel_moe`` sends each (token, expert)
    pair as its own pre-scaled row (k = 1, weight 1); the EP implementations mark a pair of another rank's expert
    with id L (weight 0), or send this rank only its own pairs. Only this rank's pairs are computed, sorted by
    expert through the experts' own ``forward(rows, tokens_per_expert)``; the others give zero rows.
    """
    num_local = experts.num_experts
    expert_ids = top_k_index.reshape(-1)  # [M·k]
    tokens_per_expert = torch.bincount(expert_ids, minlength=num_local + 1)[:num_local]  # [L]
    order = torch.argsort(expert_ids, stable=True)[: int(tokens_per_expert.sum())]  # this rank's pairs, by expert
    pair_rows = hidden_states.repeat_interleave(top_k_index.shape[-1], dim=0)  # [M·k, D]
    routed = pair_rows[order] * top_k_weights.reshape(-1, 1)[order].to(pair_rows.dtype)
    update = getattr(experts, "routed_update", None)
    if update is None:
        routed_out = type(experts).forward(experts, routed, tokens_per_expert)
    else:
        routed_out = experts.forward_loop(routed, tokens_per_expert, lora=update)
    out = pair_rows.new_zeros(pair_rows.shape).index_copy(0, order, routed_out)
    out = out.view(*top_k_index.shape, -1).sum(dim=1)  # [M, D]
    shared = getattr(experts, "shared_partial", None)
    return out if shared is None else shared.fold_into(out, hidden_states, experts.expert_mesh.get_group())


@contextlib.contextmanager
def attached(experts: nn.Module, name: str, value: object) -> Iterator[None]:
    """``experts.<name> = value`` for the duration of a call: transformers' EP implementations call the experts'
    routed forward themselves, so what that forward needs beyond their arguments rides on the module."""
    setattr(experts, name, value)
    try:
        yield
    finally:
        setattr(experts, name, None)


def routed_update(experts: nn.Module, update: Callable) -> contextlib.AbstractContextManager:
    """Expert-parallel experts called within this context add ``update(x, local expert, projection)`` to their
    projections (per-expert LoRA, ``lora_experts``)."""
    return attached(experts, "routed_update", update)


@dataclasses.dataclass
class SharedPartial:
    """The shared expert's output ``output [T, D]`` beside the routed ``rows [T·k, D]`` dispatched with it: under
    tensor parallel (``group``, set by ``MoeTensorParallel``) this rank's partial sum over the group, else whole."""

    output: torch.Tensor
    rows: torch.Tensor
    group: ProcessGroup | None
    folded: bool = False

    def fold_into(self, routed: torch.Tensor, rows: torch.Tensor, expert_group: ProcessGroup) -> torch.Tensor:
        """``routed [T·k, D]``, what this rank's experts gave for ``rows``, plus the partial output on each token's
        first pair, when the EP implementation will sum ``routed`` over the ranks the output is partial over: it ran
        this rank's experts on the very rows the MoE dispatched (the batch every rank holds, so the routed outputs
        can only be combined by summing them, e.g. transformers' ``AllReduceEP``) and its expert group is the
        tensor-parallel group. Then one all-reduce gives the MoE output. ``routed`` unchanged otherwise."""
        same_rows = rows.data_ptr() == self.rows.data_ptr() and rows.shape == self.rows.shape
        if self.group is None or not same_rows:
            return routed
        if get_process_group_ranks(self.group) != get_process_group_ranks(expert_group):
            return routed
        self.folded = True
        pairs = routed.view(self.output.shape[0], -1, routed.shape[-1])  # [T, k, D]
        return torch.cat([pairs[:, :1] + self.output.unsqueeze(1), pairs[:, 1:]], dim=1).view_as(routed)

    def reduced(self) -> torch.Tensor:
        """The whole shared-expert output ``[T, D]``: all-reduced over ``group`` under tensor parallel."""
        return self.output if self.group is None else sum_over_ranks(self.output, self.group)


def expert_parallel_moe(moe: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The MoE layer under tensor parallel on expert-parallel experts (``DistributedConfig(tp_size=W, ep_size=W)``,
    installed by :class:`MoeTensorParallel`): ``hidden_states [B, S, D]`` → ``[B, S, D]``.

    Each (token, expert) pair goes to transformers' ``ep_dispatch_experts`` as one row already scaled by its score
    (weight 1), so every EP implementation, all-to-all included, keeps Llama 4's input scaling. Under tensor parallel
    too the shared expert's partial output rides into the routed call, which adds it before the experts' all-reduce
    when the implementation combines by one (:meth:`SharedPartial.fold_into`, the default at inference): one
    all-reduce per MoE layer. Otherwise (all-to-all) it is all-reduced on its own.
    """
    x = hidden_states.reshape(-1, moe.hidden_size)  # [T, D]
    scores, experts, _ = moe.router(x)  # [T, k], [T, k]
    top_k = experts.shape[-1]
    pair_rows = x.repeat_interleave(top_k, dim=0) * scores.reshape(-1, 1)  # [T·k, D]
    unit_weights = scores.new_ones(pair_rows.shape[0], 1)
    shared = SharedPartial(moe.shared_expert(x), pair_rows, getattr(moe, "shared_expert_group", None))
    with attached(getattr(moe.experts, "get_base_layer", lambda: moe.experts)(), "shared_partial", shared):
        routed = moe.experts(pair_rows, experts.reshape(-1, 1), unit_weights)  # [T·k, D], summed over the ranks
    routed = routed.view(-1, top_k, x.shape[-1]).sum(dim=1).to(x.dtype)
    out = routed if shared.folded else shared.reduced() + routed
    return out.view(hidden_states.shape)


def expert_dispatch_call(experts: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of expert-parallel experts (:class:`ExpertShard`): the MoE's own call, ``(rows [N, D]
    grouped by expert, tokens_per_expert [E])``, as transformers' EP dispatch takes it: ``(rows, expert ids [N, 1],
    unit weights [N, 1])``, each row already scaled by its router score. The dispatch returns each row's output in
    place, so the MoE adds them to the shared expert's output as without expert parallel. A call in the dispatch's
    form already (:func:`expert_parallel_moe`) passes unchanged."""
    if len(args) != 2:
        return None
    rows, tokens_per_expert = args
    expert_ids = torch.repeat_interleave(
        torch.arange(tokens_per_expert.numel(), device=rows.device), tokens_per_expert
    )
    return rows, expert_ids[:, None], rows.new_ones(rows.shape[0], 1)


class ExpertShard(MoEParamShard):
    """transformers' ``grouped_gemm`` (whole experts, ``Shard(0)``) that also gives the experts module the routed
    call ``forward(hidden_states, top_k_index, top_k_weights)`` which ``ep_dispatch_experts`` wraps next, and its
    ``expert_mesh`` (per-expert LoRA shards its adapters on it), and turns the MoE's own call into the dispatch's
    (:func:`expert_dispatch_call`): the MoE layer runs unchanged. A quantized tensor exposed to the plan
    (:func:`expose_quantized_experts`) goes back to the buffers, sharded by expert: FSDP2 then leaves it alone and
    the loader reads this rank's experts into it."""

    def shard_param(self, module: nn.Module, param: str, mesh) -> None:
        super().shard_param(module, param, mesh)
        if getattr(module, "expert_mesh", None) is None:  # once per experts module (it has two weights)
            module.forward = functools.partial(routed_experts_forward, module)
            module.register_forward_pre_hook(expert_dispatch_call)
            module.expert_mesh = mesh  # this rank holds experts [rank·L, (rank+1)·L) of the mesh's W·L
        if param in getattr(module, _EXPOSED, ()):  # a quantized tensor: a buffer again, now by expert
            module.register_buffer(param, module._parameters.pop(param).data)


ALL_PARALLEL_STYLES.register("llama4_attention", AttentionHeadsCheck())
ALL_PARALLEL_STYLES.register("llama4_moe", MoeTensorParallel())
ALL_PARALLEL_STYLES.register("llama4_grouped_gemm", ExpertShard(Shard(0), shards_expert_dim=True))
