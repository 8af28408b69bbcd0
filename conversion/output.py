"""Output folders that appear complete or not at all.

Everything is written into a hidden staging folder beside the output and renamed into place at the end. A run that
fails or is interrupted (an error, Ctrl-C, SIGTERM through the CLI) removes its staging folder; one that is killed
leaves only a hidden ``.NAME.partial-PID@HOST-*`` folder, never a half checkpoint under the output name. The next
run for the same output removes the staging folders of dead runs of this machine and reports the others.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
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
    """Yield a fresh staging folder beside ``output_dir``; on success rename it to ``output_dir``, else delete it.

    ``OSError``s (no space left, no permission, a file in the way) become ``ConversionError``s.
    """
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(output_dir)
        staging = output_dir.parent / f".{output_dir.name}.partial-{os.getpid()}@{_HOST}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as error:
        raise ConversionError(f"cannot create the output folder {output_dir}: {error}") from error
    try:
        yield staging
        _publish(staging, output_dir, overwrite)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConversionError(f"writing {output_dir} failed: {error}") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
_STAGING = re.compile(r"\.(?P<name>.+)\.partial-(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9_.]+)-)?[0-9a-f]{8}")


def remove_stale_staging(output_dir: Path) -> None:
    """Delete the staging folders of ``output_dir`` left by killed runs on this machine; log the others."""
    for path in output_dir.parent.glob(f".{output_dir.name}.partial-*"):
        match = _STAGING.fullmatch(path.name)
        if match is None or match["name"] != output_dir.name:
            continue
        if match["host"] == _HOST and not _process_alive(int(match["pid"])):
            logger.info("removing %s, left by an interrupted conversion (process %s)", path, match["pid"])
            shutil.rmtree(path, ignore_errors=True)
        else:
            owner = f"process {match['pid']} on {match['host']}" if match["pid"] else "an older converter"
            logger.warning("%s belongs to %s: delete it by hand if that conversion is not running", path, owner)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


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
