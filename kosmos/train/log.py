"""What a training run reports: ``metrics.jsonl`` (one JSON object per log step or evaluation), TensorBoard scalars
(``tensorboard/``), and a progress line on stdout a person can follow. Only rank 0 writes.

On resume, records after the resumed step (written by the interrupted run past its last checkpoint) are removed
from ``metrics.jsonl`` and TensorBoard purges them too, so the learning curve has one value per step.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_progress(record: dict[str, Any], max_steps: int) -> str:
    """``step 120/600 (20%) | loss 2.3451 | lr 1.60e-04 | gnorm 0.82 | 410 samples/s | 15.2k tok/s | eta 1m10s``."""
    step = record["step"]
    parts = [f"step {step}/{max_steps} ({100 * step / max(1, max_steps):.0f}%)", f"loss {record['loss']:.4f}"]
    parts.append(f"lr {record['lr']:.2e}")
    if record.get("grad_norm") is not None:
        parts.append(f"gnorm {record['grad_norm']:.3g}")
    parts.append(f"{record['samples_per_s']:.0f} samples/s")
    tok = record["tokens_per_s"]
    parts.append(f"{tok / 1000:.1f}k tok/s" if tok >= 1000 else f"{tok:.0f} tok/s")
    if record.get("nonfinite_skipped"):
        parts.append(f"skipped {record['nonfinite_skipped']}")
    if "eta_s" in record:
        parts.append(f"eta {format_duration(record['eta_s'])}")
    return " | ".join(parts)


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the records of ``path`` whose step is <= ``last_step``; returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut by a crash
            dropped += 1
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    return dropped


class MetricsLogger:
    """JSONL + TensorBoard + progress lines (rank 0; on other ranks every method does nothing)."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        tensorboard: bool,
        resume_step: int | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.file = None
        self.writer = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / METRICS_FILE
        if resume_step is not None:
            dropped = truncate_metrics(path, resume_step)
            if dropped:
                log.info("metrics.jsonl: %d records after step %d removed (the interrupted run)", dropped, resume_step)
        elif path.exists():
            path.unlink()  # a fresh run in a used folder starts a fresh curve
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional on machines that only train
                log.warning("tensorboard is not installed: TensorBoard logging is off (metrics.jsonl is written)")
            else:
                purge = resume_step + 1 if resume_step is not None else None
                self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)

    def log(self, record: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, **record}) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def print(self, line: str) -> None:
        if self.enabled:
            self.stream.write(line + "\n")  # one write: other ranks' output shares the stream
            self.stream.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
