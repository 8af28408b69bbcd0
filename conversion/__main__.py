"""``python -m conversion`` (from a checkout) or ``python -m llama4_convert`` (installed): ``llama4-convert``."""

from .cli import main

raise SystemExit(main())
