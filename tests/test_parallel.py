"""Scale-out on transformers' distributed engine: tensor and expert parallel MoE, under ``torchrun`` on CPU/gloo.

Each test saves a tiny checkpoint, computes the one-process logits and greedy tokens, then launches this file
under ``torchrun``; every rank loads the checkpoint the way a user does and checks its logits, tokens and its
share of the routed-expert storage (the ``__main__`` part below).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_llama4 import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration
from modeling_llama4.tiny import MAVERICK_LIKE, SCOUT_LIKE, VOCAB, text_config_from_meta

NUM_EXPERTS = 8
CONFIGS = {
    # 4 kv heads so attention shards over 4 ranks; 8 experts so expert parallel has 2 per rank at world 4.
    "scout": dict(SCOUT_LIKE, n_kv_heads=4, moe_args=dict(SCOUT_LIKE["moe_args"], num_experts=NUM_EXPERTS)),
    "maverick": dict(MAVERICK_LIKE, n_kv_heads=4, moe_args=dict(MAVERICK_LIKE["moe_args"], num_experts=NUM_EXPERTS)),
}
# The vision tower at toy size: 56 px tiles of 14 px patches, pixel-shuffled to 4 tokens per tile; 4 heads.
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=56,
    patch_size=14,
    projector_input_dim=64,
    projector_output_dim=64,
    vision_output_dim=64,
)
IMAGE_TOKEN = VOCAB - 1
LAYOUTS = ("tp", "tp_ep", "fsdp_ep", "tp_fsdp_ep")
FSDP_ONLY = "fsdp"  # data parallel alone, for quantized experts (each rank holds them all)
TP_EP_ALL_REDUCE = "tp_ep_all_reduce"  # tp_ep with the experts combined by all-reduce in training too
EXPERT_COPIES = "fsdp_ep_copies"  # data parallel over 2 copies of each expert: world 4, ep_size 2 (efsdp 2)
NEW_TOKENS = 6
TRAIN_STEPS = 10
ATOL = 1e-5
# FP8 routed experts only, everything else bf16, as in Meta's FP8 checkpoints.
FP8_EXPERTS_ONLY = ["model.layers.*.self_attn", "model.layers.*.feed_forward.shared_expert", "lm_head"]


def prompt_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB - 3, (2, 11), generator=torch.Generator().manual_seed(5))


def build(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A random model and its inputs: a text model, or the multimodal one with two image tiles in the prompt."""
    torch.manual_seed(0)
    if name != "multimodal":
        return Llama4ForCausalLM(text_config_from_meta(CONFIGS[name])).eval(), {"input_ids": prompt_ids()}
    text = text_config_from_meta(CONFIGS["scout"])
    config = Llama4Config(
        text_config=text.to_dict(),
        vision_config=VISION,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
    )
    ids = prompt_ids()[:1]
    ids = torch.cat([ids[:, :3], torch.full((1, 8), IMAGE_TOKEN), ids[:, 3:]], dim=1)  # 2 tiles x 4 tokens
    inputs = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))}
    return Llama4ForConditionalGeneration(config).eval(), inputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[*sorted(CONFIGS), "multimodal"])
def checkpoint(request, tmp_path_factory) -> Path:
    """A saved tiny checkpoint with its inputs, one-process logits and greedy tokens beside it."""
    model, inputs = build(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    save_expected(model, inputs, path)
    return path


def save_expected(model: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    """The one-process logits and greedy tokens of ``model`` on ``inputs``, beside its checkpoint."""
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    expected = {"inputs": inputs, "logits": logits, "tokens": tokens, "expert_bytes": routed_expert_bytes(model)}
    torch.save(expected, path / "expected.pt")


def torchrun(world: int, *args: str, script: str = __file__) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}"]
    command += [f"--master-port={free_port()}", script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_and_expert_parallel_shard_the_experts_and_match_one_process(checkpoint, world):
    """Each layout holds 1/world of the routed experts per rank and gives the logits and greedy tokens of one process:
    ``tp_plan="auto"``, ``DistributedConfig(tp_size=W, ep_size=W)`` (experts combined by all-reduce),
    ``DistributedConfig(fsdp_size=W, ep_size=W)`` (tokens exchanged by all-to-all) and, at world 4,
    ``DistributedConfig(tp_size=2, fsdp_size=2, ep_size=4)``."""
    layouts = LAYOUTS if world == 4 else LAYOUTS[:-1]
    torchrun(world, "--checkpoint", str(checkpoint), "--modes", *layouts)


@pytest.mark.slow
def test_expert_parallel_names_experts_that_do_not_split_evenly(tmp_path):
    config = text_config_from_meta(dict(CONFIGS["scout"], moe_args=dict(SCOUT_LIKE["moe_args"], num_experts=3)))
    Llama4ForCausalLM(config).save_pretrained(tmp_path)
    torchrun(2, "--checkpoint", str(tmp_path), "--modes", "tp_ep", "--expect-error", "Cannot evenly shard 3 experts")


@pytest.mark.slow
def test_tensor_parallel_past_the_kv_heads_is_refused_at_load(tmp_path):
    """``tp_plan="auto"`` on 4 ranks with 2 KV heads would give each rank half a head: the load raises a ValueError
    naming ``num_key_value_heads`` and the sizes that work, before attention fails on its shapes."""
    config = text_config_from_meta(dict(CONFIGS["scout"], n_kv_heads=2))
    Llama4ForCausalLM(config).save_pretrained(tmp_path)
    expected = r"num_key_value_heads = 2 .* Use a tensor-parallel size in \[1, 2\]"
    torchrun(4, "--checkpoint", str(tmp_path), "--modes", "tp", "--expect-error", expected, "--at-load")


def test_moe_layer_imports_no_distributed_code():
    """The model core's MoE knows nothing of parallelism: the parallel styles replace its forward from outside."""
    import ast

    from modeling_llama4 import moe

    tree = ast.parse(Path(moe.__file__).read_text())
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not [name for name in imported if "parallel" in name or "distributed" in name], imported


@pytest.mark.slow
def test_int4_experts_under_tensor_parallel_keep_their_share_and_match_one_process(tmp_path):
    """``tp_plan="auto"`` on an int4 checkpoint, and quantizing a bf16 checkpoint on load under it: each rank keeps
    1/2 of the int4 expert bytes (its gate/up and down slices, with their scales) and gives one process's logits."""
    from modeling_llama4 import Llama4Int4Config

    model, inputs = build("scout")
    model.save_pretrained(tmp_path / "bf16")
    quantized = Llama4ForCausalLM.from_pretrained(
        tmp_path / "bf16", quantization_config=Llama4Int4Config(group_size=8)
    )
    quantized.save_pretrained(tmp_path / "int4")
    for path in ("bf16", "int4"):
        save_expected(quantized, inputs, tmp_path / path)
    torchrun(2, "--checkpoint", str(tmp_path / "int4"), "--modes", "tp")
    torchrun(2, "--checkpoint", str(tmp_path / "bf16"), "--modes", "tp", "--int4-group-size", "8")
    # intermediate_size 48: 24 rows of down_proj per rank do not hold whole groups of 16.
    torchrun(
        2,
        "--checkpoint",
        str(tmp_path / "bf16"),
        "--modes",
        "tp",
        "--int4-group-size",
        "16",
        "--expect-error",
        "whole, even multiple of the int4 group size 16",
    )


@pytest.mark.slow
@pytest.mark.parametrize("base", ["bf16", "int4"])
def test_expert_lora_training_step_under_tensor_parallel_matches_one_process(tmp_path, base):
    """Per-expert LoRA (QLoRA on the int4 base) added after a ``tp_plan="auto"`` load: each rank holds its I slice of
    the gate/up B and down A factors, the loss and every adapter gradient of a training step equal one process's, and
    ``state_dict`` gathers the one-process adapters."""
    from modeling_llama4 import Llama4Int4Config

    model, _ = build("scout")
    if base == "int4":
        model.save_pretrained(tmp_path / "bf16")
        quantization = Llama4Int4Config(group_size=8)
        model = Llama4ForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=quantization)
    model.save_pretrained(tmp_path)
    torch.save(expert_lora_step(model), tmp_path / "lora_step.pt")
    torchrun(2, "--checkpoint", str(tmp_path), "--lora-step")


def expert_lora_step(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and adapter gradients of one step of per-expert LoRA (same initialisation everywhere)."""
    model = add_expert_lora(model.train(), targets=("experts",))
    loss = model(input_ids=prompt_ids(), labels=prompt_ids()).loss
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [FSDP_ONLY, "fsdp_ep"])
def test_fsdp2_lora_training_matches_one_process(tmp_path, layout):
    """Trainer + per-expert LoRA on a model FSDP2-sharded at load (``DistributedConfig(fsdp_size=2)``, one unit per
    decoder layer; ``fsdp_ep``: with ``ep_size=2`` too, each rank holding the adapters of its own experts): the 10 step
    losses and the adapter rank 0 saves equal a one-process run's."""
    model, inputs = build("scout")
    model.save_pretrained(tmp_path / "base")
    train_lora(str(tmp_path / "base"), str(tmp_path / "one"))
    torchrun(2, "--checkpoint", str(tmp_path / "base"), "--train", str(tmp_path / "two"), "--train-layout", layout)
    one, two = (json.loads((tmp_path / run / "losses.json").read_text()) for run in ("one", "two"))
    assert len(one) == TRAIN_STEPS and max(abs(a - b) for a, b in zip(one, two)) <= 1e-4, (one, two)

    from peft import PeftModel

    logits = []
    for run in ("one", "two"):
        adapted = PeftModel.from_pretrained(Llama4ForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / run)
        with torch.no_grad():
            logits.append(adapted.eval()(**inputs).logits)
    with torch.no_grad():
        assert (logits[0] - model(**inputs).logits).abs().max() > 1e-2  # training moved the adapter
    # Ten steps at this learning rate amplify the fp32 reduction-order differences of the two runs (loss gap
    # 0 at step 1, ~4e-5 at step 10): the adapters' logits differ by ~5e-4 (measured).
    assert torch.allclose(logits[0], logits[1], atol=1e-3), (logits[0] - logits[1]).abs().max()


def add_expert_lora(model: torch.nn.Module, targets: tuple[str, ...] = ("experts", "q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    torch.manual_seed(0)  # the same adapter initialisation everywhere
    return get_peft_model(model, lora)


def train_lora(checkpoint: str, output: str, layout: str = FSDP_ONLY) -> None:
    """Per-expert LoRA (and LoRA on q/v) trained with Trainer for ``TRAIN_STEPS`` steps of a global batch of 4;
    with ``WORLD_SIZE > 1`` the base model is sharded at load under ``layout`` (FSDP2, with expert parallel for
    ``fsdp_ep``). Writes the adapter and ``losses.json``."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", 1))
    model = load(checkpoint, layout, world) if world > 1 else AutoModelForCausalLM.from_pretrained(checkpoint)
    model = add_expert_lora(model)
    samples = torch.randint(3, VOCAB, (16, 12), generator=torch.Generator().manual_seed(3))
    arguments = TrainingArguments(
        output_dir=output,
        per_device_train_batch_size=4 // world,
        max_steps=TRAIN_STEPS,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=[{"input_ids": s, "labels": s} for s in samples])
    trainer.train()
    if world > 1:
        assert type(trainer.model.base_model.model.model.layers[0]).__name__.startswith("FSDP"), "not FSDP2-sharded"
    trainer.save_model(output)
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        (Path(output) / "losses.json").write_text(json.dumps(losses))


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int4", "fp8"])
def test_quantized_experts_under_expert_parallel_keep_their_experts_and_match_one_process(tmp_path, quantization):
    """An int4 or FP8 checkpoint under ``DistributedConfig(tp_size=2, ep_size=2)`` and ``(fsdp_size=2, ep_size=2)``,
    FP8 also under ``tp_plan="auto"``: each rank holds the quantized tensors of its own experts only (1/2 of the bytes;
    under tensor parallel FP8's per-output-column ``down_proj_scale`` is whole), and gives one process's logits and
    greedy tokens. Quantized on load under expert parallel too; int4 also under FSDP alone (``fsdp_size=2``), saved
    and quantized on load, where every rank holds every expert."""
    quantized, inputs = quantized_checkpoint(tmp_path, quantization)
    save_expected(quantized, inputs, tmp_path / quantization)
    modes = ("tp", "tp_ep", "fsdp_ep") if quantization == "fp8" else ("tp_ep", "fsdp_ep", FSDP_ONLY)
    torchrun(2, "--checkpoint", str(tmp_path / quantization), "--modes", *modes)
    save_expected(quantized, inputs, tmp_path / "bf16")
    on_load = ("--int4-group-size", "8") if quantization == "int4" else ("--fp8-on-load",)
    on_load_modes = ("tp_ep", "fsdp_ep", FSDP_ONLY) if quantization == "int4" else ("tp_ep", "fsdp_ep")
    torchrun(2, "--checkpoint", str(tmp_path / "bf16"), "--modes", *on_load_modes, *on_load)


def quantized_checkpoint(path: Path, quantization: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The scout model saved in bf16 under ``path / "bf16"``, quantized on load (int4 groups of 8, or FP8 routed
    experts as in Meta's FP8 checkpoints) and saved under ``path / quantization``; the quantized model and inputs."""
    from transformers import FbgemmFp8Config

    from modeling_llama4 import Llama4Int4Config

    model, inputs = build("scout")
    model.save_pretrained(path / "bf16")
    int4 = Llama4Int4Config(group_size=8)
    config = int4 if quantization == "int4" else FbgemmFp8Config(modules_to_not_convert=FP8_EXPERTS_ONLY)
    quantized = Llama4ForCausalLM.from_pretrained(path / "bf16", quantization_config=config).eval()
    quantized.save_pretrained(path / quantization)
    return quantized, inputs


@pytest.mark.slow
def test_experts_the_plans_cannot_shard_raise_instead_of_computing_wrong_outputs(tmp_path):
    """Tensor parallel shards quantized routed experts, not quantized linear layers (FP8 attention, an int4 shared
    expert), whose weights its Linear rules would miss; QLoRA under expert parallel with data parallel, whose adapter
    gradients follow the FSDP2 reduction of the experts' weights, which int4 experts do not have: clear errors naming
    what to use instead."""
    from transformers import FbgemmFp8Config

    model, _ = build("scout")
    model.save_pretrained(tmp_path / "bf16")
    fp8 = Llama4ForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=FbgemmFp8Config())
    fp8.save_pretrained(tmp_path / "fp8")
    torchrun(2, "--checkpoint", str(tmp_path / "fp8"), "--modes", "tp", "--expect-error", "modules_to_not_convert")
    expected = "FP8 while loading under tensor parallel"  # down_proj's scales span the dim tensor parallel splits
    torchrun(2, "--checkpoint", str(tmp_path / "bf16"), "--modes", "tp", "--fp8-on-load", "--expect-error", expected)
    expected = "quantized experts keep no weights for FSDP2"
    int4 = ("--int4-group-size", "8")
    torchrun(
        2, "--checkpoint", str(tmp_path / "bf16"), "--modes", "fsdp_ep", *int4, "--lora", "--expect-error", expected
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("base", "layout", "world"),
    [
        ("bf16", "tp_ep", 2),
        ("int4", "tp_ep", 2),
        ("bf16", "fsdp_ep", 2),
        ("bf16", EXPERT_COPIES, 4),
        ("bf16", "tp_fsdp_ep", 4),
    ],
)
def test_expert_lora_training_step_under_expert_parallel_matches_one_process(tmp_path, base, layout, world):
    """Per-expert LoRA (QLoRA on the int4 base) added after an expert-parallel load, ``DistributedConfig(tp_size=2,
    ep_size=2)`` (the ranks share a batch), ``(fsdp_size=2, ep_size=2)`` (a batch per rank), ``(fsdp_size=4,
    ep_size=2)`` (two copies of each expert) or ``(tp_size=2, fsdp_size=2, ep_size=4)`` (two batches over four expert
    ranks): each rank holds the adapters of its own experts only, initialised as one process initialises them, and the
    loss and adapter gradients of a training step (tokens exchanged all-to-all) equal one process's. Under data
    parallel every rank trains on the one-process batch, and the experts' adapter gradients, computed from the tokens
    of several batches, are averaged over the batches."""
    model, _ = build("scout")
    if base == "int4":
        model, _ = quantized_checkpoint(tmp_path / "source", "int4")
    model.save_pretrained(tmp_path)
    torch.save(expert_lora_step(model), tmp_path / "lora_step.pt")
    torchrun(world, "--checkpoint", str(tmp_path), "--lora-step", layout)


# ---------------------------------------------------------------------------------------------- rank side


def routed_expert_bytes(model: torch.nn.Module, pattern: str = r"\.experts\.") -> int:
    """Bytes of the routed experts' parameters and buffers (int4, FP8) held on this rank, of names matching
    ``pattern``."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    local = [t.to_local() if hasattr(t, "to_local") else t for name, t in tensors if re.search(pattern, name)]
    return sum(t.numel() * t.element_size() for t in local)


def load(
    checkpoint: str, layout: str, world: int, int4_group_size: int | None = None, fp8: bool = False
) -> torch.nn.Module:
    """The model as a user loads it under each layout, quantized on load to int4 with ``int4_group_size``, or with
    ``fp8`` its routed experts to FP8."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        DistributedConfig,
        FbgemmFp8Config,
    )

    from modeling_llama4 import Llama4Int4Config

    multimodal = hasattr(AutoConfig.from_pretrained(checkpoint), "vision_config")
    auto_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    quantization = {"quantization_config": Llama4Int4Config(group_size=int4_group_size)} if int4_group_size else {}
    if fp8:
        quantization = {"quantization_config": FbgemmFp8Config(modules_to_not_convert=FP8_EXPERTS_ONLY)}
    if layout == "tp":
        return auto_class.from_pretrained(checkpoint, tp_plan="auto", **quantization).eval()
    sizes = {  # with fsdp, ranks hold their own batches: the experts exchange tokens all-to-all
        "tp_ep": dict(tp_size=world, ep_size=world),
        "fsdp_ep": dict(fsdp_size=world, ep_size=world),
        "tp_fsdp_ep": dict(tp_size=2, fsdp_size=world // 2, ep_size=world),
        FSDP_ONLY: dict(fsdp_size=world),
        TP_EP_ALL_REDUCE: dict(tp_size=world, ep_size=world, ep_implementation="all_reduce"),
        EXPERT_COPIES: dict(fsdp_size=world, ep_size=2),
    }[layout]
    config = DistributedConfig(**sizes)
    return auto_class.from_pretrained(checkpoint, distributed_config=config, **quantization).eval()


def check_rank(checkpoint: str, layout: str, int4_group_size: int | None = None, fp8: bool = False) -> None:
    """This rank's share of the routed experts, logits and greedy tokens under ``layout``, against one process."""
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    model = load(checkpoint, layout, world, int4_group_size, fp8)
    expected = torch.load(Path(checkpoint) / "expected.pt")
    local, total = routed_expert_bytes(model), expected["expert_bytes"]
    whole = 0  # bytes that every rank holds whole
    if layout == "tp":
        whole = routed_expert_bytes(model, r"\.experts\.down_proj_scale$")  # FP8: see parallel.py
    elif layout == FSDP_ONLY:
        whole = local  # quantized experts are buffers, which FSDP2 keeps whole
    assert (local - whole) * world == total - whole, f"rank holds {local} of {total} routed-expert bytes at {world}"
    with torch.no_grad():
        logits = model(**expected["inputs"]).logits
        tokens = model.generate(**expected["inputs"], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    error = (logits - expected["logits"]).abs().max().item()
    assert error <= ATOL, f"{layout} world {world}: logits differ from one process by {error:.2e}"
    assert torch.equal(tokens, expected["tokens"]), f"{layout} world {world}: greedy tokens differ"
    dist.barrier()


def check_lora_step(checkpoint: str, layout: str) -> None:
    """This rank's loss and adapter gradients of one expert-LoRA step under ``layout``, against one process; under
    tensor parallel ``state_dict`` gathers the experts' sliced factors into the one-process adapters."""
    model = load(checkpoint, layout, int(os.environ["WORLD_SIZE"]))
    loss, grads = expert_lora_step(model)
    assert_step_matches(loss, grads, *torch.load(Path(checkpoint) / "lora_step.pt"), layout=layout)
    if layout == "tp":
        adapters = {name: t for name, t in model.state_dict().items() if "lora_" in name}  # gathered on every rank
        one_process = add_expert_lora(Llama4ForCausalLM.from_pretrained(checkpoint), targets=("experts",))
        initial = one_process.get_base_model().state_dict()
        assert adapters and all(torch.equal(tensor, initial[name]) for name, tensor in adapters.items())


def check_adapter_step(checkpoint: str, adapter: str) -> None:
    """One step of a saved adapter loaded onto a ``tp_plan="auto"`` model, against one process; then save it back."""
    from peft import PeftModel

    rank = int(os.environ["RANK"])
    model = PeftModel.from_pretrained(
        load(checkpoint, "tp", int(os.environ["WORLD_SIZE"])), adapter, is_trainable=True
    )
    loss = model.train()(input_ids=prompt_ids(), labels=prompt_ids()).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert_step_matches(loss.item(), grads, *torch.load(Path(checkpoint) / "lora_step.pt"))
    model.save_pretrained(Path(checkpoint) / "resaved", is_main_process=rank == 0)  # every rank gathers


def assert_step_matches(
    loss: float, grads: dict, expected_loss: float, expected_grads: dict, layout: str = "tp"
) -> None:
    """Loss and adapter gradients of this rank against one process's. Tensor parallel: the experts' factors along
    their hidden dim I are this rank's slices (1/W of them, and of their gradients), PEFT's q/v ``lora_B`` DTensors
    sharded by head. Expert parallel: the adapters of this rank's experts (a slice by expert, 1/ep_size of them)."""
    from modeling_llama4.parallel import SHARDED_LORA_FACTORS

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert abs(loss - expected_loss) <= ATOL, (loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        expected = expected_grads[name]
        if layout != "tp" and ".experts." in name:
            ep_mesh, grad = grad.device_mesh, grad.to_local()
            assert grad.shape[0] * ep_mesh.size() == expected.shape[0], f"{name}: {grad.shape[0]} experts on a rank"
            expected = expected.chunk(ep_mesh.size())[ep_mesh.get_local_rank()]
        elif (dim := SHARDED_LORA_FACTORS.get(name.split(".")[-2])) is not None:
            expected = expected.chunk(world, dim=dim)[rank]
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        assert grad.shape == expected.shape, f"{name}: rank {rank} holds {grad.shape}, expected {expected.shape}"
        error = (grad - expected).abs().max().item()
        assert error <= ATOL, f"{name}: gradient differs from one process by {error:.2e}"


def resident_file_bytes(path: Path) -> int:
    """Bytes of the file at ``path`` mapped into this process and resident: its pages counted in our RSS."""
    total, mapped_file = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping: address range, permissions, offset, device, inode[, path]
            mapped_file = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and mapped_file == str(path.resolve()):
            total += int(fields[1]) * 1024
    return total


def check_expert_slices(checkpoint: str) -> None:
    """This rank's routed experts after a ``tp_plan="auto"`` load, against the slices of the file's tensors."""
    from safetensors.torch import load_file

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model = load(checkpoint, "tp", world)
    weights = Path(checkpoint) / "model.safetensors"
    experts = {name: p.to_local() for name, p in model.named_parameters() if ".experts." in name}
    mapped, expert_bytes = resident_file_bytes(weights), sum(p.numel() * p.element_size() for p in experts.values())
    # Small tensors read whole keep the memory map: the kernel maps up to 64 KiB around each page they fault in.
    assert mapped < expert_bytes / 4, f"{mapped} bytes of the checkpoint mapped into rank {rank} ({expert_bytes=})"
    full = load_file(weights)
    for name, local in experts.items():
        if name.endswith("gate_up_proj"):  # [E, D, 2I]: this rank's gate and up columns
            expected = torch.cat([half.chunk(world, dim=-1)[rank] for half in full[name].chunk(2, dim=-1)], dim=-1)
        else:  # down_proj [E, I, D]: this rank's rows
            expected = full[name].chunk(world, dim=1)[rank]
        assert torch.equal(local, expected), f"{name} on rank {rank} is not its slice of the checkpoint's tensor"


# ------------------------------------------------- rank side: one all-reduce per MoE layer, FP8 LoRA, merging


def check_all_reduces(checkpoint: str, layout: str) -> None:
    """Each MoE layer's forward under ``layout`` calls ``torch.distributed.all_reduce`` exactly once: the shared
    expert's and the routed experts' partial outputs are summed together. At inference; under ``TP_EP_ALL_REDUCE``
    in a training forward (gradients on), which runs the same all-reduce combination of the experts."""
    from unittest import mock

    model = load(checkpoint, layout, int(os.environ["WORLD_SIZE"]))
    training = layout == TP_EP_ALL_REDUCE
    moe_layers = [module for module in model.modules() if hasattr(module, "shared_expert")]
    counts = []  # all-reduces in each MoE layer's forward

    def start(module: torch.nn.Module, args: tuple) -> None:
        counts.append(-all_reduce.call_count)

    def stop(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        counts[-1] += all_reduce.call_count

    for moe in moe_layers:
        moe.register_forward_pre_hook(start)
        moe.register_forward_hook(stop)
    with mock.patch.object(torch.distributed, "all_reduce", wraps=torch.distributed.all_reduce) as all_reduce:
        with torch.set_grad_enabled(training):
            model.train(training)(input_ids=prompt_ids())
    # every MoE layer ran (once per chunk of the prompt), each with one all-reduce
    assert len(counts) % len(moe_layers) == 0 and set(counts) == {1}, f"{layout}: all-reduces per MoE call {counts}"


def check_merge(checkpoint: str, layout: str) -> None:
    """Per-expert LoRA added under ``layout`` (each rank: its experts' adapters, or its slices of them) and merged into
    the experts: ``merge_adapter`` before any forward, ``unmerge_adapter`` and ``merge_and_unload`` after one (tensor
    parallel slices the adapters at the first forward) give the logits of one process's merged model, of the adapted
    model, and its greedy tokens."""
    model = add_expert_lora(load(checkpoint, layout, int(os.environ["WORLD_SIZE"])), targets=("experts",))
    expected = torch.load(Path(checkpoint) / "merged.pt")

    def assert_logits(expected_logits: torch.Tensor, what: str) -> None:
        with torch.no_grad():
            error = (model(**expected["inputs"]).logits - expected_logits).abs().max().item()
        assert error <= ATOL, f"{what} under {layout}: logits differ from one process's merge by {error:.2e}"

    model.merge_adapter()
    assert_logits(expected["logits"], "merged before a forward")
    model.unmerge_adapter()
    assert_logits(expected["logits"], "the adapters unmerged")  # the same model, adapters not merged
    model = model.merge_and_unload()
    assert not any("lora_" in name for name, _ in model.named_parameters()), "adapters left after the merge"
    assert_logits(expected["logits"], "merged and unloaded")
    with torch.no_grad():
        tokens = model.generate(**expected["inputs"], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected["tokens"]), f"merged under {layout}: greedy tokens differ"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--modes", nargs="+", choices=(*LAYOUTS, FSDP_ONLY, TP_EP_ALL_REDUCE), default=[])
    parser.add_argument("--expect-error", help="loading and a forward must raise an error containing this text")
    parser.add_argument("--at-load", action="store_true", help="with --expect-error: the load itself must raise")
    parser.add_argument("--lora", action="store_true", help="add per-expert LoRA after loading")
    parser.add_argument("--int4-group-size", type=int, help="quantize the experts to int4 on load, in groups of this")
    parser.add_argument("--fp8-on-load", action="store_true", help="quantize the routed experts to FP8 on load")
    parser.add_argument("--train", metavar="OUTPUT", help="train a LoRA adapter into OUTPUT instead")
    parser.add_argument("--train-layout", choices=(FSDP_ONLY, "fsdp_ep"), default=FSDP_ONLY, help="layout of --train")
    parser.add_argument(
        "--lora-step",
        nargs="?",
        const="tp",
        choices=(*LAYOUTS, TP_EP_ALL_REDUCE, EXPERT_COPIES),
        help="check one expert-LoRA step under this instead",
    )
    parser.add_argument(
        "--all-reduces", nargs="+", default=[], metavar="LAYOUT", help="count the all-reduces of each MoE layer"
    )
    parser.add_argument("--merge", nargs="+", default=[], metavar="LAYOUT", help="check merging expert LoRA")
    parser.add_argument("--expert-slices", action="store_true", help="check the expert slices a tp_plan load reads")
    parser.add_argument("--adapter-step", metavar="ADAPTER", help="check one step of this adapter under tp_plan")
    arguments = parser.parse_args()
    if arguments.train:
        train_lora(arguments.checkpoint, arguments.train, arguments.train_layout)
    if arguments.lora_step:
        check_lora_step(arguments.checkpoint, arguments.lora_step)
    if arguments.expert_slices:
        check_expert_slices(arguments.checkpoint)
    if arguments.adapter_step:
        check_adapter_step(arguments.checkpoint, arguments.adapter_step)
    for layout in arguments.all_reduces:
        check_all_reduces(arguments.checkpoint, layout)
    for layout in arguments.merge:
        check_merge(arguments.checkpoint, layout)
    for layout in arguments.modes:
        if arguments.expect_error:
            with pytest.raises((ValueError, NotImplementedError), match=arguments.expect_error):
                world = int(os.environ["WORLD_SIZE"])
                model = load(arguments.checkpoint, layout, world, arguments.int4_group_size, arguments.fp8_on_load)
                assert not arguments.at_load, f"{layout}: the load did not raise"
                if arguments.lora:
                    model = add_expert_lora(model, targets=("experts",))
                model(prompt_ids())
        else:
            check_rank(arguments.checkpoint, layout, arguments.int4_group_size, arguments.fp8_on_load)
    if torch.distributed.is_initialized():  # a clean exit: no collective left in flight on the other ranks
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_load_reads_each_rank_slices_of_the_experts_from_the_file(tmp_path):
    """``tp_plan="auto"``: each rank's ``gate_up_proj [E, D, 2I/W]`` is its gate and up slices of the file's tensor,
    its ``down_proj [E, I/W, D]`` the matching rows, and the experts' pages are not mapped into the rank (read whole,
    through the memory map, the inner-dim slices of gate_up_proj would map all of them)."""
    torch.manual_seed(0)
    config = text_config_from_meta(dict(CONFIGS["scout"], dim=128, ffn_exp=16.0))  # experts of 33 MiB: pages count
    Llama4ForCausalLM(config).save_pretrained(tmp_path)
    torchrun(2, "--checkpoint", str(tmp_path), "--expert-slices")


def test_rank_slices_read_what_the_memory_mapped_slices_hold(tmp_path):
    """``RankSlice`` (file reads at the tensor's offsets) against safetensors' own slicing, on the index shapes the
    loader uses: whole tensors, slices of leading dims, of an inner dim alone, empty ones, several dtypes."""
    from types import SimpleNamespace

    from safetensors import safe_open
    from safetensors.torch import save_file

    from modeling_llama4.sharded_loading import rank_state_dict

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "experts": torch.randn(4, 6, 10, generator=generator).to(torch.bfloat16),
        "packed": torch.randint(0, 255, (3, 5, 8), generator=generator, dtype=torch.uint8),
        "norm": torch.randn(9, generator=generator),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    sharded_load = SimpleNamespace(device_mesh="mesh", disable_mmap=False)
    files = [str(tmp_path / "model.safetensors")]
    with rank_state_dict(None, files, sharded_load) as rank_slices, safe_open(files[0], "pt") as mapped:
        for name, tensor in tensors.items():
            indices = [..., (slice(None),) * tensor.ndim, (slice(2, 2),), (slice(1, 3),)]
            indices += [(slice(None),) * (tensor.ndim - 1) + (slice(start, start + 2),) for start in (0, 3)]
            indices += [(slice(1, 2), slice(None), slice(2, 5))] if tensor.ndim == 3 else []
            for index in indices:
                expected = mapped.get_slice(name)[index]
                assert torch.equal(rank_slices[name][index], expected), (name, index)
            assert rank_slices[name].get_shape() == list(tensor.shape)


@pytest.mark.slow
def test_adapter_on_attention_and_experts_loaded_under_tensor_parallel_matches_one_process(tmp_path):
    """A LoRA adapter on the experts and on ``q_proj``/``v_proj``, saved by one process and loaded trainable onto a
    ``tp_plan="auto"`` model: one step gives one process's loss and gradients (PEFT shards the q/v adapters with their
    heads, ``shard_expert_lora`` the experts' ones with their I slice), and saving from every rank writes the adapter
    back unchanged."""
    from safetensors.torch import load_file

    model, _ = build("scout")
    model.save_pretrained(tmp_path)
    adapted = add_expert_lora(model.train())
    adapted.save_pretrained(tmp_path / "adapter")
    loss = adapted(input_ids=prompt_ids(), labels=prompt_ids()).loss
    loss.backward()
    grads = {name: p.grad for name, p in adapted.named_parameters() if p.requires_grad}
    torch.save((loss.item(), grads), tmp_path / "lora_step.pt")
    torchrun(2, "--checkpoint", str(tmp_path), "--adapter-step", str(tmp_path / "adapter"))
    saved, resaved = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("adapter", "resaved"))
    assert saved.keys() == resaved.keys() and all(torch.equal(saved[name], resaved[name]) for name in saved)


# ------------------------------------------------------- tp+ep: one all-reduce per MoE layer; FP8 LoRA; merging


@pytest.mark.slow
def test_moe_layers_reduce_once_under_tensor_and_expert_parallel(tmp_path):
    """``tp_plan="auto"`` and ``DistributedConfig(tp_size=2, ep_size=2)``: each MoE layer's forward calls one
    all-reduce (the tensor-parallel shared expert's partial output added to the routed experts' before their
    all-reduce), at inference and, with ``ep_implementation="all_reduce"``, in training, where one expert-LoRA step
    gives one process's loss and gradients (the input gradients summed over the ranks); logits and greedy tokens
    equal one process's."""
    model, inputs = build("scout")
    model.save_pretrained(tmp_path)
    save_expected(model, inputs, tmp_path)
    torch.save(expert_lora_step(model), tmp_path / "lora_step.pt")
    layouts = ("tp", "tp_ep", TP_EP_ALL_REDUCE)
    torchrun(2, "--checkpoint", str(tmp_path), "--all-reduces", *layouts, "--modes", "tp_ep", TP_EP_ALL_REDUCE)
    torchrun(2, "--checkpoint", str(tmp_path), "--lora-step", TP_EP_ALL_REDUCE)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp", "tp_ep"])
def test_fp8_expert_lora_training_step_matches_one_process(tmp_path, layout):
    """Per-expert LoRA on FP8 routed experts (float32 adapters on frozen FP8 buffers) added after a ``tp_plan="auto"``
    or ``DistributedConfig(tp_size=2, ep_size=2)`` load: the loss and adapter gradients of a training step equal one
    process's."""
    model, _ = quantized_checkpoint(tmp_path / "source", "fp8")
    model.save_pretrained(tmp_path)
    torch.save(expert_lora_step(model), tmp_path / "lora_step.pt")
    torchrun(2, "--checkpoint", str(tmp_path), "--lora-step", layout)


@pytest.mark.slow
def test_merging_expert_lora_under_tensor_and_expert_parallel_matches_one_process(tmp_path):
    """``merge_and_unload`` of per-expert LoRA under ``DistributedConfig(tp_size=2, ep_size=2)`` merges each rank's
    adapters into its own experts, under ``tp_plan="auto"`` its slices of them into its slices of the experts: the
    logits and greedy tokens of one process's merged model."""
    model, inputs = build("scout")
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    merged = add_expert_lora(model, targets=("experts",)).merge_and_unload()
    with torch.no_grad():
        logits = merged(**inputs).logits
        tokens = merged.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert (logits - base_logits).abs().max() > 1e-2  # the adapters (random A and B) change the model
    torch.save({"inputs": inputs, "logits": logits, "tokens": tokens}, tmp_path / "merged.pt")
    torchrun(2, "--checkpoint", str(tmp_path), "--merge", "tp", "tp_ep", FSDP_ONLY)
