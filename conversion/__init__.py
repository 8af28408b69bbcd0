"""Meta's native Llama 4 checkpoints ⇄ Hugging Face format (``llama4-convert``).

Native → HF follows the data:

- ``params``: params.json, parsed and checked as Meta's code would; ``hf_config``: those args ⇄ config.json.
- ``native``: the shards, found and checked against params.json, read one layer at a time (fused names unfused,
  bytes checked against their CRCs).
- ``mapping``: native tensor names and layouts → HF ones.
- ``writer``: a staging folder published when complete, and a streaming writer of sharded safetensors files.
- ``convert``: the pipeline (tokenizer or processor, configs, weights, Hub files); ``quantize``: ``--quantize``.

HF → native is ``to_native``; ``verify`` runs ``--verify`` in a subprocess; ``cli`` is the command line.

This module and ``cli`` import only the standard library, so ``llama4-convert --help`` and a mistyped flag answer at
once; torch, transformers and ``modeling_llama4`` load when a conversion runs.
"""

# Context length written to config.json when the caller gives none: transformers' value for the base checkpoints.
# Here, not in ``params``, so that ``--help`` shows it without importing the model code.
DEFAULT_MAX_POSITION_EMBEDDINGS = 256 * 1024


class ConversionError(ValueError):
    """A checkpoint, a params.json or an output folder the converter cannot work with; the message names the file."""
