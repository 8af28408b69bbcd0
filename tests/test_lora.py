"""PEFT LoRA on the MoE experts: our per-expert LoRA layer and PEFT's stock ``target_parameters`` path; the PEFT and
transformers calls users write, each in a fresh process; adapter folders that must be refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from packaging.version import Version

from modeling_llama4.tiny import SCOUT_LIKE, VOCAB, text_config_from_meta

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.integrations.peft import MIN_PEFT_VERSION as TRANSFORMERS_MIN_PEFT  # noqa: E402

from modeling_llama4 import Llama4ForCausalLM  # noqa: E402
from modeling_llama4.adapters import load_adapter  # noqa: E402
from modeling_llama4.lora_experts import Llama4ExpertsLoraLayer  # noqa: E402

EXPERT_PARAMETERS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
ATOL = 1e-4


def tiny_model(seed: int = 0, **overrides) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    return Llama4ForCausalLM(text_config_from_meta(SCOUT_LIKE, **overrides)).eval()


def tokens(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def expert_lora(**kwargs) -> LoraConfig:
    """A plain ``LoraConfig`` on the experts: ``import modeling_llama4`` routes them to the per-expert layer."""
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["experts"], **kwargs})


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def train_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps of next-token loss, so that every adapter factor moves away from its init."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def expert_layers(model: torch.nn.Module) -> list[Llama4ExpertsLoraLayer]:
    return [module for module in model.modules() if isinstance(module, Llama4ExpertsLoraLayer)]


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(lambda: expert_lora(target_modules=["experts", "q_proj", "shared_expert.down_proj"]), id="ours"),
        pytest.param(
            lambda: LoraConfig(r=4, target_modules=["q_proj"], target_parameters=EXPERT_PARAMETERS), id="stock"
        ),
    ],
)
def test_fresh_adapter_is_base_then_merge_and_unmerge(config):
    model, ids = tiny_model(), tokens()
    base_logits = logits(model, ids)
    base_weights = {name: weight.clone() for name, weight in model.state_dict().items()}
    peft_model = get_peft_model(model, config())
    torch.testing.assert_close(logits(peft_model, ids), base_logits, atol=1e-6, rtol=0)

    train_steps(peft_model, ids)
    adapted = logits(peft_model, ids)
    assert (adapted - base_logits).abs().max() > 1e-2
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, ids), adapted, atol=ATOL, rtol=0)
    peft_model.unmerge_adapter()
    for name, weight in peft_model.get_base_model().state_dict().items():
        name = name.replace("base_layer.", "")
        if name in base_weights:
            torch.testing.assert_close(weight, base_weights[name], atol=1e-6, rtol=0, msg=name)
    with peft_model.disable_adapter():
        torch.testing.assert_close(logits(peft_model, ids), base_logits, atol=1e-6, rtol=0)

    merged = peft_model.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), adapted, atol=ATOL, rtol=0)


def test_expert_lora_matches_dense_reference():
    """Our sparse LoRA forward equals the base experts run on merged weights ``W + s·(BA)ᵀ`` (init_lora_weights=False)."""
    peft_model = get_peft_model(tiny_model(), expert_lora(init_lora_weights=False))
    layer = expert_layers(peft_model)[0]
    x = torch.randn(10, layer.in_features)
    tokens_per_expert = torch.tensor([3, 0, 5, 2])
    with torch.no_grad():
        adapted = layer(x, tokens_per_expert)
        layer.merge()
        reference = layer.get_base_layer().forward_loop(x, tokens_per_expert)
    torch.testing.assert_close(adapted, reference, atol=1e-5, rtol=0)


def test_expert_lora_gradients_match_autograd_on_merged_weights():
    """The per-expert LoRA backward (its own autograd function) equals autograd through the base experts on
    ``W + s·(BA)ᵀ`` built from the same factors: the gradients of the input rows and of every factor."""
    peft_model = get_peft_model(tiny_model(), expert_lora(init_lora_weights=False))
    layer = expert_layers(peft_model)[0]
    base, scaling = layer.get_base_layer(), layer.scaling["default"]
    x = torch.randn(10, layer.in_features, requires_grad=True)
    tokens_per_expert, counts = torch.tensor([3, 0, 5, 2]), [3, 0, 5, 2]
    out_weights = torch.randn(10, layer.in_features)
    (layer(x, tokens_per_expert) * out_weights).sum().backward()
    ours = [x.grad] + [getattr(layer, name)["default"].grad for name in layer.adapter_layer_names]

    rows = x.detach().clone().requires_grad_()
    factors = [getattr(layer, name)["default"].detach().clone().requires_grad_() for name in layer.adapter_layer_names]
    gate_a, gate_b, up_a, up_b, down_a, down_b = factors
    gate_up = base.gate_up_proj + torch.cat([(gate_b @ gate_a).mT, (up_b @ up_a).mT], dim=-1) * scaling
    down = base.down_proj + (down_b @ down_a).mT * scaling
    outputs = []
    for expert, expert_rows in enumerate(rows.split(counts)):
        gate, up = (expert_rows @ gate_up[expert]).chunk(2, dim=-1)
        outputs.append((base.act_fn(gate) * up) @ down[expert])
    (torch.cat(outputs) * out_weights).sum().backward()
    for name, grad, reference in zip(["x", *layer.adapter_layer_names], ours, [rows.grad, *(f.grad for f in factors)]):
        torch.testing.assert_close(grad, reference, atol=1e-5, rtol=1e-5, msg=name)


def test_named_adapters_set_adapter_and_load_second(tmp_path):
    model, ids = tiny_model(), tokens()
    base_logits = logits(model, ids)
    peft_model = get_peft_model(model, expert_lora(init_lora_weights=False))
    first = logits(peft_model, ids)
    peft_model.add_adapter("other", expert_lora(r=2, init_lora_weights=False))
    peft_model.set_adapter("other")
    other = logits(peft_model, ids)
    assert (other - first).abs().max() > 1e-3 and (other - base_logits).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path)  # writes the default adapter at the root and "other" in a subfolder

    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), first, atol=1e-6, rtol=0)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    reloaded.set_adapter("other")
    torch.testing.assert_close(logits(reloaded, ids), other, atol=1e-6, rtol=0)
    reloaded.delete_adapter("other")
    assert not any("other" in name for name, _ in reloaded.named_parameters())


def test_trainable_parameter_count_matches_formula():
    config = text_config_from_meta(SCOUT_LIKE)
    rank, experts, hidden, inner = 4, config.num_local_experts, config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    per_layer = experts * rank * 3 * (hidden + inner) + rank * (hidden + q_out) + 3 * rank * (hidden + inner)
    targets = ["experts", "q_proj", "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]
    peft_model = get_peft_model(tiny_model(), expert_lora(r=rank, target_modules=targets))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == config.num_hidden_layers * per_layer


def test_router_frozen_by_default_and_trainable_via_modules_to_save(tmp_path):
    default = get_peft_model(tiny_model(), expert_lora())
    assert not any(p.requires_grad for name, p in default.named_parameters() if "router" in name)
    with_router = get_peft_model(tiny_model(), expert_lora(modules_to_save=["router"]))
    assert all(p.requires_grad for name, p in with_router.named_parameters() if "router.modules_to_save" in name)
    train_steps(with_router, tokens())
    with_router.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    torch.testing.assert_close(logits(reloaded, tokens()), logits(with_router, tokens()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("targets", [["expertz"], ["expert"], ["feed_forward.experts.gate_up_proj"]])
def test_bad_target_names_raise(targets):
    """PEFT raises when no module matches (a list with some valid names passes silently: PEFT's semantics)."""
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_model(), expert_lora(target_modules=targets))


def test_bad_target_parameters_warn():
    """PEFT only warns when ``target_parameters`` match nothing."""
    config = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["feed_forward.experts.gate_proj"])
    with pytest.warns(RuntimeWarning, match="no parameter was matched"):
        get_peft_model(tiny_model(), config)


def test_lora_config_carries_nothing_of_ours():
    """The experts get their layer from the model side: the config stays PEFT's, before and after injection."""
    config = expert_lora()
    peft_model = get_peft_model(tiny_model(), config)
    assert len(expert_layers(peft_model)) == len(peft_model.config.moe_layers)
    assert config._custom_modules is None and peft_model.peft_config["default"]._custom_modules is None


def test_gradients_reach_only_routed_experts_adapters():
    peft_model = get_peft_model(tiny_model(), expert_lora(init_lora_weights=False))
    routed = []
    hooks = [
        layer.register_forward_hook(lambda module, args, out: routed.append(args[1] > 0))
        for layer in expert_layers(peft_model)
    ]
    peft_model.train()
    ids = tokens(batch=1, seq=2)  # two tokens, top-1: at most 2 of the 4 experts of each layer are routed to
    peft_model(ids).logits.square().mean().backward()  # every position contributes (the LM loss skips the last)
    for hook in hooks:
        hook.remove()
    for layer, is_routed in zip(expert_layers(peft_model), routed):
        assert layer.get_base_layer().gate_up_proj.grad is None and layer.get_base_layer().down_proj.grad is None
        for name in layer.adapter_layer_names:
            grad_norm = getattr(layer, name)["default"].grad.flatten(1).norm(dim=1)  # [E]
            assert torch.equal(grad_norm > 0, is_routed), name
    assert not any(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_dropout_only_in_training():
    peft_model = get_peft_model(tiny_model(), expert_lora(lora_dropout=0.5, init_lora_weights=False)).eval()
    ids = tokens()
    torch.testing.assert_close(logits(peft_model, ids), logits(peft_model, ids), atol=0, rtol=0)
    peft_model.train()
    assert (logits(peft_model, ids) - logits(peft_model, ids)).abs().max() > 1e-4


def test_gradient_checkpointing_and_bf16_autocast():
    ids = tokens()
    grads = {}
    for checkpointing in (False, True):
        peft_model = get_peft_model(tiny_model(), expert_lora(init_lora_weights=False))
        if checkpointing:
            peft_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        peft_model.train()
        peft_model(ids, labels=ids).loss.backward()
        grads[checkpointing] = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    for plain, checkpointed in zip(grads[False], grads[True]):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=0)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = peft_model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for n, p in peft_model.named_parameters() if "lora_" in n)


def test_trainer_learns_mapping_with_expert_lora_only(tmp_path):
    """Eight fixed prompts, each with its own two-token answer; the loss is on the answers only.

    The base weights are drawn at a trained model's scale (std 0.2, not 0.02): with the default init the frozen
    output head cannot express a confident prediction, whatever the adapters learn.
    """
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, VOCAB, (8, 4), generator=generator)
    answers = torch.randint(3, VOCAB, (8, 2), generator=generator)
    ids = torch.cat([prompts, answers], dim=1)
    labels = ids.clone()
    labels[:, : prompts.shape[1]] = -100
    dataset = [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]
    peft_model = get_peft_model(tiny_model(initializer_range=0.2), expert_lora(r=8, lora_alpha=16))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=20,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] <= losses[0] / 2, losses


def run_script(script: str, cwd) -> None:
    """Run ``script`` in a fresh Python process (no state of this one); fail with its output if it fails."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_peft_and_transformers_user_flows_in_fresh_processes(tmp_path):
    """After ``import modeling_llama4`` and nothing else: train with ``get_peft_model`` + Trainer (checkpoints) in
    one process; in another, load the adapter with each PEFT/transformers call and resume the Trainer run."""
    model, ids = tiny_model(), tokens(batch=4)
    model.save_pretrained(tmp_path / "base")
    torch.save(ids, tmp_path / "ids.pt")
    setup = """
        import torch, modeling_llama4
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

        ids = torch.load("ids.pt")
        dataset = [{"input_ids": row, "labels": row} for row in ids]
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["experts", "q_proj"], init_lora_weights=False)
        args = TrainingArguments(
            output_dir="trainer", max_steps=2, save_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
            report_to=[], use_cpu=True, disable_tqdm=True,
        )

        def logits(model):
            with torch.no_grad():
                return model.eval()(ids).logits
    """
    train = """
        model = get_peft_model(AutoModelForCausalLM.from_pretrained("base"), config)
        Trainer(model=model, args=args, train_dataset=dataset).train()
        model.save_pretrained("adapter")
        torch.save(logits(model), "adapter_logits.pt")
    """
    load = """
        from safetensors.torch import load_file

        # Same weights, another process: fp32 logits agree to the project-wide 1e-5 (BLAS blocking may differ).
        expected = torch.load("adapter_logits.pt")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapter")
        torch.testing.assert_close(logits(peft_model), expected, atol=1e-5, rtol=0)

        model = AutoModelForCausalLM.from_pretrained("base")
        model.load_adapter("adapter")  # transformers' PEFT integration
        torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)

        model = AutoModelForCausalLM.from_pretrained("adapter")  # the base from adapter_config.json, then the adapter
        torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)

        model = get_peft_model(AutoModelForCausalLM.from_pretrained("base"), config)
        Trainer(model=model, args=args, train_dataset=dataset).train(resume_from_checkpoint="trainer/checkpoint-1")
        resumed = load_file("trainer/checkpoint-2/adapter_model.safetensors")
        trained = load_file("adapter/adapter_model.safetensors")
        assert resumed.keys() == trained.keys() and any("experts" in name for name in trained)
        for name in trained:
            torch.testing.assert_close(resumed[name], trained[name], atol=1e-5, rtol=0, msg=name)
    """
    run_script(setup + train, tmp_path)
    run_script(setup + load, tmp_path)


@pytest.mark.skipif(
    Version(peft.__version__) < Version(TRANSFORMERS_MIN_PEFT),
    reason=f"transformers refuses add_adapter/set_adapter with peft<{TRANSFORMERS_MIN_PEFT} (its MIN_PEFT_VERSION, "
    "for every model); with that gate bypassed this flow passes on peft 0.21.2",
)
def test_transformers_add_adapter_and_set_adapter_in_a_fresh_process(tmp_path):
    model, ids = tiny_model(), tokens()
    model.save_pretrained(tmp_path / "base")
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(logits(model, ids), tmp_path / "base_logits.pt")
    script = """
        import torch, modeling_llama4
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM

        ids, base_logits = torch.load("ids.pt"), torch.load("base_logits.pt")
        model = AutoModelForCausalLM.from_pretrained("base").eval()
        model.add_adapter(LoraConfig(r=2, target_modules=["experts"], init_lora_weights=False), adapter_name="a")
        model.add_adapter(LoraConfig(r=2, target_modules=["experts"]), adapter_name="b")  # B = 0: the base
        with torch.no_grad():
            model.set_adapter("b")
            torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-6, rtol=0)
            model.set_adapter("a")
            assert (model(ids).logits - base_logits).abs().max() > 1e-3
    """
    run_script(script, tmp_path)


@pytest.fixture
def saved_adapter(tmp_path):
    peft_model = get_peft_model(tiny_model(), expert_lora(init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_missing_adapter_weights_are_named_without_a_hub_lookup(saved_adapter, monkeypatch):
    import peft.utils.save_and_load

    def no_network(*args, **kwargs):
        raise AssertionError("PEFT looked for the adapter on the Hub")

    monkeypatch.setattr(peft.utils.save_and_load, "hf_hub_download", no_network)
    (saved_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors not found"):
        load_adapter(tiny_model(), saved_adapter)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_adapter(tiny_model(), saved_adapter / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_adapter(tiny_model(), f"./{saved_adapter.name}-missing")


def test_invalid_adapter_config_is_named(saved_adapter):
    (saved_adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        load_adapter(tiny_model(), saved_adapter)
    (saved_adapter / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not a PEFT adapter config"):
        load_adapter(tiny_model(), saved_adapter)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_refused(saved_adapter, bad_value):
    from safetensors.torch import load_file, save_file

    weights_file = saved_adapter / "adapter_model.safetensors"
    weights = load_file(weights_file)
    name = next(name for name in weights if "lora_down_B" in name)
    weights[name][0, 0, 0] = bad_value
    save_file(weights, weights_file)
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors holds non-finite values .* in {name}"):
        load_adapter(tiny_model(), saved_adapter)


def test_plain_peft_loading_refuses_non_finite_expert_factors(saved_adapter):
    """Without ``load_adapter``'s folder check, the expert layer's load hook still names the bad factor."""
    from safetensors.torch import load_file, save_file

    weights_file = saved_adapter / "adapter_model.safetensors"
    weights = load_file(weights_file)
    name = next(name for name in weights if "lora_gate_A" in name)
    weights[name][0, 0, 0] = float("nan")
    save_file(weights, weights_file)
    loaded_name = name.replace(".lora_gate_A", ".lora_gate_A.default")  # PEFT inserts the adapter name
    with pytest.raises(ValueError, match=rf"LoRA adapter weight {loaded_name} holds non-finite values"):
        PeftModel.from_pretrained(tiny_model(), saved_adapter)
