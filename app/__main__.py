"""``python -m app``: run the Llama 4 chat demo."""

from app.cli import main

raise SystemExit(main())
