"""What `pip install` puts in site-packages: no top-level `app` or `conversion` to collide with a user's own."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(out),
        str(REPO),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (built,) = out.glob("modeling_llama4-*.whl")
    return built


def test_wheel_installs_only_namespaced_packages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"modeling_llama4", "llama4_demo", "llama4_convert"}
    assert "llama4_convert/cli.py" in names and "llama4_demo/cli.py" in names
    assert "modeling_llama4/chat_template.jinja" in names
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "llama4-convert = llama4_convert.cli:main" in text and "llama4-demo = llama4_demo.cli:main" in text
    assert "llama4-serve = modeling_llama4.serve:main" in text


@pytest.mark.parametrize(
    "command",
    [["llama4-convert", "--help"], ["llama4-demo", "--help"], [sys.executable, "-m", "llama4_convert", "--help"]],
)
def test_installed_entry_points_run_outside_the_checkout(command, tmp_path):
    """Console scripts and `python -m llama4_convert` resolve the installed names from any folder."""
    script_dir = Path(sys.executable).parent
    if not command[0].startswith("/"):
        command = [str(script_dir / command[0]), *command[1:]]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
