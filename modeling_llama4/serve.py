"""``llama4-serve``: transformers' OpenAI-compatible server (``transformers serve``, same options) on this package's
model, for the folders ``transformers serve`` cannot give it.

A multimodal folder (``model_type`` ``llama4``) needs none of this: ``transformers serve --trust-remote-code`` loads
it with ``AutoModelForMultimodalLM``, which the folder's ``auto_map`` points at its own copy of this package's model.
A text-only folder (``llama4_text``) it loads as ``getattr(transformers, config.architectures[0])``, transformers'
built-in ``Llama4ForCausalLM``, whatever the folder's ``auto_map`` or any registration says; and it batches only text
models (``--continuous-batching``). ``llama4-serve`` is ``transformers serve`` with one change: a text-only folder
loads with ``AutoModelForCausalLM``, i.e. this package's ``Llama4ForCausalLM``.

It needs transformers >= 5.25, whose ``Serve`` keeps its model loader (``ModelLoader``) in an attribute: 5.24's
builds its model manager and runs the server inside ``Serve.__init__``, leaving no way in without patching it.
"""

from __future__ import annotations

import sys
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM
from transformers import __version__ as transformers_version
from transformers.utils import logging

from .configuration_llama4 import Llama4TextConfig

try:
    from transformers.cli.serve import Serve
    from transformers.cli.serving.model_manager import ModelLoader
    from transformers.cli.serving.utils import parse_model_id
except ImportError as error:  # transformers 5.24: serve has no ModelLoader
    raise ImportError(
        f"llama4-serve needs transformers >= 5.25 (this is {transformers_version}): 5.24's serve "
        "loads its models inside Serve.__init__. There, serve a multimodal folder with "
        "`transformers serve --trust-remote-code`"
    ) from error

__all__ = ["Llama4ModelLoader", "Llama4Serve", "main"]

logger = logging.get_logger(__name__)


class Llama4ModelLoader(ModelLoader):
    """serve's model loader, with a ``llama4_text`` folder loaded by ``AutoModelForCausalLM``: this package's
    ``Llama4ForCausalLM`` (the installed class: a registered class wins over the folder's remote code)."""

    def _load_model(self, model_id: str, tqdm_class: type | None = None, progress_callback: Any = None):
        repo, revision, gguf_file = parse_model_id(model_id)
        config = AutoConfig.from_pretrained(repo, revision=revision, trust_remote_code=self.trust_remote_code)
        if gguf_file is not None or config.model_type != Llama4TextConfig.model_type:
            return super()._load_model(model_id, tqdm_class=tqdm_class, progress_callback=progress_callback)
        logger.info("Loading %s with AutoModelForCausalLM: this package's Llama4ForCausalLM", model_id)
        options = dict(
            revision=revision,
            attn_implementation=self.attn_implementation,
            dtype=self.dtype,
            device_map=self.device,
            trust_remote_code=self.trust_remote_code,
            tqdm_class=tqdm_class,
        )
        quantization_config = self.get_quantization_config()
        if quantization_config is not None:
            options["quantization_config"] = quantization_config
        return AutoModelForCausalLM.from_pretrained(repo, **options)


class Llama4Serve(Serve):
    """transformers serve on this package's Llama 4: the same options and OpenAI-compatible API, with text-only
    (llama4_text) folders loaded as this package's Llama4ForCausalLM, not transformers' built-in one."""

    @property
    def loader(self) -> Llama4ModelLoader:
        return self._llama4_loader

    @loader.setter
    def loader(self, loader: ModelLoader) -> None:
        """``Serve.__init__`` sets transformers' loader: ours takes its settings."""
        ours = Llama4ModelLoader.__new__(Llama4ModelLoader)
        ours.__dict__.update(vars(loader))
        self._llama4_loader = ours


def main() -> None:
    """The ``llama4-serve`` console script: ``transformers serve``'s command line, on ``Llama4Serve``."""
    from huggingface_hub import typer_factory

    app = typer_factory(help="transformers serve, on this package's Llama 4")
    app.command(name="serve")(Llama4Serve)
    app.commands["serve"].main(args=sys.argv[1:], prog_name="llama4-serve")


if __name__ == "__main__":
    main()
