"""FSDP2 as users set it up: the units ``DistributedConfig(fsdp_size=N)`` wraps (under ``torchrun`` on CPU/gloo), and
``examples/accelerate_fsdp2.yaml`` as ``accelerate launch`` reads it.

Training under FSDP2, alone and with expert parallel, is tested in ``test_parallel.py``
(``test_fsdp2_lora_training_matches_one_process``). ``accelerate launch`` itself cannot run FSDP on CPU (accelerate
1.15): ``AcceleratorState`` turns FSDP on only for accelerator process groups (``MULTI_GPU``, ``MULTI_XPU``, ...);
CPU processes are ``MULTI_CPU`` with ``use_cpu`` (DDP over gloo) and, without it, not distributed at all (each
trains alone). So the config is checked as accelerate parses and applies it instead.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from test_parallel import FSDP_ONLY, add_expert_lora, build, load, torchrun

from modeling_llama4 import Llama4ForCausalLM

ACCELERATE_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate_fsdp2.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scout", "multimodal"])
def test_fsdp_plan_wraps_each_decoder_layer_with_rules_that_all_apply(tmp_path, name):
    """``DistributedConfig(fsdp_size=2)``, alone and with ``ep_size=2``: FSDP2 units are the embedding, each decoder
    layer, the final norm (with expert parallel each layer's experts too) and the root, and transformers reports no
    plan rule matching nothing (it did for the config's base-model rules, which ``Llama4ForCausalLM`` got unprefixed)."""
    model, _ = build(name)
    model.save_pretrained(tmp_path)
    torchrun(2, "--checkpoint", str(tmp_path), script=__file__)


@pytest.mark.slow
def test_multimodal_model_trains_under_fsdp_when_only_some_ranks_have_images(tmp_path):
    """``DistributedConfig(fsdp_size=2)`` on the multimodal model, LoRA training steps where rank 0's batch holds
    images and rank 1's does not: the vision tower is in the root unit, gathered by every rank on every forward (with
    units of its own the ranks' all-gathers would not match)."""
    model, _ = build("multimodal")
    model.save_pretrained(tmp_path)
    torchrun(2, "--checkpoint", str(tmp_path), "--mixed-batches", script=__file__)


def test_accelerate_config_is_fsdp2_with_one_unit_per_decoder_layer():
    """``examples/accelerate_fsdp2.yaml`` through ``accelerate launch``'s parsing (2 processes, FSDP version 2,
    transformer-based wrap) and accelerate's FSDP2 wrap policy: on the text and the multimodal model it wraps exactly
    the decoder layers, the text model's ``_no_split_modules`` (the vision tower stays in the root unit, as under
    ``DistributedConfig(fsdp_size=N)``); the config named the vision layers too, which accelerate cannot find in a
    text-only model."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    command = ["--config_file", str(ACCELERATE_CONFIG), "examples/finetune_lora.py", "--model", "tiny"]
    arguments, _, _ = _validate_launch_command(launch_command_parser().parse_args(command))
    assert arguments.use_fsdp and arguments.num_processes == 2
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(arguments)):  # what each launched process reads
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward
    for name in ("scout", "multimodal"):
        model, _ = build(name)
        wraps = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = [module for module in model.modules() if wraps(module)]
        text_model = (model.language_model if name == "multimodal" else model).model
        assert wrapped == list(text_model.layers), (name, wrapped)
        assert {type(layer).__name__ for layer in wrapped} == set(Llama4ForCausalLM._no_split_modules)


# ---------------------------------------------------------------------------------------------- rank side


class RecordedMessages(logging.Handler):
    """The messages logged to the logger it is added to."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_fsdp_units(checkpoint: str) -> None:
    """This rank's FSDP2 units under ``fsdp_size`` and ``fsdp_size`` with ``ep_size``, and no unused plan rule."""
    from torch.distributed.fsdp import FSDPModule

    world = int(os.environ["WORLD_SIZE"])
    recorded = RecordedMessages()
    logging.getLogger("transformers").addHandler(recorded)  # transformers warns on rank 0
    for layout in (FSDP_ONLY, "fsdp_ep"):
        model = load(checkpoint, layout, world)
        prefix = "language_model." if hasattr(model, "language_model") else ""
        layers = [f"{prefix}model.layers.{i}" for i in range(model.config.get_text_config().num_hidden_layers)]
        expected = {"", f"{prefix}model.embed_tokens", f"{prefix}model.norm", *layers}
        if layout == "fsdp_ep":
            expected |= {f"{layer}.feed_forward.experts" for layer in layers}  # every layer is MoE in this config
        units = {name for name, module in model.named_modules() if isinstance(module, FSDPModule)}
        assert units == expected, f"{layout}: FSDP2 units {sorted(units)}"
    unused = [message for message in recorded.messages if "match nothing" in message]
    assert not unused, unused


def train_on_mixed_batches(checkpoint: str) -> None:
    """Two LoRA steps of the FSDP2-sharded multimodal model, on an image prompt on rank 0 and text alone on rank 1."""
    model = add_expert_lora(load(checkpoint, FSDP_ONLY, int(os.environ["WORLD_SIZE"])).train())
    _, inputs = build("multimodal")
    if int(os.environ["RANK"]) == 1:
        inputs = {"input_ids": inputs["input_ids"][:, :3]}  # the tokens before the image
    for _ in range(2):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        assert torch.isfinite(loss), loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--mixed-batches", action="store_true", help="train on batches with and without images")
    arguments = parser.parse_args()
    if arguments.mixed_batches:
        train_on_mixed_batches(arguments.checkpoint)
    else:
        check_fsdp_units(arguments.checkpoint)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
