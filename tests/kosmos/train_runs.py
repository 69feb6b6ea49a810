"""Helpers of the training tests: command lines for ``kosmos train`` on the shapes corpus, and reading a run."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "train" / "tiny-cpu.yaml"


def train_args(tokenizer: str, shards: str, out: Path, *sets: str, config: Path = TINY_CONFIG) -> list[str]:
    """``train --config tiny-cpu.yaml`` on ``shards``, writing to ``out``, with extra ``--set`` values."""
    args = ["train", "--config", str(config), "--set", f"tokenizer={tokenizer}"]
    args += ["--set", f"data.sources=[{{kind: grit, shards: ['{shards}']}}]", "--set", f"run.output_dir={out}"]
    args += ["--set", "run.tensorboard=false"]
    for item in sets:
        args += ["--set", item]
    return args


def read_metrics(out: Path, kind: str = "train") -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def last_json_line(text: str) -> dict:
    """The last line of ``text`` that is a JSON object (the CLIs print their result last)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{text[-2000:]}")
