"""``llama4-convert --quantize int4|fp8``: native shards straight to an int4 or FP8 checkpoint.

The int4 checkpoint must load as is and give the logits of the unquantized conversion quantized on load
(``from_pretrained(..., quantization_config=Llama4Int4Config(group_size=G))``), bit for bit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from test_conversion import (
    DENSE_ARGS,
    TEXT_ARGS,
    VISION_ARGS,
    hf_multimodal_logits,
    image_ids,
    make_reference,
    native_state,
    pixels,
    tiny_tokenizer_model,
    tokens,
    write_native,
)
from transformers import FbgemmFp8Config

import modeling_llama4  # noqa: F401  (registers the model classes and the int4 quantizer)
from conversion import ConversionError, cli
from conversion.convert import convert_native_to_hf, write_weights
from conversion.native import NativeCheckpoint
from conversion.params import load_params
from conversion.quantize import Int4Experts
from conversion.writer import INDEX_FILE
from modeling_llama4.quantization_int4 import Llama4Int4Config
from modeling_llama4.quantized_experts import (
    Llama4Fp8Linear,
    Llama4Fp8TextExperts,
    Llama4Int4Linear,
    Llama4Int4TextExperts,
)

GROUP = 16  # divides the tiny hidden size (64) and expert size (48)
AUTO_CLASSES = {"text": transformers.AutoModelForCausalLM, "vision": transformers.AutoModelForImageTextToText}
_DENSE_EXPERTS = re.compile(r".*feed_forward\.experts\.(gate_up_proj|down_proj)")


@pytest.fixture(scope="module")
def natives(tmp_path_factory) -> dict[str, Path]:
    """Read-only native checkpoints (fused naming, model-parallel degree 2) of MoE text, vision and dense models."""
    root = tmp_path_factory.mktemp("native")
    tokenizer = tiny_tokenizer_model(root / "tokenizer.model")
    models = {"text": TEXT_ARGS, "vision": VISION_ARGS, "dense": DENSE_ARGS}
    return {
        name: write_native(root / name, args, native_state(make_reference(args, seed=i)), tokenizer, 2, fused=True)
        for i, (name, args) in enumerate(models.items())
    }


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    out = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(directory / file, "pt") as f:
            out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


@pytest.mark.parametrize("model, method", [("text", "int4"), ("vision", "int4"), ("text", "int4_mixed")])
def test_int4_checkpoint_equals_quantizing_on_load(model, method, natives, tmp_path):
    quantized_dir = convert_native_to_hf(natives[model], tmp_path / "int4", quantize=method, group_size=GROUP)
    dense_dir = convert_native_to_hf(natives[model], tmp_path / "bf16")
    auto = AUTO_CLASSES[model]
    loaded, info = auto.from_pretrained(quantized_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    expected = auto.from_pretrained(
        dense_dir,
        dtype=torch.float32,
        quantization_config=Llama4Int4Config(group_size=GROUP, quantize_shared_expert=method == "int4_mixed"),
    )
    loaded, expected = loaded.eval(), expected.eval()
    experts = [module for module in loaded.modules() if isinstance(module, Llama4Int4TextExperts)]
    assert len(experts) == 2 and all(module.group_size == GROUP for module in experts)
    assert loaded.config.quantization_config.group_size == GROUP
    shared = [module for module in loaded.modules() if isinstance(module, Llama4Int4Linear)]
    assert len(shared) == (6 if method == "int4_mixed" else 0)  # 2 MoE layers × gate, up, down
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected(input_ids=ids).logits)
    if model == "vision":
        image_token = loaded.config.image_token_index
        ids, tiles = image_ids(image_token, count=8), pixels()
        assert torch.equal(hf_multimodal_logits(loaded, ids, tiles), hf_multimodal_logits(expected, ids, tiles))


def test_files_hold_int4_experts_only(natives, tmp_path):
    out = convert_native_to_hf(natives["vision"], tmp_path / "hf", quantize="int4", group_size=GROUP)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "llama4_int4",
        "bits": 4,
        "group_size": GROUP,
        "quantize_shared_expert": False,
    }
    weights = tensors(out)
    assert not [name for name in weights if _DENSE_EXPERTS.fullmatch(name)]
    prefix = "language_model.model.layers.1.feed_forward.experts."
    experts, hidden, inner = 4, 64, 48
    expected = {
        "gate_up_proj_qweight": ((experts, hidden // 2, 2 * inner), torch.uint8),
        "gate_up_proj_scales": ((experts, hidden // GROUP, 2 * inner), torch.bfloat16),
        "down_proj_qweight": ((experts, inner // 2, hidden), torch.uint8),
        "down_proj_scales": ((experts, inner // GROUP, hidden), torch.bfloat16),
    }
    for name, (shape, dtype) in expected.items():
        assert (tuple(weights[prefix + name].shape), weights[prefix + name].dtype) == (shape, dtype), name
    assert sum(name.endswith("_qweight") for name in weights) == 4  # 2 MoE layers × 2 projections
    shared = weights["language_model.model.layers.1.feed_forward.shared_expert.gate_proj.weight"]
    assert shared.dtype == torch.bfloat16


def test_experts_streamed_in_small_blocks_give_the_same_tensors(natives, tmp_path):
    """Blocks of one expert (a tiny ``chunk_bytes``), as on a big model, quantize as the whole tensor does."""
    directory = natives["text"]
    checkpoint = NativeCheckpoint(directory, load_params(directory))
    whole, blocks = tmp_path / "whole", tmp_path / "blocks"
    for out, chunk_bytes in ((whole, 2**30), (blocks, 1)):
        out.mkdir()
        write_weights(checkpoint, out, torch.bfloat16, 2**30, chunk_bytes=chunk_bytes, quantizer=Int4Experts(GROUP))
    expected, got = tensors(whole), tensors(blocks)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize("group_size", [32, 12, 7, 0])
def test_bad_group_size_fails_before_writing(group_size, natives, tmp_path):
    with pytest.raises(ConversionError, match=r"--group-size: .*dividing the (hidden size|experts' hidden size)"):
        convert_native_to_hf(natives["text"], tmp_path / "hf", quantize="int4", group_size=group_size)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_dense_model_has_nothing_to_quantize(natives, tmp_path):
    with pytest.raises(ConversionError, match="no MoE layers"):
        convert_native_to_hf(natives["dense"], tmp_path / "hf", quantize="int4", group_size=GROUP)
    assert not (tmp_path / "hf").exists()


def test_cli(natives, tmp_path, caplog):
    args = ["--input-dir", str(natives["text"]), "--quantize", "int4"]
    assert cli.main([*args, "--output-dir", str(tmp_path / "bad"), "--group-size", "32"]) == 2
    assert "experts' hidden size (48)" in caplog.text and not (tmp_path / "bad").exists()
    assert cli.main([*args, "--output-dir", str(tmp_path / "hf"), "--group-size", str(GROUP)]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["group_size"] == GROUP
    assert cli.main([*args, "--output-dir", str(tmp_path / "v"), "--verify"]) == 2
    assert "without --quantize" in caplog.text and not (tmp_path / "v").exists()


# --- --quantize fp8: Meta's FP8 layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["text", "vision"])
def test_fp8_checkpoint_equals_quantizing_on_load(model, natives, tmp_path):
    """The converter's FP8 layout: routed experts e4m3 with per-output-channel fp32 scales, every other linear layer
    listed in ``modules_to_not_convert``; it loads as is and equals the bf16 conversion quantized on load."""
    fp8_dir = convert_native_to_hf(natives[model], tmp_path / "fp8", quantize="fp8")
    dense_dir = convert_native_to_hf(natives[model], tmp_path / "bf16")
    quantization_config = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    assert quantization_config["quant_method"] == "fbgemm_fp8"
    prefix = "language_model." if model == "vision" else ""
    weights = tensors(fp8_dir)
    experts = f"{prefix}model.layers.1.feed_forward.experts."
    expected = {
        "gate_up_proj": ((4, 64, 96), torch.float8_e4m3fn),
        "gate_up_proj_scale": ((4, 1, 96), torch.float32),
        "down_proj": ((4, 48, 64), torch.float8_e4m3fn),
        "down_proj_scale": ((4, 64, 1), torch.float32),
    }
    for name, (shape, dtype) in expected.items():
        assert (tuple(weights[experts + name].shape), weights[experts + name].dtype) == (shape, dtype), name
    assert weights[f"{prefix}model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16

    auto = AUTO_CLASSES[model]
    loaded, info = auto.from_pretrained(fp8_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not [m for m in loaded.modules() if isinstance(m, Llama4Fp8Linear)]
    assert len([m for m in loaded.modules() if isinstance(m, Llama4Fp8TextExperts)]) == 2
    on_load = FbgemmFp8Config(modules_to_not_convert=quantization_config["modules_to_not_convert"])
    expected_model = auto.from_pretrained(dense_dir, dtype=torch.float32, quantization_config=on_load)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, expected_model.eval()(input_ids=ids).logits)


def test_cli_fp8(natives, tmp_path):
    args = ["--input-dir", str(natives["text"]), "--output-dir", str(tmp_path / "hf"), "--quantize", "fp8"]
    assert cli.main(args) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "fbgemm_fp8"
    )
