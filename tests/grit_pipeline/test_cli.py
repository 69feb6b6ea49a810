"""``grit --version`` and ``kosmos --version``: the project's version, printed without importing any subcommand."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("prog, module", [("grit", "grit_pipeline"), ("kosmos", "kosmos")])
@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(prog, module, flag):
    code = (
        f"import sys; from {module}.cli import main; rc = main([{flag!r}]); "
        "print(sorted(m for m in ('torch', 'ray', 'spacy', 'transformers') if m in sys.modules)); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    version_line, heavy = proc.stdout.strip().splitlines()
    assert version_line == f"{prog} {PROJECT_VERSION}"
    assert heavy == "[]"  # nothing heavy is imported to print a version


def test_python_m_entry_point_and_usage_mention_version():
    proc = subprocess.run(
        [sys.executable, "-m", "grit_pipeline", "--version"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert proc.stdout.strip() == f"grit {PROJECT_VERSION}"
    usage = subprocess.run([sys.executable, "-m", "grit_pipeline", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "grit --version" in usage.stdout and "export" in usage.stdout
