"""Meta's FP8 checkpoints (``quant_method: "fbgemm_fp8"``) on CPU: load, compute, save, round trips, LoRA on top."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import FbgemmFp8Config
from transformers.quantizers.quantizers_utils import should_convert_module

from modeling_llama4 import Llama4ForCausalLM
from modeling_llama4.fp8 import FP8_MAX, dequantize_fp8, fp8_matmul, quantize_fp8
from modeling_llama4.fp8_cpu import MAX_ROWS, fp8_dequantize, fp8_dequantize_supported, fp8_gemv, fp8_gemv_supported
from modeling_llama4.lora_experts import register_expert_lora
from modeling_llama4.moe import Llama4TextExperts
from modeling_llama4.quantized_experts import Llama4Fp8Linear, Llama4Fp8TextExperts
from modeling_llama4.tiny import SCOUT_LIKE, VOCAB, text_config_from_meta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory_table import footprint_bytes  # noqa: E402

# Meta's FP8 Maverick keeps everything but the routed experts in bf16; the second layout also has FP8 linear layers.
EXPERTS_ONLY = ["model.layers.*.self_attn", "model.layers.*.feed_forward.shared_expert", "lm_head"]
LAYOUTS = {"experts": EXPERTS_ONLY, "experts+linears": ["lm_head"]}
MAX_LOGIT_DELTA = 0.1  # FP8 vs the fp32 original (logit std 0.16); measured 0.051 with FP8 linear layers too


def tokens(batch: int = 4, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def fbgemm_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fbgemm's ``quantize_fp8_per_row`` on ``[rows, in]``: one scale per row (output channel)."""
    scale = weight.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def to_fbgemm_fp8(state: dict[str, torch.Tensor], not_converted: list[str]) -> dict[str, torch.Tensor]:
    """A dense state dict in transformers' ``fbgemm_fp8`` layout, written independently of the package: experts
    quantized per output channel (``FbgemmFp8Quantize``: transpose, per row, back), linear weights per row."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            q, scale = fbgemm_rowwise(tensor.transpose(1, 2))  # [E, N, K], [E, N, 1]
            out[name] = q.transpose(1, 2).contiguous()
            out[f"{name}_scale"] = scale.transpose(1, 2).contiguous() if name.endswith("gate_up_proj") else scale
        elif name.endswith("proj.weight") and should_convert_module(name.rpartition(".")[0], not_converted):
            out[name], out[f"{name}_scale"] = fbgemm_rowwise(tensor)
        else:
            out[name] = tensor
    return out


@pytest.fixture(scope="module")
def original():
    """A tiny Scout-like fp32 model whose experts move the logits (gain 0.25, as in test_int4)."""
    torch.manual_seed(0)
    model = Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE)).eval()
    for module in model.modules():
        if isinstance(module, Llama4TextExperts):
            for weight in (module.gate_up_proj, module.down_proj):
                torch.nn.init.normal_(weight, std=0.25 * weight.shape[1] ** -0.5)
    return model


@pytest.fixture(scope="module", params=list(LAYOUTS))
def checkpoint(request, original, tmp_path_factory) -> tuple[Path, list[str]]:
    """The original written as an FP8 checkpoint in the official layout: ``(folder, modules_to_not_convert)``."""
    not_converted = LAYOUTS[request.param]
    path = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    original.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    save_file(to_fbgemm_fp8(state, not_converted), path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": 1200.0,
        "modules_to_not_convert": not_converted,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path, not_converted


@pytest.fixture(scope="module")
def fp8_model(checkpoint) -> Llama4ForCausalLM:
    return Llama4ForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32).eval()


def test_loads_on_cpu_with_experts_in_fp8(checkpoint, fp8_model):
    _, not_converted = checkpoint
    layer = fp8_model.model.layers[0]
    experts = layer.feed_forward.experts
    assert isinstance(experts, Llama4Fp8TextExperts)
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float8_e4m3fn
    assert experts.gate_up_proj.element_size() == 1
    assert experts.gate_up_proj_scale.shape == (4, 1, 96) and experts.down_proj_scale.shape == (4, 64, 1)
    fp8_linears = not_converted == ["lm_head"]
    assert isinstance(layer.self_attn.q_proj, Llama4Fp8Linear) == fp8_linears
    assert isinstance(layer.feed_forward.shared_expert.up_proj, Llama4Fp8Linear) == fp8_linears
    assert type(layer.feed_forward.router) is not Llama4Fp8Linear  # the router is a Linear subclass: never FP8
    assert type(fp8_model.lm_head) is torch.nn.Linear


@torch.no_grad()
def test_logits_equal_the_dequantized_weight_model_and_close_to_the_original(checkpoint, fp8_model, original):
    ids = tokens()
    got = fp8_model(ids).logits
    dequantized = Llama4ForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32).dequantize().eval()
    assert not [m for m in dequantized.modules() if isinstance(m, (Llama4Fp8TextExperts, Llama4Fp8Linear))]
    torch.testing.assert_close(got, dequantized(ids).logits, atol=1e-5, rtol=0)
    delta = (got - original(ids).logits).abs().max()
    assert 1e-3 < delta <= MAX_LOGIT_DELTA, delta


@torch.no_grad()
def test_only_routed_experts_are_computed(fp8_model):
    experts = fp8_model.model.layers[0].feed_forward.experts
    computed = []
    project = experts.project
    experts.project = lambda x, expert, projection: computed.append(expert) or project(x, expert, projection)
    try:
        experts(torch.randn(6, 64), torch.tensor([2, 0, 4, 0]))
    finally:
        del experts.project
    assert sorted(set(computed)) == [0, 2]


@torch.no_grad()
def test_save_and_reload_are_identical(checkpoint, fp8_model, tmp_path):
    path, not_converted = checkpoint
    fp8_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "fbgemm_fp8" and saved["modules_to_not_convert"] == not_converted
    original_tensors, saved_tensors = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert original_tensors.keys() == saved_tensors.keys()
    for name, tensor in original_tensors.items():
        assert saved_tensors[name].dtype == tensor.dtype and torch.equal(raw(saved_tensors[name]), raw(tensor)), name
    reloaded = Llama4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tokens()
    assert torch.equal(reloaded(ids).logits, fp8_model(ids).logits)


def test_footprint_is_one_byte_per_expert_weight(original, tmp_path):
    """Meta's layout (routed experts in FP8) quantized on load: ``get_memory_footprint`` is the memory table's."""
    original.save_pretrained(tmp_path)
    config = FbgemmFp8Config(modules_to_not_convert=EXPERTS_ONLY)
    fp8_model = Llama4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=config)
    rotary = sum(b.numel() * b.element_size() for name, b in original.named_buffers() if "rotary" in name)
    assert fp8_model.get_memory_footprint() == footprint_bytes(original.config, "fp8", dtype_bytes=4) + rotary


def test_bf16_to_fp8_to_bf16_round_trips(original, tmp_path):
    """Dense → FP8 on load (``FbgemmFp8Config``) → ``dequantize()`` → FP8 again: the same FP8 tensors."""
    original.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    original.float()
    config = FbgemmFp8Config(modules_to_not_convert=EXPERTS_ONLY)
    first = Llama4ForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=config).eval()
    assert first.model.layers[0].feed_forward.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    first.save_pretrained(tmp_path / "fp8")
    dense = Llama4ForCausalLM.from_pretrained(tmp_path / "fp8").dequantize()
    assert dense.model.layers[0].feed_forward.experts.gate_up_proj.dtype == torch.bfloat16
    dense.save_pretrained(tmp_path / "bf16-again")
    again = Llama4ForCausalLM.from_pretrained(tmp_path / "bf16-again", quantization_config=config)
    first_state, again_state = first.state_dict(), again.state_dict()
    assert first_state.keys() == again_state.keys()
    assert all(torch.equal(raw(first_state[name]), raw(again_state[name])) for name in first_state)


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """Bytes of an FP8 tensor (``torch.equal`` does not take float8), other tensors as they are."""
    return tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor


def test_fp8_format_error_bound():
    weight = torch.randn(3, 64, 40)
    q, scale = quantize_fp8(weight)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 1, 40)
    restored = dequantize_fp8(q, scale, torch.float32)
    assert ((restored - weight).abs() <= weight.abs() * 2**-4 + scale * 2**-9).all()  # e4m3: 3 mantissa bits


def kernel_should_build() -> bool:
    """Whether ``fp8_cpu``'s kernel is supposed to build here: a CPU with AVX2, F16C and FMA, and a C++ compiler."""
    cpuinfo = Path("/proc/cpuinfo")
    flags_line = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    has_compiler = shutil.which(os.environ.get("CXX", "c++")) is not None
    return {"avx2", "f16c", "fma"} <= set(flags_line.partition(":")[2].split()) and has_compiler


@pytest.fixture(scope="module")
def cpu_kernel() -> None:
    """Fail where ``fp8_cpu``'s kernel should build and does not; skip where it cannot (no C++ compiler, a CPU
    without AVX2/F16C/FMA, not Linux)."""
    if fp8_gemv_supported(torch.zeros(1, 16), torch.zeros(16, 16, dtype=torch.float8_e4m3fn)):
        return
    if Path("/proc/cpuinfo").is_file() and kernel_should_build():
        pytest.fail("the CPU FP8 kernel did not build on a CPU with AVX2/F16C/FMA and a C++ compiler (see the log)")
    pytest.skip("the CPU FP8 kernel cannot be built here")


def test_cpu_kernels_convert_every_e4m3_code_exactly(cpu_kernel):
    codes = torch.arange(256, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # the two NaN codes; subnormals (exponent bits 0) stay
    q, ones = codes.view(torch.float8_e4m3fn).reshape(16, 16), torch.ones(1, 16)
    picked = torch.cat([fp8_gemv(rows, q, ones) for rows in torch.eye(16).split(MAX_ROWS)])
    assert torch.equal(picked, q.float())  # one-hot rows of x pick the rows of q: bitwise, signed zeros aside
    assert fp8_dequantize_supported(q, ones)
    assert torch.equal(fp8_dequantize(q, ones).view(torch.int32), q.float().view(torch.int32))  # signed zeros too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dequantize_is_bitwise_torchs(cpu_kernel, dtype):
    """``dequantize_fp8`` of one expert (a view at an offset; a transposed scale as ``down_proj``'s) on the kernel."""
    q, scale = quantize_fp8(torch.randn(3, 64, 96))
    for column_scale in (scale[2], torch.rand(96, 1).T):
        assert fp8_dequantize_supported(q[2], column_scale)
        assert torch.equal(dequantize_fp8(q[2], column_scale, dtype), (q[2].float() * column_scale).to(dtype))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_equals_the_dequantized_matmul(cpu_kernel, dtype, threads, monkeypatch):
    """Decode-sized ``fp8_matmul`` (1 to ``MAX_ROWS`` rows) runs the kernel: fp32 to 1e-5, bf16 rounded once; with
    3 threads each takes a panel of the 96 columns."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    q, scale = quantize_fp8(torch.randn(3, 64, 96))
    weight = dequantize_fp8(q[2], scale[2], torch.float32)  # expert 2: a view at an offset
    for rows in range(1, MAX_ROWS + 1):
        x = torch.randn(rows, 64).to(dtype)
        assert fp8_gemv_supported(x, q[2])
        got, expected = fp8_matmul(x, q[2], scale[2]), x.float() @ weight
        assert got.dtype == dtype
        atol = 1e-5 * expected.abs().max().item()
        torch.testing.assert_close(got.float(), expected, rtol=0 if dtype == torch.float32 else 2**-8, atol=atol)


def test_cpu_kernel_takes_decode_shapes_only(cpu_kernel):
    q = torch.zeros(64, 96, dtype=torch.float8_e4m3fn)
    assert fp8_gemv_supported(torch.zeros(MAX_ROWS, 64), q)
    assert not fp8_gemv_supported(torch.zeros(MAX_ROWS + 1, 64), q)  # prefill: dequantize, torch's matmul
    assert fp8_dequantize_supported(q, torch.ones(1, 96))
    assert not fp8_gemv_supported(torch.zeros(1, 96), q.T)  # Llama4Fp8Linear's weightᵀ: not row-major
    assert not fp8_gemv_supported(torch.zeros(1, 64), torch.zeros(64, 40, dtype=torch.float8_e4m3fn))  # N % 16
    assert not fp8_gemv_supported(torch.zeros(1, 60), torch.zeros(60, 96, dtype=torch.float8_e4m3fn))  # K % 8


def test_without_the_cpu_kernel_fp8_dequantizes_with_a_warning(checkpoint, fp8_model, tmp_path):
    """No C++ compiler (and an empty inductor cache): a fresh process warns once a kernel, same logits."""
    ids = tokens(batch=1, seq=4)
    script = (
        "import sys, torch; from modeling_llama4 import Llama4ForCausalLM\n"
        f"model = Llama4ForCausalLM.from_pretrained({str(checkpoint[0])!r}, dtype=torch.float32).eval()\n"
        f"torch.save(model(torch.tensor({ids.tolist()})).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for kernel in ("gemv", "dequantize"):
        assert run.stderr.count(f"the CPU FP8 {kernel} kernel is unavailable") == 1
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), fp8_model(ids).logits, atol=1e-5, rtol=0)


def test_backward_keeps_fp8_blocks_not_dequantized_experts(fp8_model):
    experts = fp8_model.model.layers[0].feed_forward.experts
    x = torch.randn(10, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = experts(x, torch.tensor([3, 0, 5, 2]))
    assert any(t.dtype == torch.float8_e4m3fn for t in saved)
    assert not [t.shape for t in saved if t.dtype == torch.float32 and tuple(t.shape) in {(64, 96), (48, 64)}]
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_lora_trains_on_an_fp8_base(checkpoint):
    model = Llama4ForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32)
    frozen = {name: b.clone() for name, b in model.named_buffers() if b.dtype == torch.float8_e4m3fn}
    targets = ["experts", "v_proj"] if checkpoint[1] == EXPERTS_ONLY else ["experts"]
    config = register_expert_lora(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids, losses = tokens(batch=2, seq=12), []
    peft_model.train()
    for _ in range(5):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    after = {name.replace("base_layer.", ""): b for name, b in peft_model.get_base_model().named_buffers()}
    assert all(torch.equal(raw(after[name]), raw(b)) for name, b in frozen.items())


@pytest.mark.parametrize(
    "damage, message",
    [
        ("nan_scale", "model.layers.0.feed_forward.experts.gate_up_proj` scale has non-finite"),
        ("scale_shape", "ignore_mismatched_sizes"),  # transformers' refusal; its load report names the tensor
        ("bf16_weight", "expected float8_e4m3fn"),
    ],
)
def test_bad_scales_and_shapes_are_refused(checkpoint, damage, message, tmp_path, caplog):
    path, _ = checkpoint
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    state = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0.feed_forward.experts."
    if damage == "nan_scale":
        state[prefix + "gate_up_proj_scale"][0, 0, 3] = float("nan")
    elif damage == "scale_shape":
        state[prefix + "down_proj_scale"] = state[prefix + "down_proj_scale"].transpose(1, 2).contiguous()
    else:
        state[prefix + "gate_up_proj"] = state[prefix + "gate_up_proj"].to(torch.bfloat16)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError), match=message):
        Llama4ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    if damage == "scale_shape":
        assert "down_proj_scale | MISMATCH" in caplog.text


def test_other_models_keep_transformers_fbgemm_fp8(tmp_path):
    """After ``import modeling_llama4`` another model's fbgemm_fp8 checkpoint goes to transformers' quantizer: on
    this CPU machine it raises transformers' own error, as without the package."""
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config.num_key_value_heads, config.vocab_size = 2, 64
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    script = f"""
import transformers
import modeling_llama4
try:
    transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
except ImportError as error:
    print("ImportError:", error)
"""
    with_package = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    without = subprocess.run(
        [sys.executable, "-c", script.replace("import modeling_llama4", "")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "ImportError: Using fbgemm fp8 quantization requires a GPU or XPU" in without
    assert with_package == without


def test_fp8_checkpoint_file_layout(checkpoint):
    path, _ = checkpoint
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.feed_forward.experts.gate_up_proj").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.0.feed_forward.experts.down_proj_scale").get_shape() == [4, 64, 1]
