"""Llama 4 for the Hugging Face stack.

Importing this package registers its configs, models, tokenizer and processors in the transformers Auto*
registries under the model types ``llama4``, ``llama4_text`` and ``llama4_vision_model``, replacing
transformers' built-in Llama 4 entries (logged at debug level).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.utils import logging

from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from .modeling_llama4 import Llama4ForCausalLM, Llama4PreTrainedModel, Llama4TextModel

logger = logging.get_logger(__name__)


def _register() -> None:
    """Point the Auto classes at this package's classes (``exist_ok``: the built-in Llama 4 is replaced)."""
    for config_class in (Llama4Config, Llama4TextConfig, Llama4VisionConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(Llama4TextConfig, Llama4TextModel, exist_ok=True)
    AutoModelForCausalLM.register(Llama4TextConfig, Llama4ForCausalLM, exist_ok=True)
    logger.debug("modeling_llama4: registered in the transformers Auto classes, replacing the built-in Llama 4")


_register()

__all__ = [
    "Llama4Config",
    "Llama4TextConfig",
    "Llama4VisionConfig",
    "Llama4PreTrainedModel",
    "Llama4TextModel",
    "Llama4ForCausalLM",
]
