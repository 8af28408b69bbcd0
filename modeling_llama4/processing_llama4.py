# Copyright 2026 The modeling_llama4 Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Llama 4 multimodal processor: the tokenizer, the image processor and Meta's chat format in one object.

The chat template writes one `<|image|>` placeholder per image part. `Llama4Processor.__call__` runs the image
processor and expands each placeholder into the token layout Meta's `ChatFormat._encode_image` gives that image's
tile grid (`llama_models/llama4/chat_format.py`):

- one tile: `<|image_start|><|image|>` + `<|patch|>` x N + `<|image_end|>`
- rows x cols tiles: `<|image_start|>`, then row by row `<|patch|>` x N per tile with `<|tile_x_separator|>` between the
  tiles of a row and `<|tile_y_separator|>` after each row, then `<|image|>` + `<|patch|>` x N for the global view, then
  `<|image_end|>`

with N = (tile_size / patch_size)^2 * pixel_shuffle_ratio^2 tokens per tile. The model writes the vision features
over the `<|patch|>` tokens, in order.

`apply_chat_template(..., tokenize=True)` encodes message text as plain text, as the tokenizer does
(`tokenization_llama4`): an `<|image|>` or `<|patch|>` typed in a message is text, neither a placeholder nor an image
token. Only the placeholders the template writes for image parts are expanded.
"""

from __future__ import annotations

from pathlib import Path

from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import ProcessorMixin

from .image_processing_llama4 import Llama4ImageProcessor
from .tokenization_llama4 import (
    PLAIN_TEXT_MARKER,
    Llama4Tokenizer,
    build_tokenizer,
    default_tokenizer_model_path,
    load_chat_template,
    split_plain_text,
)

__all__ = ["Llama4Processor", "build_processor"]

# The processor's own settings, saved in processor_config.json.
PROCESSOR_SETTINGS = ("patch_size", "pixel_shuffle_ratio")
# Stands in for each character of message text while the placeholders are counted and expanded.
HIDDEN_TEXT = "\U000f00fe"


def _hide_message_text(chat: str) -> str:
    """`chat` with each marked message text overwritten by as many `HIDDEN_TEXT`: same length, no placeholders."""
    return PLAIN_TEXT_MARKER.join(
        HIDDEN_TEXT * len(text) if is_message_text else text for text, is_message_text in split_plain_text(chat)
    )


def _restore_message_text(hidden: str, chat: str) -> str:
    """`hidden` (expanded) with the message texts of `chat`, in order, where `_hide_message_text` overwrote them."""
    texts = iter(text for text, is_message_text in split_plain_text(chat) if is_message_text)
    pieces = split_plain_text(hidden)
    return PLAIN_TEXT_MARKER.join(next(texts) if is_message_text else text for text, is_message_text in pieces)


class Llama4Processor(ProcessorMixin):
    """Tokenizer + image processor for Llama 4, expanding `<|image|>` placeholders into Meta's image token layout.

    Args:
        image_processor: a `Llama4ImageProcessor`; its `size["height"]` is the tile size.
        tokenizer: the Llama 4 tokenizer (`build_tokenizer`).
        chat_template: Jinja chat template; Meta's chat format (`chat_template.jinja`) when omitted.
        patch_size: the vision encoder's patch size in pixels (`vision_args.patch_size`).
        pixel_shuffle_ratio: the vision adapter's pixel shuffle ratio; each tile becomes
            `(tile_size / patch_size)^2 * pixel_shuffle_ratio^2` `<|patch|>` tokens.
    """

    # Batched generation pads on the left, so every prompt ends where generation starts.
    text_kwargs = {"padding_side": "left"}

    image_token = "<|image|>"
    image_start_token = "<|image_start|>"
    image_end_token = "<|image_end|>"
    patch_token = "<|patch|>"
    tile_x_separator_token = "<|tile_x_separator|>"
    tile_y_separator_token = "<|tile_y_separator|>"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        patch_size: int = 14,
        pixel_shuffle_ratio: float = 0.5,
    ):
        if chat_template is None:
            chat_template = load_chat_template()
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.pixel_shuffle_ratio = pixel_shuffle_ratio
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.patch_token_id = tokenizer.convert_tokens_to_ids(self.patch_token)
        # Every token of an image's layout counts as image in `mm_token_type_ids`.
        self.image_token_ids = tokenizer.convert_tokens_to_ids(
            [
                self.image_start_token,
                self.image_token,
                self.patch_token,
                self.tile_x_separator_token,
                self.tile_y_separator_token,
                self.image_end_token,
            ]
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> Llama4Processor:
        """Load the image processor as this module's `Llama4ImageProcessor`, the tokenizer as its `Llama4Tokenizer`
        (either may be passed instead), the chat template and vision settings from the processor config.

        Through `ProcessorMixin.from_pretrained`, `AutoImageProcessor` may resolve the saved name
        `Llama4ImageProcessor` to transformers' own class, and an official checkpoint's tokenizer would load as the
        generic fast tokenizer, which cannot encode message text as plain text; how it resolves the parts also
        differs between transformers releases. Any other keyword (`revision`, `token`, ...) goes to every loader.
        """
        components = {name: kwargs.pop(name, None) for name in ("image_processor", "tokenizer")}
        for name, component_class in (("image_processor", Llama4ImageProcessor), ("tokenizer", Llama4Tokenizer)):
            if components[name] is None:
                components[name] = component_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **kwargs)
        settings = {key: kwargs.get(key, processor_dict.get(key)) for key in ("chat_template", *PROCESSOR_SETTINGS)}
        return cls(**components, **{key: value for key, value in settings.items() if value is not None})

    def tokens_per_tile(self, height: int, width: int) -> int:
        """Number of `<|patch|>` tokens a `height` x `width` tile becomes: its patches, pixel-shuffled."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"Tile {height}x{width} is not a whole number of {self.patch_size}-pixel patches")
        downsample = round(1 / self.pixel_shuffle_ratio**2)
        patches = (height // self.patch_size) * (width // self.patch_size)
        if patches % downsample:
            raise ValueError(f"{patches} patches per tile cannot be pixel-shuffled by {self.pixel_shuffle_ratio}")
        return patches // downsample

    def image_tokens(self, rows: int, cols: int, tokens_per_tile: int) -> str:
        """The token string of an image split into `rows` x `cols` tiles, as Meta's `ChatFormat._encode_image`."""
        patches = self.patch_token * tokens_per_tile
        global_view = self.image_token + patches
        if rows * cols == 1:
            return self.image_start_token + global_view + self.image_end_token
        row = self.tile_x_separator_token.join([patches] * cols) + self.tile_y_separator_token
        return self.image_start_token + row * rows + global_view + self.image_end_token

    def prepare_inputs_layout(self, images=None, text=None, **kwargs):
        """Flatten nested (per-conversation) image lists: placeholders are matched to images in order.

        A text that starts with the BOS token (a chat rendered with `tokenize=False`) loses it when the tokenizer
        adds one, so it gets exactly one, as `ProcessorMixin.apply_chat_template` does for a rendered chat.
        """
        images, text, *_ = super().prepare_inputs_layout(images=images, text=text, **kwargs)
        if images is not None:
            images = make_flat_list_of_images(images)
        text_kwargs = kwargs.get("text_kwargs") or {}
        if text is not None and kwargs.get("add_special_tokens", text_kwargs.get("add_special_tokens", True)):
            text = self._without_leading_bos(text)
        return images, text, None, None

    def _without_leading_bos(self, text: str | list[str]) -> str | list[str]:
        """`text` (one or a batch) without the leading BOS token the tokenizer is about to add."""
        bos = self.tokenizer.bos_token
        if bos is None or self.tokenizer("")["input_ids"][:1] != [self.tokenizer.bos_token_id]:
            return text
        if isinstance(text, str):
            return text.removeprefix(bos)
        return [chat.removeprefix(bos) if isinstance(chat, str) else chat for chat in text]

    def apply_chat_template(self, conversation, *args, tokenize: bool = False, processor_kwargs=None, **kwargs):
        """`ProcessorMixin.apply_chat_template`; with `tokenize=True`, message text is encoded as plain text.

        With `tokenize=False` the result is the rendered string: processing it again cannot tell message text from
        the template's special tokens and image placeholders, so keep `tokenize=True` for text you do not control.
        """
        if tokenize:
            if getattr(self.tokenizer, "plain_text_marker", None) != PLAIN_TEXT_MARKER:
                raise TypeError(
                    "apply_chat_template(tokenize=True) needs a tokenizer that encodes message text as plain text "
                    f"(a Llama4Tokenizer, whose plain_text_marker is {PLAIN_TEXT_MARKER!r}); got "
                    f"{type(self.tokenizer).__name__}. Load it with Llama4Tokenizer.from_pretrained, or from a "
                    "saved folder with AutoTokenizer.from_pretrained(folder, trust_remote_code=True)."
                )
            kwargs.pop("sanitize_control_tokens", None)  # message text is always plain text here
            kwargs["plain_text_marker"] = PLAIN_TEXT_MARKER
            text_kwargs = {**(processor_kwargs or {}).get("text_kwargs", {}), "plain_text_marker": PLAIN_TEXT_MARKER}
            processor_kwargs = {**(processor_kwargs or {}), "text_kwargs": text_kwargs}
        return super().apply_chat_template(
            conversation, *args, tokenize=tokenize, processor_kwargs=processor_kwargs, **kwargs
        )

    def validate_inputs(self, images=None, text=None, **kwargs):
        """Require text; the base class checks that there are as many `<|image|>` placeholders as images.

        Placeholders inside marked message text do not count: they are text.
        """
        if text is None:
            raise ValueError(f"{type(self).__name__} needs `text`, with one {self.image_token} per image")
        if isinstance(text, str):
            text = _hide_message_text(text)
        elif isinstance(text, list) and all(isinstance(chat, str) for chat in text):
            text = [_hide_message_text(chat) for chat in text]
        super().validate_inputs(images=images, text=text, **kwargs)

    def get_text_with_replacements(self, text: list[str], *replacements, **kwargs):
        """Expand the template's `<|image|>` placeholders only, never one written inside marked message text."""
        hidden = [_hide_message_text(chat) for chat in text]
        expanded, offsets = super().get_text_with_replacements(hidden, *replacements, **kwargs)
        return [_restore_message_text(chat, original) for chat, original in zip(expanded, text)], offsets

    def _check_special_mm_tokens(self, text: list[str], text_inputs, modalities: list[str]):
        """The base check that no image token was truncated away, counting the template's image tokens only."""
        super()._check_special_mm_tokens([_hide_message_text(chat) for chat in text], text_inputs, modalities)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The expansion of the `image_idx`-th `<|image|>` placeholder, from the processed images' tile grid."""
        height, width = image_inputs["pixel_values"][0].shape[-2:]
        rows, cols = (int(n) for n in image_inputs["aspect_ratios"][image_idx])
        return self.image_tokens(rows, cols, self.tokens_per_tile(height, width))

    @property
    def unused_input_names(self) -> list[str]:
        # The tile grid is written into the tokens; the model needs only the tiles.
        return ["aspect_ratios"]


def build_processor(
    tokenizer_model_path: str | Path | None = None,
    tile_size: int = 336,
    patch_size: int = 14,
    pixel_shuffle_ratio: float = 0.5,
    instruct: bool = True,
    max_patches: int = 16,
) -> Llama4Processor:
    """Build a Llama 4 processor from Meta's `tokenizer.model` and the vision settings of a checkpoint.

    Args:
        tokenizer_model_path: Meta's tiktoken `tokenizer.model`; the copy shipped with `llama-models` when None.
        tile_size: image tile side in pixels (`vision_args.image_size`).
        patch_size: vision patch side in pixels (`vision_args.patch_size`).
        pixel_shuffle_ratio: `vision_args.pixel_shuffle_ratio`.
        instruct: eos `<|eot|>` (instruct) or `<|end_of_text|>` (base).
        max_patches: most tiles an image is split into (Meta's `max_num_chunks`).
    """
    if tokenizer_model_path is None:
        tokenizer_model_path = default_tokenizer_model_path()
    tokenizer = build_tokenizer(tokenizer_model_path, instruct=instruct)
    image_processor = Llama4ImageProcessor(size={"height": tile_size, "width": tile_size}, max_patches=max_patches)
    return Llama4Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        pixel_shuffle_ratio=pixel_shuffle_ratio,
    )
