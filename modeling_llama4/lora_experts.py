"""Per-expert LoRA for Llama 4's routed experts, as a PEFT custom LoRA layer.

Each routed expert ``e`` gets its own low-rank update on its gate, up and down projections::

    gate_e(x) = x W_gate[e] + s · dropout(x) A_gate[e]ᵀ B_gate[e]ᵀ        (likewise up and down)

with ``s = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``). The layer keeps the sparse dispatch of
:class:`~modeling_llama4.moe.Llama4TextExperts`: each row runs only through its own expert and that expert's adapter.

Usage: ``import modeling_llama4`` makes PEFT put this layer on the routed experts of this package's models
(:func:`~modeling_llama4.adapters.enable_expert_lora`), so the ordinary PEFT and transformers calls work::

    import modeling_llama4
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, target_modules=["experts", "q_proj", "v_proj"]))
    model.save_pretrained(path)  # train first
    model = PeftModel.from_pretrained(base_model, path)  # in a fresh process too; or base_model.load_adapter(path)

PEFT's loading (``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, Trainer's resume) refuses a NaN or
infinite expert factor with an error naming it (the layer's ``load_state_dict`` hook). transformers'
``model.load_adapter`` reads the file with its own loader, which no module hook sees.

QLoRA: on a model loaded with ``quantization_config=Llama4Int4Config(...)`` the same config puts the adapters on the
int4 experts (:class:`~modeling_llama4.quantization_int4.Llama4Int4TextExperts`): the int4 buffers stay frozen, each
routed expert is dequantized for its rows only, and the adapters (float32, as PEFT keeps them on quantized bases) train.
Such adapters cannot be merged into the int4 weights (``merge`` raises): ``model.get_base_model().dequantize()``
first swaps the int4 experts for dense ones, then ``merge_and_unload()`` works.

Under expert parallel (``DistributedConfig(tp_size=N, ep_size=N)``, or ``fsdp_size=N, ep_size=N`` with data parallel)
each rank holds the adapters of its own experts only, a ``Shard(0)`` DTensor initialised with the values one process
gives those experts; the adapters ride along transformers' EP dispatch (``parallel.routed_update``). With data parallel
their gradients are averaged over the batches as FSDP2 averages the experts' weights
(:func:`experts_gradient_reduction`). Merging updates each rank's share of the experts, under tensor parallel, expert
parallel and FSDP2 alike.

``"experts"`` matches every ``feed_forward.experts`` module (not ``shared_expert``, an ordinary MLP that takes ordinary
LoRA on ``gate_proj``/``up_proj``/``down_proj``). Shape names: E experts, D hidden size, I expert hidden size, r rank,
n rows routed to one expert, N rows in all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from .moe import Llama4TextExperts
from .parallel import routed_update
from .quantized_experts import Llama4Fp8TextExperts, Llama4Int4TextExperts

try:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError:  # importable without peft (adapters.enable_expert_lora then does nothing)
    LoraConfig = BaseTunerLayer = check_adapters_to_merge = None
    LoraLayer = object

EXPERT_CLASSES = (Llama4TextExperts, Llama4Int4TextExperts, Llama4Fp8TextExperts)  # bf16, int4 (QLoRA), FP8


# Each projection's factor names, (A [E, r, in], B [E, out, r]).
_FACTORS = {
    "gate": ("lora_gate_A", "lora_gate_B"),
    "up": ("lora_up_A", "lora_up_B"),
    "down": ("lora_down_A", "lora_down_B"),
}


class _LowRankUpdate(torch.autograd.Function):
    """``s · x Aᵀ Bᵀ`` computed in the factors' dtype (autocast's, under autocast). Saves ``x`` in its own dtype
    (already kept for the expert's backward) and casts it again in backward, where autograd would keep a float32 copy
    of every routed row."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float):
        """``x [n, in]``, ``lora_a [r, in]``, ``lora_b [out, r]`` → ``[n, out]``."""
        projected = x.to(lora_a.dtype) @ lora_a.T  # [n, r]
        ctx.save_for_backward(x, lora_a, lora_b, projected)
        ctx.scaling = scaling
        return projected @ lora_b.T * scaling

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, lora_a, lora_b, projected = ctx.saved_tensors
        dtype = projected.dtype  # the forward's compute dtype
        grad = grad.to(dtype) * ctx.scaling  # [n, out]
        grad_projected = grad @ lora_b.to(dtype)  # [n, r]
        grad_x = (grad_projected @ lora_a.to(dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_a = (grad_projected.T @ x.to(dtype)).to(lora_a.dtype)  # [r, in]
        grad_b = (grad.T @ projected).to(lora_b.dtype)  # [out, r]
        return grad_x, grad_a, grad_b, None


class Llama4ExpertsLoraLayer(nn.Module, LoraLayer):
    """LoRA on every routed expert of a :class:`Llama4TextExperts` or :class:`Llama4Int4TextExperts`, computed only
    for the rows routed to it, through the base module's ``forward_loop(x, tokens_per_expert, lora=...)`` hook.

    Per adapter: ``lora_{gate,up}_A [E, r, D]``, ``lora_{gate,up}_B [E, I, r]``, ``lora_down_A [E, r, I]``,
    ``lora_down_B [E, D, r]``. ``forward(x [N, D] grouped by expert, tokens_per_expert [E]) → [N, D]`` like the base.
    """

    adapter_layer_names = tuple(name for pair in _FACTORS.values() for name in pair)
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_rslora")

    def __init__(
        self,
        base_layer: Llama4TextExperts | Llama4Int4TextExperts,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self._active_adapter = adapter_name
        # Under expert parallel with data parallel: a factor's identity whose backward averages it over the batches.
        self._average_over_batches: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.register_load_state_dict_pre_hook(refuse_non_finite_factors)
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.hidden_size, module.hidden_size

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        """Add adapter ``adapter_name`` with rank ``r``: A initialised as in PEFT, B zero (a no-op adapter)."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if config.use_dora or config.lora_bias or self.resolve_lora_variant(config=config) is not None:
            raise ValueError(f"{type(self).__name__} supports plain LoRA only (no DoRA, variants or lora_bias).")
        base = self.get_base_layer()
        experts, hidden, inner = base.num_experts, base.hidden_size, base.intermediate_size
        sizes = {"gate": (hidden, inner), "up": (hidden, inner), "down": (inner, hidden)}  # (in, out)
        if self._int4_base():  # float32 adapters, as PEFT makes them on quantized bases
            factory = dict(device=next(base.buffers()).device, dtype=torch.float32)
        else:
            factory = dict(device=base.gate_up_proj.device, dtype=base.gate_up_proj.dtype)
        if self._expert_mesh() is not None and isinstance(base, FSDPModule):
            self._average_over_batches = experts_gradient_reduction(base)
        for projection, (name_a, name_b) in _FACTORS.items():
            size_in, size_out = sizes[projection]
            getattr(self, name_a)[adapter_name] = self._by_expert(torch.empty(experts, r, size_in, **factory))
            getattr(self, name_b)[adapter_name] = self._by_expert(torch.empty(experts, size_out, r, **factory))
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_dropout[adapter_name] = dropout
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        """PEFT's init per expert: A Kaiming-uniform (or N(0, 1/r) for ``"gaussian"``), B zero; ``False``: both random."""
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"{type(self).__name__} supports init_lora_weights True, False or 'gaussian'.")
        for name_a, name_b in _FACTORS.values():
            for name in (name_a, name_b):
                self._init_experts(getattr(self, name)[adapter_name], kaiming_uniform_per_expert)
            if init_lora_weights == "gaussian":
                gaussian = partial(nn.init.normal_, std=1 / self.r[adapter_name])
                self._init_experts(getattr(self, name_a)[adapter_name], gaussian)
            if init_lora_weights:
                nn.init.zeros_(_local(getattr(self, name_b)[adapter_name]))

    def _expert_mesh(self) -> DeviceMesh | None:
        """The expert-parallel mesh of the base (``parallel.ExpertShard``), which then holds this rank's L experts and
        is called the way transformers' EP dispatch calls experts, ``(rows, expert ids, weights)``; else None."""
        return getattr(self.get_base_layer(), "expert_mesh", None)

    def _by_expert(self, factor: torch.Tensor) -> nn.Parameter:
        """A factor ``[L, ...]`` of the base's experts as a parameter: under expert parallel the local shard of a
        ``[E, ...]`` DTensor (``Shard(0)``), so that ``state_dict`` and Trainer see the adapters as sharded by expert
        (Trainer broadcasts and averages only plain replicated parameters)."""
        mesh = self._expert_mesh()
        if mesh is not None:
            factor = DTensor.from_local(factor, mesh, [Shard(0)], run_check=False)
        return nn.Parameter(factor)

    def _init_experts(self, factor: torch.Tensor, init: Callable[[torch.Tensor], Any]) -> None:
        """``init`` the factor of this rank's L experts with the random draws one process makes for them: under
        expert parallel every rank draws all W·L experts' values and keeps its own."""
        mesh, factor = self._expert_mesh(), _local(factor)
        if mesh is None:
            init(factor)
            return
        every_expert = factor.new_empty(mesh.size() * factor.shape[0], *factor.shape[1:])  # [E, ...]
        init(every_expert)
        factor.copy_(every_expert.chunk(mesh.size())[mesh.get_local_rank()])

    def _int4_base(self) -> bool:
        """A quantized base (int4 or FP8): frozen buffers, float32 adapters, no merging."""
        return not isinstance(self.get_base_layer(), Llama4TextExperts)

    def _adapters_in_use(self) -> list[str]:
        if self.disable_adapters or self.merged:
            return []
        return [name for name in self.active_adapters if name in self.lora_gate_A]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x [N, D]`` grouped by expert → ``[N, D]``: each expert's SwiGLU plus its LoRA, on its rows only. Under
        expert parallel the base's call instead: ``x [M, D]``, expert ids and weights ``[M, k]`` → ``[M, D]``."""
        self._check_forward_args(x, *args, **kwargs)
        adapters = self._adapters_in_use()
        if not adapters:
            return self.base_layer(x, tokens_per_expert, *args)
        factors = {adapter: self._per_expert_factors(adapter) for adapter in adapters}
        lora = partial(self._lora_delta, factors=factors)
        if self._expert_mesh() is not None:  # (rows, expert ids, weights): the EP dispatch runs them and LoRA
            with routed_update(self.get_base_layer(), lora):
                return self.base_layer(x, tokens_per_expert, *args)
        return self.get_base_layer().forward_loop(x, tokens_per_expert, lora=lora)

    def _per_expert_factors(
        self, adapter: str
    ) -> dict[str, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
        """Per projection, the adapter's ``(A, B)`` split into per-expert views once per forward: backward then stacks
        each factor's gradient once, instead of writing one full ``[E, ...]`` gradient per routed expert."""
        return {
            projection: (self._local_factor(name_a, adapter).unbind(0), self._local_factor(name_b, adapter).unbind(0))
            for projection, (name_a, name_b) in _FACTORS.items()
        }

    def _local_factor(self, name: str, adapter: str) -> torch.Tensor:
        """This rank's ``[L, ...]`` of factor ``name``; with data parallel, averaged over the batches in backward."""
        factor = _local(getattr(self, name)[adapter])
        return factor if self._average_over_batches is None else self._average_over_batches(factor)

    def _lora_delta(self, x: torch.Tensor, expert: int, projection: str, factors: dict[str, dict]) -> torch.Tensor:
        """``Σ_adapters s · dropout(x) A[e]ᵀ B[e]ᵀ`` for one expert's rows ``x [n, in]`` → ``[n, out]``; ``factors``:
        adapter → :meth:`_per_expert_factors`."""
        delta = 0
        for adapter, per_projection in factors.items():
            lora_as, lora_bs = per_projection[projection]
            lora_a, lora_b = lora_as[expert], lora_bs[expert]  # [r, in], [out, r]
            dropout = self.lora_dropout[adapter]
            rows = dropout(x.to(lora_a.dtype)) if self.training and isinstance(dropout, nn.Dropout) else x
            delta = delta + _LowRankUpdate.apply(rows, lora_a, lora_b, self.scaling[adapter])
        return delta.to(x.dtype)

    def get_delta_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's updates to the base weights: ``(Δgate_up [E, D, 2I], Δdown [E, I, D])``, in the base
        weights' dtype (the adapter's on an int4 base)."""

        def delta(projection: str) -> torch.Tensor:  # s · (B A)ᵀ: [E, in, out]
            name_a, name_b = _FACTORS[projection]
            lora_a, lora_b = getattr(self, name_a)[adapter_name], getattr(self, name_b)[adapter_name]
            return (lora_b @ lora_a).transpose(1, 2) * self.scaling[adapter_name]

        dtype = self.lora_gate_A[adapter_name].dtype if self._int4_base() else self.get_base_layer().gate_up_proj.dtype
        return torch.cat([delta("gate"), delta("up")], dim=-1).to(dtype), delta("down").to(dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' updates into ``gate_up_proj`` and ``down_proj``; refused on an int4 base."""
        if self._int4_base():
            raise ValueError(
                "Cannot merge LoRA adapters into int4 experts: re-quantizing W + ΔW would round most of ΔW away. "
                "Dequantize first (model.get_base_model().dequantize()), then merge."
            )
        base = self.get_base_layer()
        weights = (base.gate_up_proj, base.down_proj)
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_gate_A:
                continue
            deltas = self.get_delta_weights(adapter)
            merged = [_local(weight) + _local_delta(delta, weight) for weight, delta in zip(weights, deltas)]
            if safe_merge and not all(torch.isfinite(weight).all() for weight in merged):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            for weight, merged_weight in zip(weights, merged):
                _local(weight).copy_(merged_weight)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapters' updates again (last merged first)."""
        base = self.get_base_layer()
        weights = (base.gate_up_proj, base.down_proj)
        while self.merged_adapters:
            for weight, delta in zip(weights, self.get_delta_weights(self.merged_adapters.pop())):
                _local(weight).sub_(_local_delta(delta, weight))

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _local(factor: torch.Tensor) -> torch.Tensor:
    """This rank's share of a factor or weight: the local shard of a DTensor, else the tensor itself."""
    return factor.to_local() if isinstance(factor, DTensor) else factor


def _local_delta(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The part of an update ``delta`` on this rank's share of ``weight`` (``_local(weight)``). Expert parallel:
    both are sharded by expert already. A whole ``delta`` on a sharded ``weight`` (FSDP2, or tensor parallel before
    the first forward slices the adapters) is split as ``weight`` is; after it, tensor parallel's adapter slices give
    this rank's part directly."""
    if isinstance(delta, DTensor):
        return delta.to_local()
    if isinstance(weight, DTensor) and delta.shape == weight.shape:
        return distribute_tensor(delta, weight.device_mesh, weight.placements, src_data_rank=None).to_local()
    return delta


class _AverageOverBatches(torch.autograd.Function):
    """Identity in forward; in backward the gradient divided by ``divide_factor`` and summed over ``groups``."""

    @staticmethod
    def forward(ctx: Any, factor: torch.Tensor, groups: list, divide_factor: float) -> torch.Tensor:
        ctx.groups, ctx.divide_factor = groups, divide_factor
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        grad = (grad / ctx.divide_factor).contiguous()  # all-reduced in place
        for group in ctx.groups:
            torch.distributed.all_reduce(grad, group=group)
        return grad, None, None


def experts_gradient_reduction(experts: FSDPModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gradient reduction FSDP2 applies to the weights of expert-parallel ``experts`` under data parallel
    (``DistributedConfig(fsdp_size=..., ep_size=...)``), for the adapters of those experts, which PEFT adds after
    FSDP2 wrapped them and so are outside its reduction: returns ``average(local factor [L, ...])``, an identity whose
    backward reduces the factor's gradient.

    This rank's experts run on the tokens that the ranks of its EP group send them, from the batches they hold; the
    ranks holding a copy of the same experts (the mesh dims of the FSDP2-sharded expert weights other than the EP
    mesh's: ``efsdp``, with ``dp_replicate`` under HSDP) together see every batch. A gradient is summed over those
    copies and divided by the data-parallel batch count, as transformers divides the experts' own gradients
    (``dp_size``): ``copies x ep_size / tp_size`` (an EP group spans ``ep_size / tp_size`` batches, each shared by a
    tensor-parallel group). The mean over the batches, as Trainer takes it for the replicated adapters. Reduced as it
    is computed, so gradient accumulation sums reduced micro-batch gradients.
    """
    weights = [weight for weight in experts.parameters(recurse=False) if isinstance(weight, DTensor)]
    if not weights:
        raise NotImplementedError(
            f"Per-expert LoRA on {type(experts).__name__} under expert parallel with data parallel: quantized experts "
            "keep no weights for FSDP2 to reduce, so their adapters' data-parallel reduction is unknown. Train QLoRA "
            'with `DistributedConfig(tp_size=N, ep_size=N)`, `tp_plan="auto"` or `DistributedConfig(fsdp_size=N)`.'
        )
    mesh, expert_mesh = weights[0].device_mesh, experts.expert_mesh  # (..., efsdp, ep) and (ep)
    copy_dims = [name for name in mesh.mesh_dim_names if name not in expert_mesh.mesh_dim_names]
    replica_groups = [mesh.get_group(name) for name in copy_dims if mesh[name].size() > 1]
    copies = math.prod(mesh[name].size() for name in copy_dims)
    batches_per_expert_group = expert_mesh.size() // getattr(experts, "tensor_parallel_size", 1)
    divide_factor = float(copies * batches_per_expert_group)
    return lambda factor: _AverageOverBatches.apply(factor, replica_groups, divide_factor)


def kaiming_uniform_per_expert(factor: torch.Tensor) -> None:
    """PEFT's init of a LoRA factor, per expert: ``factor [E, out, in]``, each ``[out, in]`` like ``nn.Linear.weight``."""
    for expert_weight in factor:
        nn.init.kaiming_uniform_(expert_weight, a=math.sqrt(5))


def refuse_non_finite_factors(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of :class:`Llama4ExpertsLoraLayer`: raise a ``ValueError`` naming the first
    adapter factor under ``prefix`` that holds NaN or infinite values (the CPU logits would stay finite, the damage
    invisible)."""
    for name, tensor in state_dict.items():
        if name.startswith(prefix) and tensor.is_floating_point() and not torch.isfinite(_local(tensor)).all():
            raise ValueError(f"LoRA adapter weight {name} holds non-finite values (NaN or inf): refusing the adapter")


def expert_lora_layer(
    target: nn.Module, adapter_name: str, config: LoraConfig, parameter_name: str | None = None, **kwargs: Any
) -> Llama4ExpertsLoraLayer | None:
    """The LoRA layer for PEFT's ``target``: :class:`Llama4ExpertsLoraLayer` when ``target`` is one of this package's
    routed-experts modules, targeted as a module (``target_modules``); ``None`` otherwise, for PEFT's own dispatch
    (``target_parameters`` on the experts gets PEFT's parameter wrapper)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if parameter_name is not None or not isinstance(base, EXPERT_CLASSES):
        return None
    return Llama4ExpertsLoraLayer(target, adapter_name, config=config, **kwargs)
