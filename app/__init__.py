"""Gradio chat demo for Llama 4: text and images in, a streamed answer out.

Run it with ``python -m app`` (or the ``llama4-demo`` console script); ``--help`` lists the options. Without
``--model`` it serves a tiny random-weight multimodal Llama 4 (see :mod:`modeling_llama4.tiny`), so it starts in seconds on a
CPU; its answers are random tokens.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m app`` and ``llama4-demo`` (imported lazily: torch and gradio are heavy)."""
    from .cli import main as cli_main

    return cli_main(argv)
