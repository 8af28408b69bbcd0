"""``python -m app`` (from a checkout) or ``python -m llama4_demo`` (installed): run the Llama 4 chat demo."""

from .cli import main

raise SystemExit(main())
