"""What a person watching a build sees: progress lines (also while nothing arrives) and the summary table."""

from __future__ import annotations

import io
import time
from collections import Counter

from grit_pipeline.progress import Progress, merge_stats, summary_table


def test_progress_lines_keep_coming_while_results_do_not():
    out = io.StringIO()
    progress = Progress(interval_s=0.05, resumed_shards=2, resumed_samples=10, stream=out)
    progress.start()
    try:
        progress.rows_seen(3, pending=1)
        progress.shard_done({"counts": {"kept": 2, "dropped": 1, "boxes": 5}})
        time.sleep(0.3)  # no rows arrive: the ticker still reports
    finally:
        progress.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2
    assert "3 samples processed" in lines[-1] and "1 this run + 2 before" in lines[-1]
    assert "kept 2, dropped 1, boxes 5" in lines[-1] and "open blocks: 1" in lines[-1]
    n = len(out.getvalue())
    time.sleep(0.15)
    assert len(out.getvalue()) == n  # stopped means stopped


def test_summary_table_lists_every_reason_and_stage():
    counts, seconds = merge_stats(
        [
            {"counts": {"input": 10, "kept": 6, "dropped": 4, "dropped_bad_image": 3, "dropped_unsafe_member": 1},
             "seconds": {"grounding": 2.0, "text": 0.5}},
            {"counts": {"input": 5, "kept": 5, "boxes": 9, "grounding_actor_restarts": 1}, "seconds": {"write": 0.1}},
        ]
    )  # fmt: skip
    assert counts == Counter(
        {"input": 15, "kept": 11, "dropped": 4, "dropped_bad_image": 3, "dropped_unsafe_member": 1, "boxes": 9,
         "grounding_actor_restarts": 1}
    )  # fmt: skip
    table = summary_table(counts, seconds, 65.0, 2, "complete", ["detector has RANDOM weights"])
    assert "complete, 2 shard(s), wall time 0:01:05" in table
    assert "bad_image" in table and "unsafe_member" in table and "73.3%" in table
    assert "grounding actor restarts" in table and "WARNING: detector has RANDOM weights" in table
    for stage in ("read", "decode", "text", "grounding", "write"):
        assert stage in table


def test_progress_shows_total_percentage_and_eta_when_the_size_is_known():
    out = io.StringIO()
    progress = Progress(interval_s=0, resumed_shards=1, resumed_samples=100, stream=out, total_samples=1000)
    progress.start()
    progress.started -= 10.0  # ten seconds in
    progress.rows_seen(200, pending=2)  # 200 this run: 20/s, 700 left -> 35 s
    done, percent, left = progress.eta()
    assert (done, percent) == (300, 30.0) and 34 < left < 36
    progress.print_line(2)
    line = out.getvalue()
    assert "300/1,000 samples (30.0%, ETA 0:00:3" in line and "200 processed this run" in line
    unknown = Progress(interval_s=0, resumed_shards=0, resumed_samples=0, stream=io.StringIO())
    assert unknown.eta() is None
    unknown.set_total(50)
    assert unknown.eta() == (0, 0.0, None)  # no rate yet: no ETA, but the total and percentage
