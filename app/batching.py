"""One continuous-batching loop shared by all text chats of the demo.

transformers' :class:`~transformers.ContinuousBatchingManager` (``model.init_continuous_batching``) runs one
background loop whose forward passes carry every active request: a chat that arrives while others are answering
joins the next step instead of waiting for them to finish. :class:`SharedBatcher` starts that loop once for the
app, hands each chat's prompt to it and routes the streamed tokens back to the chat that asked.

The manager reads its outputs from one shared queue; a single router thread here (``for output in manager``)
drops each into the queue of the chat it belongs to, so chats never pick up or reorder each other's tokens. A chat
closed early (the stop button, the clear button, a closed page) cancels its own request only
(``manager.cancel_request``); a cancelled request sends no further output.

Sampling is a property of the loop: ``do_sample`` and the default temperature / top-p come from the settings the
batcher is created with (the CLI's ``--temperature`` / ``--top-p``). A sampling loop applies each request's own
temperature and top-p (transformers' per-request logits processors); a greedy loop serves greedy requests only.
:meth:`SharedBatcher.serves` says whether a request's settings can be met exactly; the engine sends the others
through ``generate``.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from modeling_llama4.continuous_batching import CPU_CACHE_TOKENS

__all__ = ["SharedBatcher"]

logger = logging.getLogger(__name__)

# The router hands a chat this instead of an output when the loop stopped (the app is closing, or the loop failed).
_LOOP_ENDED = None


class SharedBatcher:
    """A started continuous-batching loop on ``model``, streaming the tokens of many prompts at once.

    Args:
        model: a model with ``init_continuous_batching`` (this package's Llama 4, possibly wrapped by PEFT).
        eos_token_ids: tokens that end an answer.
        temperature: the loop's sampling temperature, 0 for greedy decoding (see the module docstring).
        top_p: the loop's default top-p when it samples.
        cache_tokens: tokens the loop's paged cache holds, all chats together (default on a CPU: the model's bound,
            ``modeling_llama4.continuous_batching.CPU_CACHE_TOKENS``; elsewhere transformers' choice from free
            memory). A chat longer than this goes through ``generate``.
        timeout_s: seconds a chat waits for its next token before giving up.
    """

    def __init__(
        self,
        model,
        eos_token_ids: Sequence[int],
        temperature: float = 0.7,
        top_p: float = 0.9,
        cache_tokens: int | None = None,
        timeout_s: float = 600.0,
    ):
        self.greedy = temperature <= 0
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.eos_token_ids = list(eos_token_ids)
        self.timeout_s = timeout_s
        on_cpu = model.device.type == "cpu"
        self.cache_tokens = CPU_CACHE_TOKENS if cache_tokens is None and on_cpu else cache_tokens
        self.manager = model.init_continuous_batching(
            generation_config=self._generation_config(model.generation_config),
            continuous_batching_config=self._batching_config(),
        )
        self._chats: dict[str, queue.Queue] = {}
        self._chats_lock = threading.Lock()
        with torch.inference_mode():  # the loop runs in the caller's inference mode
            self.manager.start()
        self._router = threading.Thread(target=self._route_outputs, name="cb-router", daemon=True)
        self._router.start()

    def _generation_config(self, model_config: GenerationConfig) -> GenerationConfig:
        """The model's generation config with the loop's sampling and stop tokens.

        A sampling loop is created with a temperature other than 1 and a top-p below 1, so that transformers builds
        the per-request processors for both (it builds none for a neutral value), whatever each request asks.
        """
        config = GenerationConfig.from_dict(model_config.to_dict())
        config.eos_token_id = self.eos_token_ids
        if self.greedy:
            config.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            config.update(
                do_sample=True,
                temperature=self.temperature if self.temperature != 1.0 else 0.999,
                top_p=min(self.top_p, 0.999),
            )
        return config

    def _batching_config(self) -> ContinuousBatchingConfig:
        """Per-request sampling settings when the loop samples; the cache sized to ``cache_tokens`` when given (on a
        CPU the model bounds the sizes left unset: ``modeling_llama4.continuous_batching.cpu_batching_config``)."""
        config = ContinuousBatchingConfig(per_request_processors=not self.greedy)
        if self.cache_tokens is not None:
            config.num_blocks = -(-self.cache_tokens // config.page_size)
        return config

    def serves(self, prompt_tokens: int, max_new_tokens: int, temperature: float) -> bool:
        """Whether the loop answers this request as asked: greedy on a greedy loop, sampled on a sampling one, and
        the whole conversation fits in the loop's cache."""
        fits = self.cache_tokens is None or prompt_tokens + max_new_tokens <= self.cache_tokens
        return fits and (temperature <= 0) == self.greedy

    def _route_outputs(self) -> None:
        """Router thread: deliver every output of the loop to its chat's queue, until the loop stops."""
        for output in self.manager:
            with self._chats_lock:
                chat = self._chats.get(output.request_id)
            if chat is not None:  # else a cancelled chat's last step
                chat.put(output)
        with self._chats_lock:
            if self._chats:
                logger.warning("The continuous batching loop stopped with %d chats answering", len(self._chats))
            for chat in self._chats.values():
                chat.put(_LOOP_ENDED)

    def stream_tokens(
        self, input_ids: Sequence[int], max_new_tokens: int, temperature: float, top_p: float
    ) -> Iterator[list[int]]:
        """Yield the answer's tokens so far (a growing list) for one prompt, until a stop token or
        ``max_new_tokens``. Closing the iterator early cancels the request.

        Raises:
            RuntimeError: the loop is not accepting requests (the app is closing), failed the request or stopped.
        """
        request_id = f"chat-{uuid.uuid4().hex}"
        chat: queue.Queue = queue.Queue()
        with self._chats_lock:
            self._chats[request_id] = chat
        per_request = {} if self.greedy else {"temperature": float(temperature), "top_p": float(top_p)}
        finished = False
        try:
            added = self.manager.add_request(
                list(input_ids),
                request_id=request_id,
                max_new_tokens=max_new_tokens,
                streaming=True,
                eos_token_id=self.eos_token_ids,
                **per_request,
            )
            if added is None:
                raise RuntimeError("The continuous batching loop is not accepting requests (the demo is stopping).")
            while not finished:
                output = self._next_output(chat)
                if output is _LOOP_ENDED:
                    raise RuntimeError("The continuous batching loop stopped before the answer was complete.")
                if output.error is not None:
                    raise RuntimeError(f"The continuous batching loop failed the request: {output.error}")
                finished = output.is_finished()
                yield output.generated_tokens
        finally:
            if not finished:
                self.manager.cancel_request(request_id)
            with self._chats_lock:
                del self._chats[request_id]

    def _next_output(self, chat: queue.Queue):
        """The chat's latest output: waits for one, then skips to the newest already queued (each output holds all
        the tokens so far), so a reader that lags behind the loop catches up in one update."""
        try:
            output = chat.get(timeout=self.timeout_s)
        except queue.Empty:
            raise RuntimeError(f"No token from the continuous batching loop in {self.timeout_s:g} s.") from None
        while output is not _LOOP_ENDED and not output.is_finished() and not chat.empty():
            output = chat.get_nowait()
        return output

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the loop (requests in flight are failed) and release its cache; the router thread then ends."""
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=timeout_s, hard_stop=True)
        self.manager.destroy()
        self._router.join(timeout=timeout_s)
