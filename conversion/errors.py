"""The one exception the converter raises for bad inputs: the CLI prints its message and exits non-zero."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint, a params.json or an output folder the converter cannot work with; the message names the file."""
