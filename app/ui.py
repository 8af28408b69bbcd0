"""The Gradio page: a multimodal chat with a system prompt and sampling controls."""

from __future__ import annotations

from dataclasses import replace

import gradio as gr

from .chat import ChatEngine, GenerationSettings, Limits
from .cli import DEFAULT_MAX_NEW_TOKENS

__all__ = ["BATCHED_CHATS", "QUEUE_SIZE", "build_demo", "launch_kwargs"]

# Users waiting in line for the model; more are told the demo is busy.
QUEUE_SIZE = 64
# Chats answered at once by the shared continuous-batching loop (the others wait in the queue). Gradio runs each in
# a worker thread of its pool (40 threads by default).
BATCHED_CHATS = 32
# Fonts the browser already has: the page must not fetch any from the internet.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
)

TINY_NOTE = (
    "**This is the tiny random-weight demo model: its answers are random tokens**, not language. It checks that "
    "text, images, streaming and the chat format work end to end. To chat with a real Llama 4, convert a checkpoint "
    "(`llama4-convert`) or use a Hugging Face one and run `python -m app --model PATH_OR_HUB_ID`."
)


def _header(label: str, is_tiny: bool, limits: Limits, batched: bool) -> str:
    sharing = (
        f"Up to {BATCHED_CHATS} text chats are answered together; chats with images one at a time."
        if batched
        else "One answer is generated at a time; others wait in line."
    )
    lines = [
        "# Llama 4 chat",
        f"Model: **{label}**.",
        TINY_NOTE if is_tiny else "",
        f"Attach up to {limits.max_images_per_message} images per message ({limits.max_image_bytes / 2**20:g} MB "
        f"each, {limits.max_images_per_chat} per conversation). {sharing} The bin icon above the chat clears it.",
    ]
    return "\n\n".join(line for line in lines if line)


def _settings(sampling: GenerationSettings, max_new_tokens_cap: int) -> list[gr.components.Component]:
    """System prompt and sampling controls, created unrendered (placed by :func:`build_demo`).

    Each has a value, which the ``/chat`` API takes as the parameter's default: API clients may send the message only.
    """
    return [
        gr.Textbox(
            value="", label="System prompt", placeholder="e.g. You are a concise assistant.", lines=3, render=False
        ),
        gr.Slider(0.0, 2.0, value=sampling.temperature, step=0.05, label="Temperature (0 = greedy)", render=False),
        gr.Slider(0.05, 1.0, value=sampling.top_p, step=0.05, label="Top-p", render=False),
        gr.Slider(
            1,
            max_new_tokens_cap,
            value=min(sampling.max_new_tokens, max_new_tokens_cap),
            step=1,
            label="Max new tokens",
            render=False,
        ),
    ]


def build_demo(
    engine: ChatEngine, label: str, is_tiny: bool, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> gr.Blocks:
    """The chat page for ``engine``, its sampling controls starting at the engine's settings and its answer length at
    ``max_new_tokens``. The queue lets :data:`BATCHED_CHATS` chats in at once when the engine shares a batch, else one.
    """
    limits = engine.limits
    sampling = replace(engine.sampling, max_new_tokens=max_new_tokens)
    settings = _settings(sampling, max_new_tokens_cap=min(4096, engine.context_length))
    concurrency = BATCHED_CHATS if engine.batcher is not None else 1
    textbox = gr.MultimodalTextbox(
        placeholder="Type a message, attach images with the clip…",
        file_types=["image"],
        file_count="multiple",
        sources=["upload"],
        max_plain_text_length=limits.max_text_chars,
        submit_btn=True,
        stop_btn=True,  # ChatInterface takes the stop button from a textbox passed in
        elem_id="chat-input",
        render=False,
    )
    with gr.Blocks(title="Llama 4 chat", analytics_enabled=False) as demo:
        gr.Markdown(_header(label, is_tiny, limits, batched=engine.batcher is not None))
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=260):  # rendered first: ChatInterface then leaves them in place
                for component in settings:
                    component.render()
            with gr.Column(scale=3):
                chat = gr.ChatInterface(
                    engine.respond,
                    multimodal=True,
                    textbox=textbox,
                    chatbot=gr.Chatbot(label="Llama 4", height=520, elem_id="chat"),
                    additional_inputs=settings,
                    concurrency_limit=concurrency,
                    api_name="chat",
                    fill_height=False,
                )
        _clear_cancels_answer(demo, chat)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo


def _clear_cancels_answer(demo: gr.Blocks, chat: gr.ChatInterface) -> None:
    """Make the chat's clear (bin) button also stop the answer being streamed, as the stop button does.

    ChatInterface wires its answer events to the stop button only, so a cleared chat kept filling up. The events are
    found through the stop button's listener, the one listener of the chat that cancels others.
    """
    (stop,) = [fn for fn in demo.fns.values() if fn.cancels]
    answer_events = [demo.fns[index].get_config() for index in stop.cancels]
    # Empty the chat again once cancelled: an update the answer sent before it stopped lands after the clear.
    chat.chatbot.clear(None, cancels=answer_events).then(lambda: [], None, chat.chatbot, api_visibility="undocumented")


def launch_kwargs(host: str, port: int, limits: Limits) -> dict:
    """Arguments of ``demo.launch``. Gradio refuses uploads over twice the per-image limit outright; between the
    limit and that, the chat explains the limit (a clearer message than an upload error).

    No public share link, whatever ``GRADIO_SHARE`` says: the demo serves where ``--host`` binds. ``quiet`` drops
    Gradio's own banner, which suggests ``share=True``; the CLI logs the address instead.
    """
    return dict(
        server_name=host,
        server_port=port,
        share=False,
        quiet=True,
        max_file_size=2 * limits.max_image_bytes,
        theme=THEME,
        footer_links=["api"],
        show_error=True,
    )
