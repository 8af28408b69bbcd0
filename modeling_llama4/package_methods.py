"""What the installed package adds to its model classes, and a folder's remote-code copy of them goes without.

A saved folder ships the modules its ``auto_map`` names and what they import (``hub.code_files``): the model, not
the toolbox. The two methods here need the toolbox (the Hub upload, per-rank sharded loading), so ``modeling_llama4``
(the model file) does not define them; ``import modeling_llama4`` installs them on ``Llama4PreTrainedModel``, the
package's own class, through :func:`install`. Without the package (remote code), loading and saving are
transformers' own.
"""

from __future__ import annotations

from transformers.modeling_utils import PreTrainedModel

from .hub import HUB_OPTIONS, push_folder, save_hub_files
from .sharded_loading import rank_state_dict


def save_pretrained(
    self: PreTrainedModel, save_directory, *args, is_main_process: bool = True, push_to_hub: bool = False, **kwargs
) -> None:
    """Save as transformers does, plus what makes the folder a Hub repository (``hub.save_hub_files``): the code,
    a complete ``auto_map`` and a model card. With ``push_to_hub`` the folder is uploaded once it is complete, with
    the card naming the repository (transformers' own push would upload its generic card before ours exists)."""
    hub_options = {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}
    PreTrainedModel.save_pretrained(self, save_directory, *args, is_main_process=is_main_process, **kwargs)
    if is_main_process:
        save_hub_files(save_directory, self.config, name=hub_options.get("repo_id") if push_to_hub else None)
        if push_to_hub:
            push_folder(save_directory, token=kwargs.get("token"), **hub_options)


def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
    """transformers' loading, except that under a device mesh each rank reads only its slices of the safetensors
    files (``sharded_loading``: transformers' memory-mapped reads make every page an inner-dim slice touches
    resident in every rank). Overrides a private method (``modeling_llama4.upstream``)."""
    with rank_state_dict(state_dict, checkpoint_files, load_config) as state_dict:
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)


def install(model_class: type[PreTrainedModel]) -> None:
    """Give ``model_class`` (this package's base model class) the package's saving and loading."""
    model_class.save_pretrained = save_pretrained
    model_class._load_pretrained_model = staticmethod(_load_pretrained_model)
