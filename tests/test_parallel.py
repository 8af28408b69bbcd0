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
def test_tensor_parallel_shards_the_experts_and_matches_one_process(checkpoint, world):
    """``tp_plan="auto"``: attention, shared and routed experts sharded; logits and greedy tokens as one process."""
    torchrun(world, "--checkpoint", str(checkpoint), "--mode", "tp")


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


def load(checkpoint: str, mode: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, tp_plan="auto").eval()


def check_rank(checkpoint: str, mode: str) -> None:
    import torch.distributed as dist

    import modeling_llama4  # noqa: F401  (registers the Auto classes)

    world = int(os.environ["WORLD_SIZE"])
    model = load(checkpoint, mode)
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
    parser.add_argument("--mode", choices=["tp"], required=True)
    arguments = parser.parse_args()
    check_rank(arguments.checkpoint, arguments.mode)
