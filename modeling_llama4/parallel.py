"""Tensor- and expert-parallel MoE for transformers' distributed engine (``tp_plan`` / ``DistributedConfig``).

Registers the parallel style ``"llama4_moe"`` that the Llama 4 text config's ``base_model_tp_plan`` names for every
``feed_forward``. With the routed experts sharded along their hidden dim I (``gate_up_proj [E, D, 2I]`` keeps a gate
and an up slice of each expert, ``down_proj [E, I, D]`` the matching rows) and the shared expert sharded the same
way, each rank computes its slice of the shared expert and of *only the routed* experts, locally, with the MoE's
own sparse dispatch: both are partial sums of the MoE output, added before one all-reduce per MoE layer.

Shape names: T tokens, D hidden size, E experts, I expert hidden size, W ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers.distributed.parallel_utils import (
    ALL_PARALLEL_STYLES,
    _AllReduceBackward,
    _AllReduceForward,
    _use_local_dtensor_params,
)
from transformers.distributed.tensor_parallel import TensorParallelLayer

# The MoE's sharded parts: each computes a partial sum of the MoE output from the replicated input.
SHARDED_PARTS = ("shared_expert", "experts")


@contextlib.contextmanager
def local_parameters(module: nn.Module) -> Iterator[None]:
    """Run ``module`` and its children on the local shards of their DTensor parameters (autograd reaches the shards)."""
    with contextlib.ExitStack() as stack:
        for submodule in module.modules():
            stack.enter_context(_use_local_dtensor_params(submodule))
        yield


class MoeTensorParallel(TensorParallelLayer):
    """One all-reduce per MoE layer: ``out = all_reduce(shared_slice(x) + Σ routed expert slices(x · score))``.

    The plan shards the parameters (``"colwise"`` / ``"rowwise"`` / ``"packed_rowwise"`` rules on the weights
    themselves, so their Linear modules get no hooks of their own); this style runs the whole MoE on the local
    shards. The router stays replicated, so every rank routes identically. In backward, the input gradient of each
    sharded part is partial and is summed over the ranks (``_AllReduceBackward``); the output all-reduce passes the
    gradient through unchanged. Dense feed-forward layers (Maverick's interleaved ones) keep their own Linear rules.
    """

    def install_forward(self, module: nn.Module, mesh) -> nn.Module:
        if not all(hasattr(module, part) for part in SHARDED_PARTS):
            return module
        group = mesh.get_group()

        def reduce_input_grad(part: nn.Module, args: tuple) -> tuple:
            return (_AllReduceBackward.apply(args[0], group), *args[1:])

        for part in SHARDED_PARTS:
            getattr(module, part).register_forward_pre_hook(reduce_input_grad)
        partial_forward = module.forward

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            with local_parameters(module):
                partial_out = partial_forward(hidden_states)  # [B, S, D], this rank's share
            return _AllReduceForward.apply(partial_out, group)

        module.forward = forward
        return module


ALL_PARALLEL_STYLES.register("llama4_moe", MoeTensorParallel())
