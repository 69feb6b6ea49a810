"""``torchrun --nproc-per-node 2 -m kosmos train`` on CPU (gloo): DDP and FSDP, a few steps of the tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_runs import read_metrics, train_args

from kosmos.train.state import latest_checkpoint


def torchrun(shapes, out: Path, *sets: str) -> list[dict]:
    """Run two ranks; return each rank's summary (every rank prints one under torchrun)."""
    args = train_args(shapes["tokenizer"], shapes["train"], out, *sets)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "kosmos"]
    proc = subprocess.run(command + args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return sorted(summaries, key=lambda s: s["rank"])


def test_two_ranks_agree_and_checkpoint_with_ddp_and_fsdp(shapes, tmp_path):
    common = ("run.max_steps=6", "run.log_every=1", "run.checkpoint_every=3", "data.batch_size=8")
    common += ("data.num_workers=0", "run.threads=1")
    runs = {}
    for kind in ("ddp", "fsdp"):
        out = tmp_path / kind
        ranks = torchrun(shapes, out, *common, f"parallel.data_parallel={kind}")
        assert [s["rank"] for s in ranks] == [0, 1]
        # Same weights on both ranks after six updates; each rank read its own half of the data.
        assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-12)
        assert ranks[0]["samples_seen"] == ranks[1]["samples_seen"] == 48
        final = latest_checkpoint(out)
        assert final.name == "step_00000006"
        states = [json.loads((final / f"rank{r}.json").read_text())["data"] for r in (0, 1)]
        assert [(s["rank"], s["world_size"]) for s in states] == [(0, 2), (1, 2)]
        runs[kind] = read_metrics(out)
    # DDP and FSDP compute the same updates on the same data split.
    ddp, fsdp = ([r["loss"] for r in runs[k]] for k in ("ddp", "fsdp"))
    assert len(ddp) == 6 and ddp == pytest.approx(fsdp, abs=1e-5)
    assert ddp[-1] < ddp[0]
