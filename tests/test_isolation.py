"""``import modeling_llama4`` changes nothing for other models: a process that imports it and uses a tiny random
Mixtral (logits, PEFT LoRA, transformers' ``fbgemm_fp8``) behaves as one that does not. Each side runs the same
script in a fresh process; only the import differs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

SCRIPT = """
    import json, sys
    import torch, transformers
    {package_import}
    from peft import LoraConfig, get_peft_model
    from transformers import FbgemmFp8Config, MixtralConfig, MixtralForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    out = sys.argv[1]
    report = {{}}

    def qualified(obj):
        return f"{{type(obj).__module__}}.{{type(obj).__qualname__}}"

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )
    model = MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {{"base": model(ids).logits}}

    # PEFT on Mixtral: attention, and the experts by their v4 names (PEFT maps them onto the fused parameters).
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "w1", "w2", "w3"], init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, lora).eval()
    with torch.no_grad():
        logits["lora"] = peft_model(ids).logits
    report["lora_modules"] = {{name: qualified(m) for name, m in peft_model.named_modules() if "lora" in qualified(m)}}
    report["lora_custom_modules"] = repr(peft_model.peft_config["default"]._custom_modules)
    report["lora_config"] = peft_model.peft_config["default"].to_dict()
    try:  # the experts as a module: PEFT has no layer for MixtralExperts
        get_peft_model(MixtralForCausalLM(config), LoraConfig(r=4, target_modules=["experts"]))
    except ValueError as error:
        report["experts_module_error"] = str(error)

    # transformers' own fbgemm_fp8: the config class, the quantizer, and a Mixtral FP8 folder on this CPU machine.
    report["fp8_quantizer"] = qualified(AutoHfQuantizer.from_config(FbgemmFp8Config()))
    report["fp8_quantizer_from_dict"] = qualified(AutoHfQuantizer.from_config({{"quant_method": "fbgemm_fp8"}}))
    model.save_pretrained(out + "/fp8")
    saved = json.load(open(out + "/fp8/config.json"))
    saved["quantization_config"] = {{"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}}
    json.dump(saved, open(out + "/fp8/config.json", "w"))
    try:
        transformers.AutoModelForCausalLM.from_pretrained(out + "/fp8")
        report["fp8_load"] = "loaded"
    except Exception as error:  # on a CPU machine transformers refuses fbgemm_fp8 (it needs a GPU)
        report["fp8_load"] = f"{{type(error).__name__}}: {{error}}"

    torch.save(logits, out + "/logits.pt")
    json.dump(report, open(out + "/report.json", "w"), default=sorted)  # sets (target modules) as sorted lists
"""


def run(tmp_path: Path, with_package: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """The script's report and logits in a fresh process, with or without ``import modeling_llama4``."""
    out = tmp_path / ("with" if with_package else "without")
    out.mkdir()
    script = textwrap.dedent(SCRIPT).format(package_import="import modeling_llama4" if with_package else "")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same reduction order in both processes
    result = subprocess.run(
        [sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads((out / "report.json").read_text()), torch.load(out / "logits.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[tuple[dict, dict], tuple[dict, dict]]:
    tmp_path = tmp_path_factory.mktemp("isolation")
    return run(tmp_path, with_package=True), run(tmp_path, with_package=False)


def test_mixtral_logits_and_lora_are_unchanged(runs):
    (report, logits), (expected_report, expected_logits) = runs
    for name in ("base", "lora"):
        assert torch.equal(logits[name], expected_logits[name]), name
    assert not torch.equal(logits["lora"], logits["base"])  # the adapters are not a no-op
    assert report["lora_modules"] == expected_report["lora_modules"]
    assert report["lora_modules"] and not [t for t in report["lora_modules"].values() if "modeling_llama4" in t]
    assert report["lora_custom_modules"] == expected_report["lora_custom_modules"] == "None"
    assert report["lora_config"] == expected_report["lora_config"]
    assert report["experts_module_error"] == expected_report["experts_module_error"]
    assert "MixtralExperts" in report["experts_module_error"]


def test_builtin_fbgemm_fp8_is_transformers_own(runs):
    (report, _), (expected, _) = runs
    builtin = "transformers.quantizers.quantizer_fbgemm_fp8.FbgemmFp8HfQuantizer"
    assert report["fp8_quantizer"] == report["fp8_quantizer_from_dict"] == builtin
    assert report["fp8_load"] == expected["fp8_load"] != "loaded"  # transformers' own refusal, word for word
