"""Llama 4 for the Hugging Face stack.

Importing this package registers its configs, models, tokenizer, image processor, processor and int4
quantizer with transformers under the model types ``llama4``, ``llama4_text`` and ``llama4_vision_model``,
replacing transformers' built-in Llama 4 entries (logged at debug level). It also marks the classes for
``save_pretrained`` to write their code and an ``auto_map``, so saved checkpoints load with
``trust_remote_code=True`` where this package is not installed, and gives its model classes the package's saving
(Hub files) and per-rank sharded loading (``package_methods``), which the saved code goes without.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.utils import logging

from . import package_methods
from .adapters import enable_expert_lora
from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from .image_processing_llama4 import Llama4ImageProcessor
from .modeling_llama4 import (
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4PreTrainedModel,
    Llama4TextModel,
)
from .processing_llama4 import Llama4Processor, build_processor
from .quantization_int4 import Llama4Int4Config
from .tokenization_llama4 import Llama4Tokenizer, build_tokenizer, default_tokenizer_model_path
from .vision import Llama4VisionModel

logger = logging.get_logger(__name__)

# (Auto class, config class, our class): `exist_ok` because transformers has a built-in Llama 4.
_MODELS = [
    (AutoModel, Llama4TextConfig, Llama4TextModel),
    (AutoModel, Llama4VisionConfig, Llama4VisionModel),
    (AutoModel, Llama4Config, Llama4ForConditionalGeneration),
    (AutoModelForCausalLM, Llama4TextConfig, Llama4ForCausalLM),
    (AutoModelForCausalLM, Llama4Config, Llama4ForConditionalGeneration),
    (AutoModelForImageTextToText, Llama4Config, Llama4ForConditionalGeneration),
    (AutoModelForMultimodalLM, Llama4Config, Llama4ForConditionalGeneration),
]


def _register() -> None:
    """Point the Auto classes at this package and mark its classes to be saved as Hub remote code."""
    for config_class in (Llama4Config, Llama4TextConfig, Llama4VisionConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class()
    for auto_class, config_class, model_class in _MODELS:
        auto_class.register(config_class, model_class, exist_ok=True)
    Llama4ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    Llama4ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    for config_class in (Llama4Config, Llama4TextConfig):
        AutoTokenizer.register(config_class, tokenizer_class=Llama4Tokenizer, exist_ok=True)
    image_processors = {"torchvision": Llama4ImageProcessor, "pil": Llama4ImageProcessor}
    AutoImageProcessor.register(Llama4Config, image_processor_classes=image_processors, exist_ok=True)
    AutoProcessor.register(Llama4Config, Llama4Processor, exist_ok=True)
    Llama4ImageProcessor.register_for_auto_class("AutoImageProcessor")
    Llama4Processor.register_for_auto_class("AutoProcessor")
    package_methods.install(Llama4PreTrainedModel)
    logger.debug("modeling_llama4: registered in the transformers Auto classes, replacing the built-in Llama 4")


_register()
enable_expert_lora()  # PEFT's LoRA on our routed experts: the per-expert layer (modeling_llama4.adapters)

__all__ = [
    "Llama4Config",
    "Llama4TextConfig",
    "Llama4VisionConfig",
    "Llama4PreTrainedModel",
    "Llama4TextModel",
    "Llama4VisionModel",
    "Llama4ForCausalLM",
    "Llama4ForConditionalGeneration",
    "Llama4ImageProcessor",
    "Llama4Processor",
    "Llama4Tokenizer",
    "Llama4Int4Config",
    "build_processor",
    "build_tokenizer",
    "default_tokenizer_model_path",
]
