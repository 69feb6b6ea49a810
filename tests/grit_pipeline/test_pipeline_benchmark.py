"""The pipeline benchmark runs end to end at a small size and its result adds up (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pipeline_benchmark_runs_and_its_figures_add_up(tmp_path):
    # A process of its own: the benchmark starts a local Ray and shuts it down, which must not touch the test
    # session's Ray.
    code = (
        "import json, sys, benchmarks.pipeline as bp\n"
        "json.dump(bp.run('cpu', samples=12, files=2), open(sys.argv[1], 'w'))\n"
    )
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=540
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    stages = ["read", "text", "decode", "grounding", "write"]
    assert list(r["stage_alone_s"]) == stages and list(r["stage_in_pipeline_s"]) == stages
    assert all(v > 0 for v in r["stage_alone_s"].values())
    assert abs(r["stage_sum_s"] - sum(r["stage_alone_s"].values())) < 0.01
    assert abs(r["stage_sum_s"] - (r["stage_sum_before_s"] + r["stage_sum_after_s"]) / 2) < 0.01
    # The figures are rounded to 3 decimals, the ratios computed before rounding.
    assert abs(r["ratio"] - r["end_to_end_s"] / r["stage_sum_s"]) < 0.002 * max(1.0, r["ratio"])
    assert r["meets_target"] == (r["ratio"] <= r["target_ratio"])
    assert r["fixed_cost_s"] > 0 and r["ray_init_s"] > 0
    without = max(r["end_to_end_s"] - r["fixed_cost_s"], 0) / r["stage_sum_s"]
    assert abs(r["ratio_without_fixed_cost"] - without) < 0.002 * max(1.0, without)
    assert len(r["settle_s"]) == 3 and all(0 < v < 31 for v in r["settle_s"])
    # Every sample ends in a complete shard, kept or dropped (the tiny detector's boxes are random), none lost.
    assert r["samples"] == r["input"] == 12 and r["kept"] + r["dropped"] == 12
