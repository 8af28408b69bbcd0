"""The model card (README.md) written beside a saved Llama 4 checkpoint."""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig

_TEMPLATE = """---
library_name: transformers
pipeline_tag: {pipeline_tag}
tags:
- llama4
- mixture-of-experts
license: other
---

# {name}

A Llama 4 checkpoint in the official Hugging Face format, written by
[modeling_llama4](https://pypi.org/project/modeling-llama4/).

| | |
| --- | --- |
| architecture | `{architecture}` |
| layers | {layers} ({moe_layers} MoE, {nope_layers} NoPE) |
| hidden size / heads / kv heads | {hidden} / {heads} / {kv_heads} |
| experts | {experts} routed (top-{top_k}) + 1 shared, expert hidden size {expert_hidden} |
| vocabulary | {vocab} |
| attention chunk | {chunk} |
| vision | {vision} |
| parameters | {parameters} |
| quantization | {quantization} |

## Load

```python
# with the package installed (`pip install modeling-llama4`, then `import modeling_llama4`), or with
# trust_remote_code=True: the modeling code is saved beside the weights.
from transformers import {auto_class}

model = {auto_class}.from_pretrained("{name}", trust_remote_code=True)
```

{compatibility}

## Provenance

Converted from Meta's native checkpoint with `llama4-convert`, or saved from a model built with this package.

## License

TODO: fill in. Llama 4 weights are released under the Llama 4 Community License Agreement; state the license
that applies to these weights and to any fine-tuning data.
"""


BUILTIN_NOTE = "The same files load in transformers' built-in Llama 4 and in vLLM (`vllm serve <this folder>`)."
QUANTIZED_NOTE = "The quantized weights load with this package's code only (installed, or `trust_remote_code=True`)."


def write_model_card(
    save_directory: str | Path, config: PretrainedConfig, num_parameters: int, name: str | None = None
) -> None:
    """Write ``README.md`` describing the checkpoint, unless one is already there.

    ``num_parameters`` counts the weights of the unquantized model (``hub.parameter_count``); ``name`` titles the
    card (default: the folder's name).
    """
    path = Path(save_directory) / "README.md"
    if path.exists():
        return
    text = config.get_text_config()
    vision = getattr(config, "vision_config", None)
    vision_line = "none (text only)"
    if vision is not None:
        vision_line = (
            f"ViT, {vision.num_hidden_layers} layers, hidden {vision.hidden_size}, "
            f"{vision.image_size} px tiles of {vision.patch_size} px patches"
        )
    multimodal = vision is not None
    quantization = _quantization(config)
    path.write_text(
        _TEMPLATE.format(
            name=name or Path(save_directory).resolve().name,
            pipeline_tag="image-text-to-text" if multimodal else "text-generation",
            architecture=(config.architectures or ["?"])[0],
            layers=text.num_hidden_layers,
            moe_layers=len(text.moe_layers),
            nope_layers=text.no_rope_layers.count(0),
            hidden=text.hidden_size,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads,
            experts=text.num_local_experts,
            top_k=text.num_experts_per_tok,
            expert_hidden=text.intermediate_size,
            vocab=text.vocab_size,
            chunk=text.attention_chunk_size or "none",
            vision=vision_line,
            parameters=f"{num_parameters:,}",
            quantization=quantization or "none",
            compatibility=QUANTIZED_NOTE if quantization else BUILTIN_NOTE,
            auto_class="AutoModelForImageTextToText" if multimodal else "AutoModelForCausalLM",
        )
    )


def _quantization(config: PretrainedConfig) -> str | None:
    """``"int4 (group_size=128)"``-like summary of config.json's ``quantization_config``, or None."""
    settings = getattr(config, "quantization_config", None)
    if settings is None:
        return None
    settings = settings if isinstance(settings, dict) else settings.to_dict()
    details = ", ".join(f"{key}={value}" for key, value in sorted(settings.items()) if key != "quant_method")
    return f"{settings.get('quant_method', '?')} ({details})" if details else str(settings.get("quant_method", "?"))
