"""What ``grit build`` ends with: its exit codes, the refusal raised before anything starts, and the outcome."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_FAILED = 1  # started and did not finish: re-run the same command to resume
EXIT_REFUSED = 2  # did not start: bad config or input, settings mismatch, missing model, output in use
# Stopped by a signal (128 + the signal's number, as shells report it); the manifest says "incomplete".
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class BuildRefused(RuntimeError):
    """The build cannot start; the message says why and what to do."""


@dataclass
class BuildOutcome:
    exit_code: int
    status: str  # "complete", "incomplete", "failed", "refused"
    message: str = ""
    shards: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    random_weights: bool = False
