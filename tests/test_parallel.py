"""Scale-out on transformers' distributed engine: tensor and expert parallel MoE, under ``torchrun`` on CPU/gloo.

Each test saves a tiny checkpoint, computes the one-process logits and greedy tokens, then launches this file
under ``torchrun``; every rank loads the checkpoint the way a user does and checks its logits, tokens and its
share of the routed-expert storage (the ``__main__`` part below).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_configs import MAVERICK_LIKE, SCOUT_LIKE, VOCAB, text_config_from_meta

from modeling_llama4 import Llama4ForCausalLM

NUM_EXPERTS = 8
CONFIGS = {
    # 4 kv heads so attention shards over 4 ranks; 8 experts so expert parallel has 2 per rank at world 4.
    "scout": dict(SCOUT_LIKE, n_kv_heads=4, moe_args=dict(SCOUT_LIKE["moe_args"], num_experts=NUM_EXPERTS)),
    "maverick": dict(MAVERICK_LIKE, n_kv_heads=4, moe_args=dict(MAVERICK_LIKE["moe_args"], num_experts=NUM_EXPERTS)),
}
LAYOUTS = ("tp", "tp_ep", "fsdp_ep")
NEW_TOKENS = 6
ATOL = 1e-5


def prompt_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory) -> Path:
    """A saved tiny checkpoint with the one-process logits and greedy tokens beside it."""
    torch.manual_seed(0)
    model = Llama4ForCausalLM(text_config_from_meta(CONFIGS[request.param])).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    ids = prompt_ids()
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    torch.save({"ids": ids, "logits": logits, "tokens": tokens}, path / "expected.pt")
    return path


def torchrun(world: int, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}"]
    command += [f"--master-port={free_port()}", __file__, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_and_expert_parallel_shard_the_experts_and_match_one_process(checkpoint, world):
    """Each layout holds 1/world of the routed experts per rank and gives the logits and greedy tokens of one process:
    ``tp_plan="auto"``, ``DistributedConfig(tp_size=W, ep_size=W)`` (experts combined by all-reduce) and
    ``DistributedConfig(fsdp_size=W, ep_size=W)`` (tokens exchanged by all-to-all)."""
    torchrun(world, "--checkpoint", str(checkpoint), "--modes", *LAYOUTS)


@pytest.mark.slow
def test_expert_parallel_names_experts_that_do_not_split_evenly(tmp_path):
    config = text_config_from_meta(dict(CONFIGS["scout"], moe_args=dict(SCOUT_LIKE["moe_args"], num_experts=3)))
    Llama4ForCausalLM(config).save_pretrained(tmp_path)
    torchrun(2, "--checkpoint", str(tmp_path), "--modes", "tp_ep", "--expect-error", "Cannot evenly shard 3 experts")


# ---------------------------------------------------------------------------------------------- rank side


def routed_expert_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """``(local, global)`` bytes of the routed experts' parameters on this rank."""
    local = total = 0
    for name, param in model.named_parameters():
        if ".experts." in name:
            local_param = param.to_local() if hasattr(param, "to_local") else param
            local += local_param.numel() * local_param.element_size()
            total += param.numel() * param.element_size()
    return local, total


def load(checkpoint: str, layout: str, world: int) -> torch.nn.Module:
    """The model as a user loads it under each layout."""
    from transformers import AutoModelForCausalLM, DistributedConfig

    if layout == "tp":
        return AutoModelForCausalLM.from_pretrained(checkpoint, tp_plan="auto").eval()
    sizes = dict(tp_size=world) if layout == "tp_ep" else dict(fsdp_size=world)  # fsdp_ep: ranks own their batch
    config = DistributedConfig(ep_size=world, **sizes)
    return AutoModelForCausalLM.from_pretrained(checkpoint, distributed_config=config).eval()


def check_rank(checkpoint: str, layout: str) -> None:
    import torch.distributed as dist

    import modeling_llama4  # noqa: F401  (registers the Auto classes)

    world = int(os.environ["WORLD_SIZE"])
    model = load(checkpoint, layout, world)
    mode = layout
    expected = torch.load(Path(checkpoint) / "expected.pt")
    local, total = routed_expert_bytes(model)
    assert local * world == total, f"rank holds {local} of {total} routed-expert bytes at world {world}"
    with torch.no_grad():
        logits = model(expected["ids"]).logits
        tokens = model.generate(expected["ids"], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    error = (logits - expected["logits"]).abs().max().item()
    assert error <= ATOL, f"{mode} world {world}: logits differ from one process by {error:.2e}"
    assert torch.equal(tokens, expected["tokens"]), f"{mode} world {world}: greedy tokens differ"
    dist.barrier()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--modes", nargs="+", choices=LAYOUTS, required=True)
    parser.add_argument("--expect-error", help="the load must raise a ValueError containing this text")
    arguments = parser.parse_args()
    for layout in arguments.modes:
        if arguments.expect_error:
            with pytest.raises(ValueError, match=arguments.expect_error):
                load(arguments.checkpoint, layout, int(os.environ["WORLD_SIZE"]))
        else:
            check_rank(arguments.checkpoint, layout)
