"""The converter (``conversion/``, ``llama4-convert``) on tiny native checkpoints made with Meta's reference.

Native checkpoints are written here the way Meta's tooling would: at model-parallel degree 1 or 2 (split per
fairscale's column/row rules, ``split_for_model_parallel``), in Meta's module naming or in the fused naming of the
released checkpoints (``fuse_names``). Both helpers are checked against Meta's own resharder and load hooks. The
converted checkpoints must reproduce Meta's logits, load in transformers' built-in Llama 4, fail cleanly on bad
inputs, and come back bit for bit with ``--to-native``.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from meta_reference import build_reference, reference_logits
from safetensors import safe_open

import modeling_llama4
from conversion import ConversionError, cli
from conversion import writer as writer_module
from conversion.convert import concat_row_blocks, convert_native_to_hf
from conversion.hf_config import native_args_from_config, solve_ffn_args
from conversion.params import NativeArgs, dense_hidden_dim, moe_hidden_dim
from conversion.to_native import convert_hf_to_native
from conversion.verify import verify_conversion
from conversion.writer import INDEX_FILE, ShardedSafetensorsWriter, TensorEntry, parse_size
from modeling_llama4.tiny import SCOUT_LIKE

llama_checkpoint = pytest.importorskip("llama_models.checkpoint")
meta_datatypes = pytest.importorskip("llama_models.llama4.datatypes")

TOKENIZER_RANKS = 264  # tiny_tokenizer_model's BPE ranks, followed by Meta's 2,048 special tokens
VOCAB = TOKENIZER_RANKS + 2048  # the embedding rows, the tokenizer's size as Meta's Llama4.build requires (8 x 289)
BOS, EOS, EOM, EOT = TOKENIZER_RANKS, TOKENIZER_RANKS + 1, TOKENIZER_RANKS + 7, TOKENIZER_RANKS + 8
SEQ = 21  # more than two attention chunks of 8
TEXT_ARGS = dict(
    SCOUT_LIKE,
    vocab_size=VOCAB,
    rope_theta=500000.0,
    max_seq_len=64,
    # MoE every second layer: dense (fc1/fc2) and MoE (experts, shared expert) layers both occur
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=2),
)
VISION_ARGS = dict(
    TEXT_ARGS,
    vision_args=dict(
        image_size=dict(height=56, width=56),
        patch_size=dict(height=14, width=14),
        dim=32,
        n_layers=2,
        n_heads=2,
        mlp_ratio=4.0,  # = 1 / pixel_shuffle_ratio**2, the only ratio transformers' built-in sizes correctly
        output_dim=64,
        pixel_shuffle_ratio=0.5,
    ),
)
DENSE_ARGS = {k: v for k, v in TEXT_ARGS.items() if k not in ("moe_args", "nope_layer_interval")}
MODELS = {"text": TEXT_ARGS, "vision": VISION_ARGS, "dense": DENSE_ARGS}

# ----------------------------------------------------------------------------------------------------------------
# Writing native checkpoints as Meta's tooling does

# fairscale: column-parallel weights (and biases) split on dim 0, row-parallel weights on dim 1, experts on F.
_COLUMN = re.compile(
    r"tok_embeddings\.weight|output\.weight|vision_projection\.weight|.*conv1\._linear\.weight"
    r"|.*attention\.w[qkv]\.weight|.*feed_forward\.(shared_expert\.)?w[13]\.weight"
    r"|.*attn\.w[qkv]\.(weight|bias)|.*mlp\.c_fc\.(weight|bias)"
)
_ROW = re.compile(
    r".*attention\.wo\.weight|.*feed_forward\.(shared_expert\.)?w2\.weight|.*attn\.wo\.weight|.*c_proj\.weight"
)
_EXPERT_DIM = {"experts.w1": 2, "experts.w3": 2, "experts.w2": 1}


def split_dim(key: str) -> int | None:
    for suffix, dim in _EXPERT_DIM.items():
        if key.endswith(suffix):
            return dim
    if _COLUMN.fullmatch(key):
        return 0
    if _ROW.fullmatch(key):
        return 1
    return None


def split_for_model_parallel(state: dict[str, torch.Tensor], world_size: int) -> list[dict[str, torch.Tensor]]:
    """Rank ``r``'s state dict at model-parallel degree ``world_size``: the inverse of merging shards."""
    shards = [{} for _ in range(world_size)]
    for key, tensor in state.items():
        dim = split_dim(key)
        parts = [tensor] * world_size if dim is None else tensor.chunk(world_size, dim=dim)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def fuse_names(shard: dict[str, torch.Tensor], args: dict) -> dict[str, object]:
    """One shard in the released checkpoints' fused naming, with the entries Meta's loaders drop mixed in."""
    fused: dict[str, object] = {"rope.freqs": torch.randn(8)}
    for layer in range(args["n_layers"]):
        p = f"layers.{layer}."
        ffn = p + "feed_forward."
        fused[p + "attention.wqkv.weight"] = torch.cat([shard.pop(p + f"attention.w{x}.weight") for x in "qkv"])
        fused[p + "attention.wqkv.layer_norm_weight"] = shard.pop(p + "attention_norm.weight")
        fused[p + "attention.wqkv._extra_state"] = io.BytesIO(b"fp8 scales")
        if ffn + "router_DE" in shard:
            fused[ffn + "norm.weight"] = shard.pop(p + "ffn_norm.weight")
            w1, w2, w3 = (shard.pop(ffn + f"experts.w{i}") for i in (1, 2, 3))
            fused[ffn + "experts.moe_w_in_eD_F"] = w1.reshape(-1, w1.shape[-1]).clone()
            fused[ffn + "experts.moe_w_swiglu_eD_F"] = w3.reshape(-1, w3.shape[-1]).clone()
            fused[ffn + "experts.moe_w_out_eF_D"] = w2.reshape(-1, w2.shape[-1]).clone()
            for name, native in (("w_in_shared_FD", "w1"), ("w_swiglu_FD", "w3"), ("w_out_shared_DF", "w2")):
                fused[ffn + f"{name}.weight"] = shard.pop(ffn + f"shared_expert.{native}.weight")
            fused[ffn + "expert_activation_DE"] = torch.zeros(4)
        else:
            fused[ffn + "mlp.layer_norm_weight"] = shard.pop(p + "ffn_norm.weight")
            fused[ffn + "mlp.fc1_weight"] = torch.cat([shard.pop(ffn + "w1.weight"), shard.pop(ffn + "w3.weight")])
            fused[ffn + "mlp.fc2_weight"] = shard.pop(ffn + "w2.weight")
    fused.update(shard)  # embeddings, norm, output, router, vision: same names
    return fused


def write_native(
    directory: Path,
    args: dict,
    state: dict[str, torch.Tensor],
    tokenizer_model: Path,
    world_size: int = 1,
    fused: bool = False,
    nested: bool = False,
) -> Path:
    directory.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps({"model": args} if nested else args))
    (directory / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    for rank, shard in enumerate(split_for_model_parallel(state, world_size)):
        torch.save(fuse_names(shard, args) if fused else shard, directory / f"consolidated.{rank:02d}.pth")
    return directory


def tiny_tokenizer_model(path: Path) -> Path:
    """A tiktoken file with the 256 bytes and a few merges (``TOKENIZER_RANKS``), then Meta's special tokens."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" t", b"in", b"on", b"an", b"er"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def make_reference(args: dict, seed: int = 0):
    """Meta's reference in float32 with bfloat16-representable weights (as released), vision norms near 1."""
    model = build_reference(args, seed=seed).float()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if re.search(r"(ln_\d|ln_pre|ln_post)\.weight$", name):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            param.copy_(param.to(torch.bfloat16).float())
    return model


def native_state(model) -> dict[str, torch.Tensor]:
    return {key: tensor.to(torch.bfloat16).clone() for key, tensor in model.state_dict().items()}


def tokens(seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def pixels(count: int = 2, size: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    return tiny_tokenizer_model(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="module")
def references() -> dict:
    return {name: make_reference(args, seed=i) for i, (name, args) in enumerate(MODELS.items())}


@pytest.fixture
def native(tmp_path, references, tokenizer_model):
    """``native(model, world_size, fused, nested)`` → a native checkpoint folder of that reference."""

    def make(model: str = "vision", world_size: int = 2, fused: bool = True, nested: bool = False) -> Path:
        directory = tmp_path / f"native-{model}-mp{world_size}-{'fused' if fused else 'module'}"
        state = native_state(references[model])
        return write_native(directory, MODELS[model], state, tokenizer_model, world_size, fused, nested)

    return make


# ----------------------------------------------------------------------------------------------------------------
# The test helpers themselves, against Meta's own tooling


@pytest.mark.parametrize("model", ["text", "vision"])
def test_helpers_match_meta_resharder_and_load_hooks(model, references, tokenizer_model, tmp_path):
    """Fused MP=2 shards, merged by Meta's ``reshard_mp`` and loaded through Meta's load hooks, give the logits."""
    reference, args = references[model], MODELS[model]
    directory = write_native(tmp_path / "n", args, native_state(reference), tokenizer_model, world_size=2, fused=True)
    shards = []
    for rank in range(2):
        with torch.serialization.safe_globals([io.BytesIO]):
            shard = torch.load(directory / f"consolidated.0{rank}.pth", weights_only=True)
        shard = {k: v for k, v in shard.items() if isinstance(v, torch.Tensor) and "rope.freqs" not in k}
        shards.append(llama_checkpoint.convert_moe_weights(shard, args["moe_args"]["num_experts"]))
    merged = llama_checkpoint.reshard_mp(shards, size=1, rank=0)
    merged = {k: v for k, v in merged.items() if "expert_activation" not in k}
    fresh = build_reference(args, seed=99).float()
    fresh.load_state_dict({k: v.float() for k, v in merged.items()}, strict=True)
    ids = tokens()
    assert torch.equal(reference_logits(fresh, ids), reference_logits(reference, ids))


# ----------------------------------------------------------------------------------------------------------------
# Parity with Meta's reference


def load_converted(directory: Path):
    """A converted multimodal checkpoint in this package's class, float32, checked to load strictly."""
    model, info = modeling_llama4.Llama4ForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def text_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits for ``ids``; transformers' multimodal forward fails in 5.24, so its language model is run."""
    if isinstance(model, transformers.Llama4ForConditionalGeneration):
        return model.language_model(input_ids=ids).logits.float()
    return model(input_ids=ids).logits.float()


def image_features(model, tiles: torch.Tensor) -> torch.Tensor:
    """Projected vision features ``[tiles, tokens per tile, text hidden]`` of ``[tiles, 3, H, W]`` pixels."""
    return model.multi_modal_projector(model.vision_model(tiles.to(model.dtype)).last_hidden_state).float()


def meta_multimodal_logits(reference, ids: torch.Tensor, tiles: torch.Tensor, image_token: int) -> torch.Tensor:
    """Meta's forward with the adapter outputs of ``tiles`` on the ``image_token`` positions of ``ids``."""
    with torch.inference_mode():
        vision = reference.vision_embeddings
        features = vision.vision_adapter(vision.vision_encoder(tiles[:, None])).flatten(0, 1)
    mask = ids == image_token
    embedding = torch.zeros(*ids.shape, features.shape[-1])
    embedding[mask] = features
    masked = meta_datatypes.MaskedEmbedding(embedding=embedding, mask=mask[..., None])
    with torch.inference_mode():
        return reference(meta_datatypes.TransformerInput(tokens=ids, tokens_position=0, image_embedding=masked)).logits


def hf_multimodal_logits(model, ids: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """Logits of ``model``; transformers' built-in multimodal forward raises in 5.24 (``AttributeError:
    'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'``), so its parts are run by hand."""
    with torch.no_grad():
        if not isinstance(model, transformers.Llama4ForConditionalGeneration):
            return model(input_ids=ids, pixel_values=tiles).logits
        embeds = model.get_input_embeddings()(ids)
        features = image_features(model, tiles).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter((ids == model.config.image_token_index)[..., None], features)
        return model.language_model(inputs_embeds=embeds).logits


def image_ids(image_token: int, count: int) -> torch.Tensor:
    ids = tokens(seed=3)[:1]
    ids[0, 5 : 5 + count] = image_token
    return ids


def assert_matches_meta(model, reference, vision: bool) -> None:
    ids = tokens()
    with torch.no_grad():
        assert max_diff(text_logits(model, ids), reference_logits(reference, ids)) <= 1e-3
    if vision:
        tiles = pixels()
        with torch.no_grad():
            ours = image_features(model, tiles)
        with torch.inference_mode():
            meta = reference.vision_projection(
                reference.vision_embeddings.vision_adapter(reference.vision_embeddings.vision_encoder(tiles[:, None]))
            )
        assert ours.shape == (2, 4, 64) and max_diff(ours, meta) <= 1e-4
        image_token = model.config.image_token_index
        ids = image_ids(image_token, count=8)  # two tiles of 4 tokens
        expected = meta_multimodal_logits(reference, ids, tiles, image_token)
        assert max_diff(hf_multimodal_logits(model, ids, tiles), expected) <= 1e-3


@pytest.mark.parametrize("fused", [False, True], ids=["module", "fused"])
@pytest.mark.parametrize("world_size", [1, 2], ids=["mp1", "mp2"])
@pytest.mark.parametrize("model", ["text", "vision"])
def test_converted_checkpoint_matches_meta(model, world_size, fused, native, references, tmp_path):
    out = convert_native_to_hf(native(model, world_size, fused), tmp_path / "hf")
    if model == "text":
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(loaded) is modeling_llama4.Llama4ForCausalLM
    else:
        loaded = load_converted(out)
    assert_matches_meta(loaded, references[model], vision=model == "vision")


def test_dense_checkpoint_without_moe_or_nope(native, references, tmp_path):
    out = convert_native_to_hf(native("dense", world_size=2, fused=True), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["moe_layers"] == [] and config["no_rope_layers"] == [1] * 4
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_matches_meta(loaded, references["dense"], vision=False)


@pytest.mark.parametrize("model", ["text", "vision"])
def test_converted_checkpoint_loads_in_transformers_builtin(model, native, references, tmp_path):
    out = convert_native_to_hf(native(model), tmp_path / "hf")
    builtin = transformers.Llama4ForCausalLM if model == "text" else transformers.Llama4ForConditionalGeneration
    loaded, info = builtin.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert_matches_meta(loaded.eval(), references[model], vision=model == "vision")


# ----------------------------------------------------------------------------------------------------------------
# Config, files, dtypes


def test_config_and_files(native, tmp_path):
    out = convert_native_to_hf(native("vision", nested=True), tmp_path / "hf", instruct=True, max_shard_size="100KB")
    config = json.loads((out / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert config["model_type"] == "llama4" and config["architectures"] == ["Llama4ForConditionalGeneration"]
    assert (text["intermediate_size"], text["intermediate_size_mlp"], text["vocab_size"]) == (48, 176, VOCAB)
    assert text["moe_layers"] == [1, 3] and text["no_rope_layers"] == [1, 1, 1, 0]
    assert text["rope_parameters"] == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 16.0,  # Meta's defaults when params.json gives none
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    }
    assert (text["attention_chunk_size"], text["floor_scale"], text["use_qk_norm"]) == (8, 4, True)
    assert (vision["image_size"], vision["patch_size"], vision["intermediate_size"]) == (56, 14, 128)
    assert vision["vision_output_dim"] == vision["projector_input_dim"] == vision["projector_output_dim"] == 64
    # token ids come from the tokenizer (tiny here: its BPE tokens, then Meta's special tokens in order)
    assert (text["bos_token_id"], text["pad_token_id"], text["eos_token_id"]) == (BOS, BOS + 18, [EOS, EOM, EOT])
    assert config["image_token_index"] == BOS + 92
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [EOS, EOM, EOT] and generation["bos_token_id"] == BOS
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["image_processor"]["size"] == {"height": 56, "width": 56} and processor["patch_size"] == 14
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    assert not list(tmp_path.glob(".hf.partial-*"))


def test_base_checkpoint_stops_at_end_of_text(native, tmp_path):
    out = convert_native_to_hf(native("text", world_size=1, fused=False), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama4_text" and config["architectures"] == ["Llama4ForCausalLM"]
    assert (
        config["eos_token_id"] == EOS
        and json.loads((out / "generation_config.json").read_text())["eos_token_id"] == EOS
    )
    with safe_open(out / "model-00001-of-00001.safetensors", framework="pt") as weights:
        assert not any(key.startswith("language_model.") for key in weights.keys())


def test_scaled_rope_factors_from_params(native, tmp_path):
    directory = native("text", world_size=1, fused=False)
    params = json.loads((directory / "params.json").read_text())
    (directory / "params.json").write_text(
        json.dumps(dict(params, rope_scaling_factor=8.0, rope_high_freq_factor=4.0))
    )
    out = convert_native_to_hf(directory, tmp_path / "hf")
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == (8.0, 1.0, 4.0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_output_dtype(dtype, native, references, tmp_path):
    out = convert_native_to_hf(native("text"), tmp_path / "hf", dtype=dtype)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == getattr(torch, dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    if dtype == "float32":  # bfloat16 weights widen exactly
        assert_matches_meta(loaded.eval(), references["text"], vision=False)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear error naming the file, and no output


def _drop_params(d: Path) -> str:
    (d / "params.json").unlink()
    return "params.json"


def _drop_tokenizer(d: Path) -> str:
    (d / "tokenizer.model").unlink()
    return "tokenizer.model"


def _gap_in_shards(d: Path) -> str:
    (d / "consolidated.01.pth").rename(d / "consolidated.02.pth")
    return "consolidated.01.pth"


def _three_shards(d: Path) -> str:
    (d / "consolidated.02.pth").write_bytes((d / "consolidated.01.pth").read_bytes())
    return "cannot split n_heads = 4"


def _edit_shard(d: Path, edit) -> None:
    path = d / "consolidated.01.pth"
    with torch.serialization.safe_globals([io.BytesIO]):
        state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _unknown_key(d: Path) -> str:
    _edit_shard(d, lambda s: s.update({"layers.0.attention.wqkv.weight_scale": torch.ones(1)}))
    return "consolidated.01.pth does not match params.json: unknown 1 tensor(s): layers.0.attention.wqkv.weight_scale"


def _missing_key(d: Path) -> str:
    _edit_shard(d, lambda s: s.pop("layers.2.feed_forward.mlp.fc2_weight"))
    return "missing 1 tensor(s): layers.2.feed_forward.w2.weight"


def _wrong_shape(d: Path) -> str:
    _edit_shard(d, lambda s: s.update({"norm.weight": torch.ones(65)}))
    return "consolidated.01.pth: 'norm.weight' has shape (65,); params.json implies (64,)"


def _params_disagree(d: Path) -> str:
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps(dict(params, ffn_exp=3.0)))
    return "'layers.1.feed_forward.experts.w1' has shape (4, 64, 24); params.json implies (4, 64, 32) per shard"


def _params_vocab(d: Path) -> str:
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps(dict(params, vocab_size=1000)))
    return "vocab_size 1000"


def _corrupt_shard(d: Path) -> str:
    (d / "consolidated.00.pth").write_bytes(b"not a zip file")
    return "consolidated.00.pth"


def _damaged_shard(d: Path) -> str:
    """Bytes overwritten inside the largest tensor's storage: the file still loads, memory-mapped."""
    path = d / "consolidated.00.pth"
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    with open(path, "r+b") as file:
        file.seek(member.header_offset + member.file_size // 2)
        file.write(bytes(range(256)) * 16)
    return f"consolidated.00.pth is damaged ({member.filename}): Bad CRC-32"


def _non_finite_weight(d: Path) -> str:
    _edit_shard(d, lambda s: s["layers.1.feed_forward.experts.moe_w_in_eD_F"].view(-1)[7].fill_(float("nan")))
    return "language_model.model.layers.1.feed_forward.experts.gate_up_proj: non-finite weights"


def _missing_last_shard(d: Path) -> str:
    (d / "consolidated.01.pth").unlink()
    return "so the checkpoint has 2 shards; found 1, missing consolidated.01.pth"


def _missing_input_folder(d: Path) -> str:
    shutil.rmtree(d)
    return f"input folder {d} does not exist"


def _short_tokenizer(d: Path) -> str:
    lines = (d / "tokenizer.model").read_text().splitlines(keepends=True)
    (d / "tokenizer.model").write_text("".join(lines[:100]))
    return (
        f"tokenizer.model gives 2148 token ids (100 BPE ranks + 2048 special tokens), the token embedding has {VOCAB}"
    )


def _garbage_tokenizer(d: Path) -> str:
    (d / "tokenizer.model").write_bytes(bytes(range(256)))
    return "tokenizer.model is not a tiktoken BPE file"


def _empty_tokenizer(d: Path) -> str:
    (d / "tokenizer.model").write_bytes(b"")
    return "tokenizer.model gives 2048 token ids (0 BPE ranks"


def _edit_params(d: Path, **changes) -> None:
    params = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps(dict(params, **changes)))


def _string_kv_heads(d: Path) -> str:
    _edit_params(d, n_kv_heads="abc")
    return "params.json: `n_kv_heads` must be int or null, got 'abc'"


def _string_norm_eps(d: Path) -> str:
    _edit_params(d, norm_eps="1e-5", rope_theta="500000")
    return "params.json: `norm_eps` must be float, got '1e-5'"


def _bool_top_k(d: Path) -> str:
    _edit_params(d, moe_args=dict(TEXT_ARGS["moe_args"], top_k=True))
    return "params.json moe_args: `top_k` must be int, got True"


def _moe_args_list(d: Path) -> str:
    _edit_params(d, moe_args=[4, 1])
    return "params.json: `moe_args` must be an object, got [4, 1]"


def _non_utf8_params(d: Path) -> str:
    (d / "params.json").write_bytes((d / "params.json").read_bytes().replace(b"{", b'{"name": "\xff\xfe", ', 1))
    return "params.json is not valid UTF-8 JSON"


BAD_INPUTS = {
    f.__name__.strip("_"): f
    for f in (
        _drop_params,
        _drop_tokenizer,
        _gap_in_shards,
        _three_shards,
        _unknown_key,
        _missing_key,
        _wrong_shape,
        _params_disagree,
        _params_vocab,
        _corrupt_shard,
        _damaged_shard,
        _non_finite_weight,
        _missing_last_shard,
        _missing_input_folder,
        _short_tokenizer,
        _garbage_tokenizer,
        _empty_tokenizer,
        _string_kv_heads,
        _string_norm_eps,
        _bool_top_k,
        _moe_args_list,
        _non_utf8_params,
    )
}


def run_cli(argv: list[str], caplog) -> tuple[int, str]:
    """``llama4-convert`` in this process: its exit status and its one error line (an exception fails the test)."""
    caplog.clear()
    status = cli.main(argv)
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == (status != 0), errors
    return status, errors[0] if errors else ""


@pytest.mark.parametrize("break_input", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_fails_cleanly(break_input, native, tmp_path, caplog):
    """A one-line error (exit status 2, no traceback) naming the input, and nothing written."""
    directory = native("vision" if break_input is _non_finite_weight else "text", world_size=2, fused=True)
    expected = break_input(directory)
    status, error = run_cli(["--input", str(directory), "--output", str(tmp_path / "hf")], caplog)
    assert status == 2 and expected in error
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--max-position-embeddings", "-5"], "--max-position-embeddings must be positive, got -5"),
        (["--max-position-embeddings", "0"], "--max-position-embeddings must be positive, got 0"),
        (["--group-size", "64"], "--group-size applies with --quantize only"),
    ],
)
def test_bad_flags_fail_cleanly(flags, expected, native, tmp_path, caplog):
    status, error = run_cli(["--input", str(native("text")), "--output", str(tmp_path / "hf"), *flags], caplog)
    assert (status, error) == (2, expected) and not list(tmp_path.glob("*hf*"))


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "hf"


@pytest.mark.parametrize("output", [lambda tmp: Path("/proc/llama4-convert-test"), _under_a_file])
def test_unwritable_output_fails_cleanly(output, native, tmp_path, caplog):
    out = output(tmp_path)
    status, error = run_cli(["--input", str(native("text")), "--output", str(out)], caplog)
    assert status == 2 and error.startswith(f"cannot create the output folder {out}: ")


def test_disk_full_fails_cleanly(native, tmp_path, caplog, monkeypatch):
    def no_space(handle, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(handle.name))

    monkeypatch.setattr(writer_module, "_write_tensor_bytes", no_space)
    status, error = run_cli(["--input", str(native("text")), "--output", str(tmp_path / "hf")], caplog)
    assert status == 2 and error.startswith(f"writing {tmp_path / 'hf'} failed: [Errno 28] No space left on device")
    assert not list(tmp_path.glob("*hf*"))


def test_sigterm_removes_the_staging_folder(native, tmp_path, monkeypatch):
    original = ShardedSafetensorsWriter.write

    def terminated_write(self, name, chunks):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` would, mid-conversion
        return original(self, name, chunks)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", terminated_write)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--input", str(native("text")), "--output", str(tmp_path / "hf")])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert not list(tmp_path.glob("*hf*"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_stale_staging_folders_are_removed_or_reported(native, tmp_path, caplog):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
    dead = tmp_path / f".hf.partial-{finished.stdout.strip()}@{host}-0123abcd"
    alive = tmp_path / f".hf.partial-{os.getpid()}@{host}-4567abcd"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    status, _ = run_cli(["--input", str(native("text")), "--output", str(tmp_path / "hf")], caplog)
    assert status == 0 and not dead.exists() and alive.exists()
    assert f"{alive} belongs to process {os.getpid()} on {host}" in caplog.text


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"attention_chunk_size": 0}, "attention_chunk_size must be positive or null (no chunking), got 0"),
        ({"floor_scale": 0}, "floor_scale must be a finite positive number, got 0"),
        ({"rope_scaling_factor": 0}, "rope_scaling_factor must be a finite number >= 1, got 0"),
        ({"rope_high_freq_factor": -1}, "rope_high_freq_factor must be a finite number >= 1.0, got -1"),
        ({"rope_theta": float("inf")}, "rope_theta must be a finite positive number, got inf"),
        ({"rope_theta": float("nan")}, "rope_theta must be a finite positive number, got nan"),
        ({"rope_theta": 0}, "rope_theta must be a finite positive number, got 0"),
        ({"norm_eps": float("inf")}, "norm_eps must be a finite positive number, got inf"),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else "",
)
def test_values_only_the_model_config_rejected_fail_cleanly(changes, expected, native, tmp_path, caplog):
    """params.json values that once passed the converter's checks and ended in a traceback from the config."""
    directory = native("text")
    _edit_params(directory, **changes)  # json.dumps writes inf and nan as Infinity and NaN, which json reads back
    status, error = run_cli(["--input", str(directory), "--output", str(tmp_path / "hf")], caplog)
    assert status == 2 and error == f"{directory / 'params.json'}: {expected}"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"pixel_shuffle_ratio": 0}, "vision_args.pixel_shuffle_ratio must be in (0, 1]"),
        ({"pixel_shuffle_ratio": 0.3}, "turn the 4 patches per side into a whole number, got 0.3"),
        ({"patch_size": 0}, "vision_args.patch_size must be positive, got 0"),
        ({"n_heads": 0}, "vision_args.n_heads must be positive, got 0"),
        ({"mlp_ratio": float("inf")}, "vision_args.mlp_ratio must be a finite positive number, got inf"),
    ],
)
def test_bad_vision_args_are_conversion_errors(changes, expected):
    """Vision values that used to end in a ZeroDivisionError or a config traceback."""
    params = dict(VISION_ARGS, vision_args=dict(VISION_ARGS["vision_args"], **changes))
    with pytest.raises(ConversionError, match=r"^params\.json: .*" + re.escape(expected)):
        NativeArgs.from_dict(params)


def test_installed_command_fails_with_one_line_and_removes_the_folders_it_made(native, tmp_path):
    """`llama4-convert` as a user runs it: a bad value in params.json gives exit 2, one error line and no
    traceback; a run that fails after it created `new/a/b` for `--output new/a/b/out` leaves no `new`."""
    command = Path(sys.executable).with_name("llama4-convert")
    directory = native("vision")
    _non_finite_weight(directory)
    _edit_params(directory, rope_theta=float("inf"))
    bad_theta = subprocess.run(
        [command, "--input", directory, "--output", tmp_path / "new" / "a" / "b" / "out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad_theta.returncode == 2 and "Traceback" not in bad_theta.stderr, bad_theta.stderr
    assert "rope_theta must be a finite positive number, got inf" in bad_theta.stderr
    _edit_params(directory, rope_theta=500000.0)
    nan_weight = subprocess.run(
        [command, "--input", directory, "--output", tmp_path / "new" / "a" / "b" / "out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert nan_weight.returncode == 2 and "non-finite weights" in nan_weight.stderr, nan_weight.stderr
    assert not (tmp_path / "new").exists()


def test_failed_run_keeps_parent_folders_that_were_there(native, tmp_path, caplog):
    (tmp_path / "new" / "a").mkdir(parents=True)
    directory = native("vision")
    _non_finite_weight(directory)
    status, _ = run_cli(["--input", str(directory), "--output", str(tmp_path / "new" / "a" / "b" / "out")], caplog)
    assert status == 2 and (tmp_path / "new" / "a").is_dir() and not (tmp_path / "new" / "a" / "b").exists()


def _non_utf8_config(hf: Path) -> str:
    (hf / "config.json").write_bytes((hf / "config.json").read_bytes().replace(b"{", b'{"name": "\xff\xfe", ', 1))
    return f"{hf / 'config.json'} is not valid UTF-8 JSON"


def _invalid_json_config(hf: Path) -> str:
    (hf / "config.json").write_text('{"model_type": "llama4_text",')
    return f"{hf / 'config.json'} is not valid UTF-8 JSON"


def _list_config(hf: Path) -> str:
    (hf / "config.json").write_text("[]")
    return f"{hf / 'config.json'} must hold a JSON object, got list"


def _edit_config(hf: Path, **changes) -> None:
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(config, **changes)))


def _infinite_rope_theta_config(hf: Path) -> str:
    config = json.loads((hf / "config.json").read_text())
    _edit_config(hf, rope_parameters=dict(config["rope_parameters"], rope_theta=float("inf")))
    return "`rope_parameters['rope_theta']` = inf"


def _zero_chunk_config(hf: Path) -> str:
    _edit_config(hf, attention_chunk_size=0)
    return "`attention_chunk_size` = 0"


def _nan_weight_file(hf: Path) -> str:
    from safetensors.torch import load_file, save_file

    path = sorted(hf.glob("*.safetensors"))[0]
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name].view(-1)[3] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    return f"{path.name}: {name!r} has non-finite weights (NaN or infinity)"


@pytest.mark.parametrize(
    "break_checkpoint",
    [
        _non_utf8_config,
        _invalid_json_config,
        _list_config,
        _infinite_rope_theta_config,
        _zero_chunk_config,
        _nan_weight_file,
    ],
)
def test_to_native_bad_checkpoint_fails_cleanly(break_checkpoint, native, tmp_path, caplog):
    hf = convert_native_to_hf(native("text"), tmp_path / "hf", dtype="float32")
    expected = break_checkpoint(hf)
    status, error = run_cli(["--to-native", "--input", str(hf), "--output", str(tmp_path / "native")], caplog)
    assert status == 2 and expected in error
    assert not (tmp_path / "native").exists() and not list(tmp_path.glob(".native*"))


def _drop_weights_file(path: Path) -> str:
    path.unlink()
    return f"missing {path}"


def _truncate_weights_file(path: Path) -> str:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return f"cannot read {path} as safetensors (truncated or damaged?)"


@pytest.mark.parametrize("break_file", [_drop_weights_file, _truncate_weights_file])
def test_to_native_bad_weights_fail_cleanly(break_file, native, tmp_path, caplog):
    hf = convert_native_to_hf(native("text"), tmp_path / "hf", max_shard_size="150KB")
    expected = break_file(sorted(hf.glob("*.safetensors"))[1])
    status, error = run_cli(["--to-native", "--input", str(hf), "--output", str(tmp_path / "native")], caplog)
    assert status == 2 and expected in error
    assert not (tmp_path / "native").exists() and not list(tmp_path.glob(".native*"))


def test_single_unnumbered_shard(native, references, tmp_path):
    directory = native("text", world_size=1)
    (directory / "consolidated.00.pth").rename(directory / "consolidated.pth")
    out = convert_native_to_hf(directory, tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert_matches_meta(loaded, references["text"], vision=False)
    (directory / "consolidated.01.pth").write_bytes(b"")
    with pytest.raises(ConversionError, match="both consolidated.pth and numbered shards"):
        convert_native_to_hf(directory, tmp_path / "hf2")


def test_non_empty_output_is_left_alone_unless_overwrite(native, tmp_path):
    directory, out = native("text"), tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="is not empty"):
        convert_native_to_hf(directory, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert_native_to_hf(directory, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / INDEX_FILE).is_file()
    assert not list(tmp_path.glob(".hf.*"))
    with pytest.raises(ConversionError, match="must not be, contain or lie inside the input"):
        convert_native_to_hf(directory, directory / "hf")


def test_failure_while_writing_leaves_no_output(native, tmp_path, monkeypatch):
    """An interrupted run (here: an error after the first tensors) leaves neither output nor staging folder."""
    original = ShardedSafetensorsWriter.write
    calls = []

    def failing_write(self, name, chunks):
        calls.append(name)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return original(self, name, chunks)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        convert_native_to_hf(native("text"), tmp_path / "hf")
    assert len(calls) == 10 and not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_cli(native, tmp_path, caplog):
    directory = native("text")
    args = ["--input", str(directory), "--output", str(tmp_path / "hf"), "--dtype", "float32"]
    assert cli.main([*args, "--instruct", "--max-shard-size", "50KB"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == [EOS, EOM, EOT]
    assert cli.main(args) == 2 and "is not empty" in caplog.text
    assert cli.main([*args[:2], "--output-dir", str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    # the former flag names still work (--help lists them beside the short ones: tests/test_cli.py)
    assert cli.main(["--input-dir", str(directory), "--output-dir", str(tmp_path / "old")]) == 0


def test_verify_flag(native, tmp_path, monkeypatch):
    """--verify runs in a child process: the converting process starts no process group and keeps Tensor.cuda."""
    script = (
        "import sys, torch; from conversion.convert import convert_native_to_hf; cuda = torch.Tensor.cuda; "
        "convert_native_to_hf(sys.argv[1], sys.argv[2], verify=True); "
        "print(torch.distributed.is_initialized(), torch.Tensor.cuda is cuda)"
    )
    command = [sys.executable, "-c", script, str(native("vision")), str(tmp_path / "hf")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.stdout.split() == ["False", "True"], result.stderr[-3000:]
    assert "logits and image features match Meta's reference" in result.stderr
    assert (tmp_path / "hf" / INDEX_FILE).is_file()
    from conversion import verify

    monkeypatch.setattr(verify, "TOLERANCE", -1.0)  # any difference now fails verification
    with pytest.raises(ConversionError, match="verification of .* failed: logits differ from Meta's reference by"):
        convert_native_to_hf(native("text"), tmp_path / "hf2", verify=True)
    assert not (tmp_path / "hf2").exists()
    with pytest.raises(ConversionError, match="failed: .* does not load: "):
        verify_conversion(tmp_path, native("text", world_size=1), "bfloat16")  # no checkpoint there


# ----------------------------------------------------------------------------------------------------------------
# HF -> native


@pytest.mark.parametrize("model", ["vision", "dense"])
def test_round_trip_is_bit_exact(model, native, references, tokenizer_model, tmp_path):
    directory = native(model, world_size=2, fused=True)
    hf = convert_native_to_hf(directory, tmp_path / "hf")
    back = convert_hf_to_native(hf, tmp_path / "native")
    state = torch.load(back / "consolidated.00.pth", weights_only=True)
    expected = native_state(references[model])
    assert state.keys() == expected.keys()
    assert all(state[k].dtype == expected[k].dtype and torch.equal(state[k], expected[k]) for k in expected)
    assert (back / "tokenizer.model").read_bytes() == tokenizer_model.read_bytes()
    # Meta builds the same model from the written params.json and loads the shard strictly
    params = json.loads((back / "params.json").read_text())
    rebuilt = build_reference(dict(params, max_seq_len=64), seed=5).float()
    rebuilt.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    ids = tokens()
    assert torch.equal(reference_logits(rebuilt, ids), reference_logits(references[model], ids))
    # and HF -> native -> HF gives the same tensors and config
    again = convert_native_to_hf(back, tmp_path / "hf2")
    assert json.loads((again / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    for name, file in json.loads((hf / INDEX_FILE).read_text())["weight_map"].items():
        with safe_open(hf / file, framework="pt") as a, safe_open(again / file, framework="pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name))


def test_to_native_from_a_transformers_checkpoint(tmp_path):
    """A checkpoint saved by transformers (one model.safetensors, sizes no params.json produced) goes native."""
    config = modeling_llama4.Llama4TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=40,
        intermediate_size_mlp=100,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=3,
        interleave_moe_layer_step=2,
        no_rope_layer_interval=2,
        attention_chunk_size=None,
        use_qk_norm=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = modeling_llama4.Llama4ForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "hf")
    back = convert_hf_to_native(tmp_path / "hf", tmp_path / "native", dtype="float32")
    params = json.loads((back / "params.json").read_text())
    meta = build_reference(dict(params, max_seq_len=64), seed=5).float()
    meta.load_state_dict(torch.load(back / "consolidated.00.pth", weights_only=True), strict=True)
    ids = tokens()
    with torch.no_grad():
        assert max_diff(model(ids).logits, reference_logits(meta, ids)) <= 1e-3
    assert not (back / "tokenizer.model").exists()  # the HF folder had no tokenizer.json


@pytest.mark.parametrize(
    "dim, moe_hidden, dense_hidden",
    [(64, 48, 176), (5120, 8192, 16384), (5120, None, 13824), (96, 37, 250), (64, 1000, 7), (4096, 14336, 14336)],
)
def test_params_from_config_reproduce_sizes(dim, moe_hidden, dense_hidden):
    ffn = solve_ffn_args(dim, moe_hidden, dense_hidden)
    assert dense_hidden_dim(dim, ffn.ffn_dim_multiplier, ffn.multiple_of) == dense_hidden
    if moe_hidden is not None:
        got = moe_hidden_dim(
            dim, ffn.ffn_exp, ffn.ffn_dim_multiplier, ffn.multiple_of, ffn.auto_scale_F, ffn.capacity_factor
        )
        assert got == moe_hidden


def test_params_from_config_rejects_what_meta_cannot_express():
    config = modeling_llama4.Llama4TextConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=4,
        moe_layers=[0, 3],
    )
    with pytest.raises(ConversionError, match="moe_layers selects layers"):
        native_args_from_config(config)
    args = NativeArgs.from_dict(TEXT_ARGS)
    assert args.moe_hidden_dim == 48 and args.dense_hidden_dim == 176


# ----------------------------------------------------------------------------------------------------------------
# Streaming pieces


def test_concat_row_blocks_equals_cat():
    pieces = [torch.randn(5, 3, 4), torch.randn(5, 3, 2), torch.randn(5, 3, 4)]
    for max_bytes in (1, 100, 10**6):
        assert torch.equal(torch.cat(list(concat_row_blocks(pieces, 2, max_bytes))), torch.cat(pieces, dim=2))
        rows = [p.transpose(0, 2).contiguous() for p in pieces]
        assert torch.equal(torch.cat(list(concat_row_blocks(rows, 0, max_bytes))), torch.cat(rows))


def test_streaming_writer_reads_back(tmp_path):
    tensors = {f"t{i}": torch.randn(3 + i, 5).to(torch.bfloat16) for i in range(6)}
    entries = [TensorEntry(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with ShardedSafetensorsWriter(tmp_path, entries, max_file_bytes=50) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor.split(2))
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) == 6
    for name, tensor in tensors.items():
        with safe_open(tmp_path / weight_map[name], framework="pt") as f:
            assert torch.equal(f.get_tensor(name), tensor)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("123") == 123


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and processor, with Meta's real tokenizer.model


@pytest.mark.slow
def test_tokenizer_and_processor_match_meta(tmp_path):
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama4.args import ModelArgs
    from llama_models.llama4.chat_format import ChatFormat
    from llama_models.llama4.tokenizer import Tokenizer
    from PIL import Image

    from modeling_llama4.processing_llama4 import Llama4Processor
    from modeling_llama4.tokenization_llama4 import default_tokenizer_model_path

    real = default_tokenizer_model_path()
    args = dict(VISION_ARGS, vocab_size=202048)  # the real tokenizer's size
    directory = write_native(tmp_path / "n", args, native_state(make_reference(args)), real)
    out = convert_native_to_hf(directory, tmp_path / "hf", instruct=True)
    config = json.loads((out / "config.json").read_text())["text_config"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        200000,
        [200001, 200007, 200008],
        200018,
    )

    meta_tokenizer = Tokenizer(real)
    meta_args = ModelArgs(**args)
    chat = ChatFormat(meta_tokenizer, vision_args=meta_args.vision_args, max_num_chunks=16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello, world! It's  a test:\n\tcode = 42"
    assert tokenizer(text)["input_ids"] == meta_tokenizer.encode(text, bos=True, eos=False)
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi there\n"}]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    meta = chat.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in messages])
    assert ours == meta.tokens

    processor = Llama4Processor.from_pretrained(out)
    image = Image.fromarray(torch.randint(0, 256, (40, 130, 3), dtype=torch.uint8).numpy())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    ours = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    raw = [RawMessage(role="user", content=[RawMediaItem(data=buffer.getvalue()), RawTextItem(text="What?")])]
    meta = chat.encode_dialog_prompt(raw)
    assert ours["input_ids"][0] == meta.tokens
    assert torch.equal(torch.as_tensor(ours["pixel_values"]), torch.cat(meta.images))
