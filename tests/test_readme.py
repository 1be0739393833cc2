"""The README as a newcomer uses it: short, its Python snippet runs, and every command it names answers --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_front_page_stays_short():
    assert len(README.encode()) <= 12 * 1024


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_the_python_snippet_runs(pico_dir, tmp_path):
    (snippet,) = re.findall(r"```python\n(.*?)```", README, re.S)
    image(0, (64, 32)).save(tmp_path / "photo.png")
    code = snippet.replace("runs/shapes/model", str(pico_dir))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]


def _commands() -> list[str]:
    """Every `bonsai X` the README names, and the `python -m` modules of its shell blocks."""
    names = set(re.findall(r"`bonsai ([a-z-]+)", README))
    names |= {n for pair in re.findall(r"`bonsai ([a-z-]+)` / `([a-z-]+)`(?: / `([a-z-]+)`)?", README) for n in pair}
    mods = set(re.findall(r"python -m ([a-z_]+(?:\.[a-z_]+)*)", README)) - {"pytest"}
    return sorted(f"bonsai {n}" for n in names if n) + sorted(f"python -m {m}" for m in mods)


@pytest.mark.parametrize("command", _commands())
def test_every_command_the_readme_names_answers_help(command):
    from bonsai_mlx.__main__ import COMMANDS

    if command.startswith("bonsai "):
        name = command.split()[1]
        assert name in COMMANDS, f"the README names `{command}`, which bonsai does not have"
        argv = [sys.executable, "-m", "bonsai_mlx", name, "--help"]
    else:
        argv = [sys.executable, "-m", command.split()[-1], "--help"]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), (command, r.stderr[-2000:])
