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
r"""Llama 4 tokenizer: Meta's tiktoken BPE (`tokenizer.model`) as a standard `tokenizers`-backed fast tokenizer.

Meta's tokenizer (`llama_models/llama4/tokenizer.py`) is tiktoken with 200,000 BPE ranks, the o200k-style split
pattern below and 2,048 special tokens at ids 200,000-202,047. This module rebuilds it as a byte-level BPE
`tokenizers.Tokenizer` wrapped in `transformers.PreTrainedTokenizerFast`, so a saved `tokenizer.json` loads with plain
`AutoTokenizer.from_pretrained`, without this package.

Token ids equal Meta's `Tokenizer.encode(s, bos=False, eos=False)`, with three documented differences:

- Special-token strings in the text (say `"<|eot|>"`) are matched as special tokens, like Meta's
  `encode(s, allowed_special="all")`; rendered chat strings rely on that. Meta's default (`disallowed_special=()`)
  encodes them as plain text: pass `split_special_tokens=True` to get that behaviour.
- A `"\n\n"` that starts the text, or follows a special token, is its own token. Meta's `ChatFormat` encodes the
  `"\n\n"` after `<|header_end|>` apart from the message, so a message that starts with a newline must not merge
  with it. Only text starting with `"\n\n"`, then whitespace up to another newline, tokenizes differently from
  Meta's `encode` (`"\n\n\n"`: two tokens instead of one).
- Meta's `encode` cuts its input every 400,000 characters and inside runs of more than 25,000 consecutive whitespace
  or non-whitespace characters (a workaround for a tiktoken crash); tokens at those cuts can differ.

Chats: `Llama4Tokenizer.apply_chat_template(..., tokenize=True)` encodes message text and tool calls as plain text,
exactly as Meta's `ChatFormat.encode_dialog_prompt`: text that spells `<|eot|>` or `<|header_start|>` stays text, and
only the template's own structure becomes special tokens. Given a `plain_text_marker`, the template writes that
marker around each message text and tool call (and deletes it from the text); the rendered chat is then encoded
piece by piece, the template's text with special tokens, each message text with none. A rendered string
(`tokenize=False`) cannot carry that distinction: tokenizing it matches special-token strings wherever they are,
message text included.
"""

from __future__ import annotations

import base64
import logging
from functools import cached_property, lru_cache
from pathlib import Path

from tokenizers import AddedToken, Encoding, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import BatchEncoding, TokenizersBackend

__all__ = [
    "LLAMA4_SPECIAL_TOKENS",
    "Llama4Tokenizer",
    "O200K_PATTERN",
    "build_tokenizer",
    "default_tokenizer_model_path",
    "load_chat_template",
    "load_tiktoken_ranks",
    "PLAIN_TEXT_MARKER",
    "split_plain_text",
]

logger = logging.getLogger(__name__)

# Meta's `Tokenizer.O200K_PATTERN`: how text is split into words before BPE.
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 2048
BOS_TOKEN = "<|begin_of_text|>"
BASE_EOS_TOKEN = "<|end_of_text|>"
INSTRUCT_EOS_TOKEN = "<|eot|>"
PAD_TOKEN = "<|finetune_right_pad|>"
CHAT_TEMPLATE_FILE = Path(__file__).with_name("chat_template.jinja")


def _reserved(name: str, count: int, start: int = 0) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


def _llama4_special_tokens() -> list[str]:
    """Meta's 2,048 special token names, in id order (`llama_models/llama4/tokenizer.py`)."""
    basic = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    text_post_train = [
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|step|>",
        *_reserved("text_post_train", 6),
        "<|python_start|>",
        "<|python_end|>",
        "<|finetune_right_pad|>",
        *_reserved("text_post_train", 61, start=8),
    ]
    vision = [
        "<|image_start|>",
        "<|image_end|>",
        *_reserved("vision", 2),
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        *_reserved("vision", 4, start=2),
        "<|image|>",
        *_reserved("vision", 1, start=6),
        "<|patch|>",
        *_reserved("vision", 1041, start=7),
    ]
    reasoning = [*_reserved("reasoning", 8), "<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    named = basic + text_post_train + vision + reasoning
    return named + [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL_TOKENS - len(named))]


LLAMA4_SPECIAL_TOKENS: list[str] = _llama4_special_tokens()


def default_tokenizer_model_path() -> Path:
    """Path of Meta's Llama 4 `tokenizer.model` shipped inside the installed `llama-models` package.

    Used by tests and demos that build a tokenizer without downloading a checkpoint. `llama-models` is imported lazily
    here and nowhere else in this package.
    """
    try:
        import llama_models.llama4
    except ImportError as error:
        raise ImportError(
            "Meta's tokenizer.model comes with the `llama-models` package, which is not installed: "
            "`pip install llama-models==0.3.0`, or pass the path of a checkpoint's tokenizer.model."
        ) from error
    path = Path(llama_models.llama4.__file__).with_name("tokenizer.model")
    if not path.is_file():
        raise FileNotFoundError(f"llama-models is installed but has no Llama 4 tokenizer.model at {path}")
    return path


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file (one `base64(token) rank` per line) into `{token_bytes: rank}`."""
    ranks = {}
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as error:
                raise ValueError(f"{path}:{line_number} is not a tiktoken `base64 rank` line: {line!r}") from error
    return ranks


def load_chat_template() -> str:
    """The Llama 4 chat template (Meta's `ChatFormat`) shipped as `chat_template.jinja` next to this module."""
    return CHAT_TEMPLATE_FILE.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of `tokenizers`' ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _to_byte_level(token: bytes) -> str:
    alphabet = _bytes_to_unicode()
    return "".join(alphabet[byte] for byte in token)


def _bpe_split(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Run tiktoken's BPE on `token` with the merges ranked below `token` only: the pieces it is merged from.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. Inside a word, the pieces
    that form `token` evolve exactly as in this isolated run, so the two pieces returned are the only merge that can
    ever produce `token`, and one merge per token, ordered by rank, reproduces tiktoken.
    """
    max_rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_index = max_rank, -1
        for index in range(len(parts) - 1):
            rank = ranks.get(parts[index] + parts[index + 1], max_rank)
            if rank < best_rank:
                best_rank, best_index = rank, index
        if best_index < 0:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """BPE merges (byte-level strings, in rank order) equivalent to tiktoken's rank-based merging."""
    missing_bytes = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing_bytes:
        raise ValueError(f"A byte-level BPE needs all 256 single bytes as tokens; missing {missing_bytes[:8]}")
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_split(token, ranks)
        if len(parts) != 2:
            raise ValueError(f"Token {token!r} (rank {ranks[token]}) cannot be built from two lower-ranked tokens")
        merges.append((_to_byte_level(parts[0]), _to_byte_level(parts[1])))
    return merges


def _pre_tokenizer(isolate_leading_blank_line: bool) -> pre_tokenizers.PreTokenizer:
    """Meta's split pattern, then bytes to characters; optionally a leading "\n\n" of each piece split off first."""
    steps = [
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    if isolate_leading_blank_line:
        # `\A` is the start of each piece between special tokens: see "\n\n" in the module docstring.
        steps.insert(0, pre_tokenizers.Split(Regex(r"\A\n\n"), behavior="isolated", invert=False))
    return pre_tokenizers.Sequence(steps)


def _build_backend(ranks: dict[bytes, int]) -> Tokenizer:
    """The `tokenizers` pipeline: split with Meta's pattern, map bytes to characters, byte-level BPE, special tokens."""
    vocab = {_to_byte_level(token): rank for token, rank in ranks.items()}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("tiktoken ranks must be the distinct integers 0..N-1")
    # ignore_merges: a word that is itself a token is emitted whole, as tiktoken does.
    backend = Tokenizer(models.BPE(vocab, _merges_from_ranks(ranks), fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = _pre_tokenizer(isolate_leading_blank_line=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in LLAMA4_SPECIAL_TOKENS])
    return backend


# Written by the chat template around each message text and tool call when the caller passes it as
# `plain_text_marker` (and removed from the text itself): a private-use code point no tokenizer output depends on.
PLAIN_TEXT_MARKER = "\U000f00ff"


def split_plain_text(rendered: str) -> list[tuple[str, bool]]:
    """A chat rendered with `plain_text_marker` as `(text, is_message_text)` pieces, in order, markers removed.

    A chat cut inside its last message (`continue_final_message`) ends with message text left open.
    """
    return [(piece, index % 2 == 1) for index, piece in enumerate(rendered.split(PLAIN_TEXT_MARKER))]


def _holds_marker(text) -> bool:
    """Whether `text` (one text, a batch, or pretokenized words) holds `PLAIN_TEXT_MARKER`."""
    texts = [text] if isinstance(text, str) else text or []
    return any(isinstance(item, str) and PLAIN_TEXT_MARKER in item for item in texts)


def _encoding_field(encoding: Encoding, key: str) -> list:
    """One output field of a `tokenizers.Encoding`, under its transformers name."""
    attribute = {"input_ids": "ids", "offset_mapping": "offsets"}.get(key, key)
    return list(getattr(encoding, attribute))


class Llama4Tokenizer(TokenizersBackend):
    """The Llama 4 tokenizer: a `tokenizers` BPE whose chats encode message text as plain text, as Meta's do.

    `apply_chat_template(..., tokenize=True)` gives the token ids of Meta's `ChatFormat.encode_dialog_prompt`:
    special tokens only where the template writes them, each message text and tool call encoded on its own as text
    (see the module docstring). Saved, its `tokenizer_config.json` maps `AutoTokenizer` to this module, copied beside
    it, so `AutoTokenizer.from_pretrained(folder, trust_remote_code=True)` loads this class without the package.
    """

    # `__call__` encodes chats rendered with this marker around message text: what the processor checks for, by
    # value, since the package's and a remote-code module's copies of this class are different classes.
    plain_text_marker: str = PLAIN_TEXT_MARKER

    def apply_chat_template(
        self,
        conversation,
        tools: list | None = None,
        documents: list | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        tokenizer_kwargs: dict | None = None,
        **kwargs,
    ):
        """`PreTrainedTokenizerBase.apply_chat_template`, with message text encoded as plain text when `tokenize`.

        With `tokenize=False` the result is the rendered string: tokenizing it again cannot tell message text from
        the template's special tokens, so keep `tokenize=True` for text you do not control.
        """
        if tokenize:
            kwargs.pop("sanitize_control_tokens", None)  # message text is always plain text here
            kwargs["plain_text_marker"] = self.plain_text_marker  # for the template
            tokenizer_kwargs = {**(tokenizer_kwargs or {}), "plain_text_marker": self.plain_text_marker}
        return super().apply_chat_template(
            conversation,
            tools=tools,
            documents=documents,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=tokenize,
            tokenizer_kwargs=tokenizer_kwargs,
            **kwargs,
        )

    def __call__(self, text=None, *args, plain_text_marker: str | None = None, **kwargs) -> BatchEncoding:
        """`PreTrainedTokenizerBase.__call__`, or, for chats rendered with `plain_text_marker`, their encoding piece by
        piece (`encode_chats`). A rendered chat that reaches the tokenizer without the option (transformers stopped
        passing it through) is refused rather than encoded with its message text as special tokens."""
        if plain_text_marker is None:
            if _holds_marker(text):
                raise ValueError(
                    f"text holds {PLAIN_TEXT_MARKER!r}, the marker chats are rendered with around message text, but "
                    "plain_text_marker was not passed: its message text would be encoded with special tokens"
                )
            return super().__call__(text, *args, **kwargs)
        if plain_text_marker != PLAIN_TEXT_MARKER:
            raise ValueError(f"plain_text_marker must be {PLAIN_TEXT_MARKER!r}, the marker this tokenizer removes")
        if args:
            raise TypeError(f"chats rendered with plain_text_marker take keyword options only, got {len(args)} more")
        return self.encode_chats(text, **kwargs)

    def _marker_free_backend(self, special_tokens: bool, isolate_leading_blank_line: bool) -> Tokenizer:
        """This tokenizer's BPE (shared, not copied) behind a normalizer that deletes `PLAIN_TEXT_MARKER`.

        Offsets still point into the text with its markers, so they match the template's `{% generation %}` spans.
        """
        backend = Tokenizer(self.backend_tokenizer.model)
        backend.normalizer = normalizers.Replace(PLAIN_TEXT_MARKER, "")
        backend.pre_tokenizer = _pre_tokenizer(isolate_leading_blank_line)
        if special_tokens:
            backend.add_special_tokens(list(self.backend_tokenizer.get_added_tokens_decoder().values()))
        return backend

    @cached_property
    def _template_backend(self) -> Tokenizer:
        """Encodes the template's own text: special tokens, and "\n\n" after `<|header_end|>` on its own."""
        return self._marker_free_backend(special_tokens=True, isolate_leading_blank_line=True)

    @cached_property
    def _plain_text_backend(self) -> Tokenizer:
        """Encodes message text as Meta's `Tokenizer.encode(text)`: special-token strings are text."""
        return self._marker_free_backend(special_tokens=False, isolate_leading_blank_line=False)

    def _encode_chat(self, rendered: str) -> Encoding:
        """A chat rendered with markers: its template text with special tokens, its message texts as plain text.

        Each piece is encoded with the markers before it (deleted by the normalizer), so that the merged offsets
        grow by exactly the characters each piece spans in `rendered`.
        """
        encodings, markers = [], ""
        for text, is_message_text in split_plain_text(rendered):
            if not text:
                markers += PLAIN_TEXT_MARKER
                continue
            backend = self._plain_text_backend if is_message_text else self._template_backend
            encodings.append(backend.encode(markers + text, add_special_tokens=False))
            markers = PLAIN_TEXT_MARKER
        return Encoding.merge(encodings, growing_offsets=True)

    def encode_chats(
        self,
        text: str | list[str],
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        return_offsets_mapping: bool = False,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        **ignored,
    ) -> BatchEncoding:
        """Chats rendered with `PLAIN_TEXT_MARKER` to a `BatchEncoding` (with their `tokenizers` encodings, whose
        offsets the assistant masks read), truncated and padded as asked.

        The template writes the BOS token, so `add_special_tokens` (like any other option of `__call__` not named
        here) changes nothing.
        """
        is_batched = isinstance(text, (list, tuple))
        encodings = [self._encode_chat(chat) for chat in (text if is_batched else [text])]
        if truncation not in (None, False, "do_not_truncate") and max_length is not None:
            for encoding in encodings:
                encoding.truncate(max_length, direction=self.truncation_side)
        if padding not in (False, None, "do_not_pad"):
            length = max(map(len, encodings)) if padding in (True, "longest") else max_length
            if length is None:
                raise ValueError(f"padding={padding!r} needs max_length")
            if pad_to_multiple_of:
                length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
            for encoding in encodings:
                encoding.pad(
                    length,
                    direction=padding_side or self.padding_side,
                    pad_id=self.pad_token_id,
                    pad_token=self.pad_token,
                )
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        fields = {
            "input_ids": True,
            "attention_mask": return_attention_mask,
            "offset_mapping": return_offsets_mapping,
            "special_tokens_mask": return_special_tokens_mask,
        }
        data = {
            key: [_encoding_field(encoding, key) for encoding in encodings] for key, wanted in fields.items() if wanted
        }
        if return_length:
            data["length"] = [len(encoding) for encoding in encodings]
        if not is_batched and return_tensors is None:
            data = {key: values[0] for key, values in data.items()}
        return BatchEncoding(data, encodings, tensor_type=return_tensors)


# Saved tokenizers carry this module and an `AutoTokenizer` entry in their `auto_map` (transformers writes both), so
# they load as this class with `trust_remote_code=True` where the package is not installed.
Llama4Tokenizer.register_for_auto_class("AutoTokenizer")


def build_tokenizer(tokenizer_model_path: str | Path, instruct: bool = True) -> Llama4Tokenizer:
    """Build the Llama 4 tokenizer from Meta's `tokenizer.model`.

    Args:
        tokenizer_model_path: Meta's tiktoken BPE file (`tokenizer.model` of a native checkpoint, or
            `default_tokenizer_model_path()`).
        instruct: eos is `<|eot|>` (end of turn) for instruct checkpoints, `<|end_of_text|>` for base ones.

    Returns:
        A `Llama4Tokenizer` with Meta's 2,048 special tokens at ids 200,000-202,047, bos `<|begin_of_text|>`
        prepended when `add_special_tokens=True`, pad `<|finetune_right_pad|>` and the Llama 4 chat template.
    """
    path = Path(tokenizer_model_path)
    if not path.is_file():
        raise FileNotFoundError(f"No tiktoken tokenizer.model at {path}")
    ranks = load_tiktoken_ranks(path)
    backend = _build_backend(ranks)
    if backend.token_to_id(BOS_TOKEN) != len(ranks):
        raise ValueError(f"{path} has {len(ranks)} ranks but they are not ids 0..{len(ranks) - 1}")
    logger.info(
        "Built the Llama 4 tokenizer from %s: %d BPE tokens + %d special", path, len(ranks), NUM_SPECIAL_TOKENS
    )
    return Llama4Tokenizer(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=INSTRUCT_EOS_TOKEN if instruct else BASE_EOS_TOKEN,
        pad_token=PAD_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        chat_template=load_chat_template(),
    )
