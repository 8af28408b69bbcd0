"""Output folders that appear complete or not at all.

Everything is written into a hidden staging folder beside the output and renamed into place at the end. A run that
fails or is interrupted removes its staging folder; one that is killed leaves only a hidden ``.NAME.partial-*``
folder, never a half checkpoint under the output name.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConversionError

logger = logging.getLogger(__name__)


def check_output_dir(output_dir: Path, input_dir: Path, overwrite: bool) -> None:
    """Refuse an output that is, holds or lies inside the input, and a non-empty one unless ``overwrite``."""
    output, source = output_dir.resolve(), input_dir.resolve()
    if output == source or source in output.parents or output in source.parents:
        raise ConversionError(f"output folder {output_dir} must not be, contain or lie inside the input {input_dir}")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"output {output_dir} exists and is not a folder")
    if _non_empty(output_dir) and not overwrite:
        raise ConversionError(f"output folder {output_dir} is not empty (pass --overwrite to replace it)")


@contextmanager
def staged_output(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``output_dir``; on success rename it to ``output_dir``, else delete it."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _publish(staging, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    if not _non_empty(output_dir):
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    elif overwrite:
        retired = output_dir.parent / f".{output_dir.name}.replaced-{uuid.uuid4().hex[:8]}"
        output_dir.rename(retired)
        staging.rename(output_dir)
        shutil.rmtree(retired)
    else:
        raise ConversionError(f"output folder {output_dir} was filled by someone else during the conversion")
    logger.info("wrote %s", output_dir)


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())
