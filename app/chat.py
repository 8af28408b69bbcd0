"""Chat logic of the demo, independent of the UI: Gradio history → transformers messages → streamed generation.

Gradio hands the chat function the new message (``{"text": str, "files": [path, ...]}``) and the history as
OpenAI-style messages. This module turns them into transformers chat messages with image parts, checks them
against the demo's limits, encodes them with the processor's chat template (Meta's Llama 4 chat format) and
streams the answer.

Two ways to answer, chosen per chat by :meth:`ChatEngine.stream`:

- **Shared batch** (``batching="continuous"``): text chats whose decoding the loop serves (greedy on a greedy loop,
  sampled on a sampling one, see :mod:`app.batching`) go to one continuous-batching loop shared by all users, so
  concurrent chats share each forward pass. Continuous batching carries token ids only.
- **generate** (every chat with ``batching="none"``; with ``"continuous"``, chats with images, and chats whose
  decoding the loop does not serve): ``model.generate`` streams from a background thread, one chat at a time
  (a lock), while the shared batch keeps serving text chats.

Anything the user should fix (a bad image, too many images, a prompt longer than the context) raises
:class:`ChatError`; :meth:`ChatEngine.respond` shows its text in the chat as a notice instead of failing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .batching import SharedBatcher

__all__ = [
    "BATCHING_MODES",
    "NOTICE_PREFIX",
    "STOP_TOKENS",
    "ChatEngine",
    "ChatError",
    "GenerationSettings",
    "Limits",
    "build_messages",
    "load_image",
    "load_images",
]

logger = logging.getLogger(__name__)

# Assistant messages that start with this are the demo's notices, not model output: they (and the user turn that
# caused them) are left out of the conversation sent to the model.
NOTICE_PREFIX = "⚠️ "
# Meta's stop tokens: end of turn, end of message (tool call), end of text.
STOP_TOKENS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")
# Seconds the streamer waits for the next token before giving up (a stuck generation thread).
STREAM_TIMEOUT_S = 600.0
# Seconds between two updates of an answer from the shared loop. Many chats stream at once there, and each update
# costs the server time (Gradio diffs the chat and sends it) that the loop then waits for.
BATCHED_UPDATE_INTERVAL_S = 0.1
# How concurrent chats are answered: "none" one at a time through generate, "continuous" in one shared batch.
BATCHING_MODES = ("none", "continuous")


class ChatError(ValueError):
    """A problem with the user's input; its message is shown in the chat."""


@dataclass(frozen=True)
class Limits:
    """What the demo accepts from a user.

    Attributes:
        max_images_per_message: images attached to one message.
        max_images_per_chat: images in the whole conversation (each is re-encoded every turn).
        max_image_bytes: size of one uploaded file.
        max_image_pixels: width x height of one image (guards against decompression bombs).
        max_text_chars: characters in one message.
    """

    max_images_per_message: int = 4
    max_images_per_chat: int = 8
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000
    max_text_chars: int = 20_000


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings from the UI; ``temperature == 0`` means greedy decoding."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256


def _content_parts(content: Any) -> list[dict[str, str]]:
    """Normalise one Gradio message content into ``[{"type": "text", "text"}, {"type": "image", "path"}]`` parts.

    Accepts Gradio 6's normalised content (a list of ``{"type": "text" | "file" | "component", ...}``) and the older
    forms: a string, a ``{"path": ...}`` file dict, a ``(path, alt_text)`` tuple. Components (rendered widgets in
    the chat) carry nothing for the model and are dropped.
    """
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, tuple):
        return [{"type": "image", "path": str(content[0])}]
    if isinstance(content, list):
        return [part for item in content for part in _content_parts(item)]
    if isinstance(content, dict):
        kind = content.get("type")
        if kind == "text":
            return _content_parts(content.get("text"))
        if kind == "file":
            return _content_parts(content.get("file"))
        if "path" in content:
            return [{"type": "image", "path": str(content["path"])}]
    return []


def _is_notice(parts: list[dict[str, str]]) -> bool:
    return bool(parts) and parts[0]["type"] == "text" and parts[0]["text"].startswith(NOTICE_PREFIX)


def _history_turns(history: Sequence[dict]) -> list[dict]:
    """History as ``{"role", "content": parts}`` turns, with notices and the user turns that caused them removed,
    and consecutive messages of one role merged (Gradio splits a message with files into several)."""
    turns: list[dict] = []
    pending_user: list[dict[str, str]] = []
    for message in history:
        parts = _content_parts(message.get("content"))
        if message.get("role") == "user":
            pending_user.extend(parts)
            continue
        if message.get("role") != "assistant" or _is_notice(parts):
            pending_user = [] if _is_notice(parts) else pending_user
            continue
        if pending_user:
            turns.append({"role": "user", "content": pending_user})
            pending_user = []
        if turns and turns[-1]["role"] == "assistant":
            turns[-1]["content"].extend(parts)
        else:
            turns.append({"role": "assistant", "content": parts})
    if pending_user:  # a user turn left without an answer (stopped early): keep it, the new message follows
        turns.append({"role": "user", "content": pending_user})
    return turns


def _new_message_parts(message: dict | str, limits: Limits) -> list[dict[str, str]]:
    """The new user message as parts (images first, then the text), checked against the per-message limits."""
    if isinstance(message, str):
        message = {"text": message, "files": []}
    text = (message.get("text") or "").strip()
    files = [
        _content_parts(item) if not isinstance(item, str) else [{"type": "image", "path": item}]
        for item in message.get("files") or []
    ]
    images = [part for parts in files for part in parts if part["type"] == "image"]
    if not text and not images:
        raise ChatError("Type a message or attach an image.")
    if len(text) > limits.max_text_chars:
        raise ChatError(f"The message has {len(text):,} characters; the limit is {limits.max_text_chars:,}.")
    if len(images) > limits.max_images_per_message:
        raise ChatError(
            f"{len(images)} images attached; at most {limits.max_images_per_message} per message are accepted."
        )
    return images + ([{"type": "text", "text": text}] if text else [])


def build_messages(
    message: dict | str, history: Sequence[dict], system_prompt: str = "", limits: Limits = Limits()
) -> list[dict]:
    """Transformers chat messages for the conversation so far plus the new message.

    Args:
        message: the new message, Gradio's multimodal ``{"text": str, "files": [path | file dict, ...]}`` or a string.
        history: Gradio's chat history (OpenAI-style messages, any Gradio >= 4 content form).
        system_prompt: put first as a system message when not blank.
        limits: checked for the new message and the image count of the whole conversation.

    Returns:
        ``[{"role": ..., "content": [{"type": "text", "text": ...} | {"type": "image", "path": ...}, ...]}, ...]``;
        image parts name the uploaded file (see :func:`load_images`).

    Raises:
        ChatError: the message is empty or over a limit.
    """
    messages = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt.strip()}]})
    turns = _history_turns(history)
    new_parts = _new_message_parts(message, limits)
    if turns and turns[-1]["role"] == "user":
        turns[-1]["content"].extend(new_parts)
    else:
        turns.append({"role": "user", "content": new_parts})
    messages.extend(turn for turn in turns if turn["content"])
    image_count = sum(part["type"] == "image" for turn in messages for part in turn["content"])
    if image_count > limits.max_images_per_chat:
        raise ChatError(
            f"This conversation would hold {image_count} images; the limit is {limits.max_images_per_chat}. "
            "Clear the chat to start a new one."
        )
    return messages


def load_image(source: str | os.PathLike | Image.Image, limits: Limits = Limits()) -> Image.Image:
    """Open, check and fully decode one image, or raise a :class:`ChatError` that names it.

    ``source`` is an uploaded file's path, a ``data:image/...;base64,`` URL or a PIL image. Its byte size and its
    pixel count (from the header) are checked before any pixel is decoded. ``http(s)://`` URLs are refused: the
    demo does not download files on a visitor's behalf. Colour modes are left to the image processor (it
    composites RGBA on white, as Meta does).
    """
    if isinstance(source, Image.Image):
        return _decode_checked(source, "attached image", None, limits)
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        raise ChatError("The demo does not download images from links; save the image and attach the file.")
    if text.startswith("data:"):
        return _decode_checked(_data_url_bytes(text, limits), "attached image", None, limits)
    label = f"image {Path(text).name}"
    try:
        size = os.path.getsize(text)
    except OSError as error:
        raise ChatError(f"The {label} is no longer available ({error.strerror}); attach it again.") from error
    _check_bytes(size, label, limits)
    return _decode_checked(text, label, text, limits)


def _check_bytes(size: int, label: str, limits: Limits) -> None:
    if size > limits.max_image_bytes:
        raise ChatError(
            f"The {label} is {size / 2**20:.1f} MB; the limit is {limits.max_image_bytes / 2**20:.1f} MB per image."
        )


def _data_url_bytes(url: str, limits: Limits) -> io.BytesIO:
    """The bytes of a base64 ``data:`` URL, its size checked from the text's length before decoding."""
    header, _, payload = url.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise ChatError("The attached data URL is not a base64-encoded image ('data:image/...;base64,...').")
    _check_bytes(len(payload) * 3 // 4, "attached image", limits)
    try:
        return io.BytesIO(base64.b64decode(payload, validate=True))
    except binascii.Error as error:
        raise ChatError(f"The attached data URL holds invalid base64 ({error}).") from error


def _decode_checked(
    source: str | io.BytesIO | Image.Image, label: str, path: str | None, limits: Limits
) -> Image.Image:
    """Open ``source`` (lazily), check its pixel count from the header, then decode a copy of it.

    ``label`` names the image to the user; ``path``, the server's upload path, is never shown.
    """
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: the pixel limit below is the check that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source) if not isinstance(source, Image.Image) else contextlib.nullcontext(source)
        with opened as image:
            if image.width * image.height > limits.max_image_pixels:
                raise ChatError(
                    f"The {label} is {image.width}x{image.height} pixels; "
                    f"the limit is {limits.max_image_pixels:,} pixels."
                )
            image.load()
            return image.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, ChatError):
            raise
        reason = str(error).replace(path, Path(path).name) if path else str(error)  # PIL names the upload path
        raise ChatError(
            f"The {label} could not be read as an image ({type(error).__name__}: {reason}). "
            "Attach a PNG, JPEG, WebP, GIF or BMP image."
        ) from error


def load_images(messages: list[dict], limits: Limits = Limits()) -> list[dict]:
    """Copy of ``messages`` with every ``{"type": "image", "path"}`` part replaced by ``{"type": "image", "image"}``."""
    loaded = []
    for message in messages:
        content = [
            {"type": "image", "image": load_image(part["path"], limits)} if part["type"] == "image" else part
            for part in message["content"]
        ]
        loaded.append({**message, "content": content})
    return loaded


class _EventStop(StoppingCriteria):
    """Stops generation when the event is set (the user pressed stop, or the page went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """A model and its processor, answering chats with a streamed reply.

    Args:
        model: a Llama 4 generation model (``Llama4ForConditionalGeneration``, possibly wrapped by PEFT).
        processor: the matching ``Llama4Processor``.
        limits: what is accepted from users.
        batching: ``"none"`` (one chat at a time through ``generate``) or ``"continuous"`` (text chats share one
            continuous-batching loop; see the module docstring). Call :meth:`close` to stop the loop.
        sampling: the page's initial temperature and top-p, and the shared loop's sampling (temperature 0: greedy).
    """

    def __init__(
        self,
        model,
        processor,
        limits: Limits = Limits(),
        batching: str = "none",
        sampling: GenerationSettings = GenerationSettings(),
    ):
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching={batching!r} is not one of {', '.join(BATCHING_MODES)}")
        self.model = model
        self.processor = processor
        self.limits = limits
        self.sampling = sampling
        self.tokenizer = processor.tokenizer
        self.context_length = int(model.config.get_text_config().max_position_embeddings)
        self.reads_images = getattr(model.config, "vision_config", None) is not None
        self.stop_token_ids = [self.tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]
        self._generate_lock = threading.Lock()  # the generate path answers one chat at a time
        self.batcher = None
        if batching == "continuous":
            self.batcher = SharedBatcher(
                model, self.stop_token_ids, sampling.temperature, sampling.top_p, timeout_s=STREAM_TIMEOUT_S
            )

    def close(self) -> None:
        """Stop the shared loop, if any (chats still answering end with an error notice)."""
        if self.batcher is not None:
            self.batcher.close()

    def encode(self, messages: list[dict]) -> dict[str, torch.Tensor]:
        """Tokenize a conversation (images loaded) with the chat template and an assistant prompt at the end.

        Raises:
            ChatError: the prompt has images but the model is text-only, or it does not fit in the model's context.
        """
        if not self.reads_images and any(part["type"] == "image" for turn in messages for part in turn["content"]):
            raise ChatError("This model is text-only and cannot read images; send the message without them.")
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        prompt_tokens = inputs["input_ids"].shape[1]
        if prompt_tokens >= self.context_length:
            raise ChatError(
                f"The conversation is {prompt_tokens:,} tokens long, but the model's context is "
                f"{self.context_length:,} tokens. Clear the chat, or send a shorter message or fewer images."
            )
        return inputs

    def max_new_tokens(self, inputs: dict, settings: GenerationSettings) -> int:
        """The answer length the settings ask for, within the room the context leaves after the prompt."""
        room = self.context_length - inputs["input_ids"].shape[1]
        return max(1, min(int(settings.max_new_tokens), room))

    def generation_kwargs(self, inputs: dict, settings: GenerationSettings) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` for the encoded prompt and the UI's settings."""
        sample = settings.temperature > 0
        kwargs = dict(
            inputs.to(self.model.device),
            max_new_tokens=self.max_new_tokens(inputs, settings),
            do_sample=sample,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        if sample:
            kwargs.update(temperature=float(settings.temperature), top_p=float(settings.top_p))
        else:  # keep the model's generation_config sampling fields from triggering "unused flag" warnings
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def stream(self, messages: list[dict], settings: GenerationSettings = GenerationSettings()) -> Iterator[str]:
        """Yield the answer so far, growing token by token, for a conversation whose images are loaded.

        Text chats the shared loop serves go to it, the others to ``generate`` (see the module docstring). Closing
        this generator early (the stop button) stops this chat's generation only.
        """
        inputs = self.encode(messages)
        prompt_tokens, max_new_tokens = inputs["input_ids"].shape[1], self.max_new_tokens(inputs, settings)
        shared = self.batcher is not None and "pixel_values" not in inputs
        if shared and self.batcher.serves(prompt_tokens, max_new_tokens, settings.temperature):
            answers = self._stream_batched(inputs, settings)
        else:
            answers = self._stream_generate(inputs, settings)
        try:
            yield from answers
        except GeneratorExit:  # closed by the reader: the stop or clear button, or the page went away
            logger.info("Stopping generation early (stop or clear pressed, or the page closed)")
            raise

    def _stream_batched(self, inputs: dict, settings: GenerationSettings) -> Iterator[str]:
        """The answer through the shared loop: the first text at once, then at most one update per
        :data:`BATCHED_UPDATE_INTERVAL_S`, then the complete answer. Text that ends in an incomplete character waits
        for the next token."""
        tokens = self.batcher.stream_tokens(
            inputs["input_ids"][0].tolist(),
            self.max_new_tokens(inputs, settings),
            settings.temperature,
            settings.top_p,
        )
        answer, generated, next_update = "", [], 0.0
        with contextlib.closing(tokens):
            for generated in tokens:
                if time.monotonic() < next_update:
                    continue
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if text != answer and not text.endswith("\ufffd"):
                    answer, next_update = text, time.monotonic() + BATCHED_UPDATE_INTERVAL_S
                    yield answer
        complete = self.tokenizer.decode(generated, skip_special_tokens=True)
        if complete != answer:
            yield complete

    def _stream_generate(self, inputs: dict, settings: GenerationSettings) -> Iterator[str]:
        """The answer through ``model.generate`` in a background thread, one chat at a time."""
        streamer = TextIteratorStreamer(
            self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S
        )
        stop = threading.Event()
        kwargs = self.generation_kwargs(inputs, settings)
        kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([_EventStop(stop)]))
        errors: list[BaseException] = []
        with self._generate_lock:
            thread = threading.Thread(target=self._generate, args=(kwargs, streamer, errors), daemon=True)
            thread.start()
            answer = ""
            try:
                for piece in streamer:
                    answer += piece
                    yield answer
            finally:
                stop.set()
                thread.join()
        if errors:
            raise errors[0]

    @torch.inference_mode()
    def _generate(self, kwargs: dict, streamer: TextIteratorStreamer, errors: list[BaseException]) -> None:
        """Thread body: run ``generate``; on failure record the error and release the streamer's reader."""
        try:
            self.model.generate(**kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised in the reading thread
            errors.append(error)
            streamer.end()

    def respond(
        self,
        message: dict | str,
        history: list[dict],
        system_prompt: str = "",
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_new_tokens: int = 256,
    ) -> Iterator[str]:
        """Gradio chat function: yield the growing answer, or one notice when the input cannot be answered."""
        settings = GenerationSettings(float(temperature), float(top_p), int(max_new_tokens))
        try:
            messages = load_images(build_messages(message, history, system_prompt, self.limits), self.limits)
            answered = False
            for answer in self.stream(messages, settings):
                answered = answered or bool(answer.strip())
                yield answer
            if not answered:
                yield NOTICE_PREFIX + "The model ended its answer without any text."
        except ChatError as error:
            logger.info("Refused a message: %s", error)
            yield NOTICE_PREFIX + str(error)
        except Exception as error:
            logger.exception("Generation failed")  # the message stays in the log: it can name server files
            yield NOTICE_PREFIX + f"Generation failed ({type(error).__name__}). See the server log."
