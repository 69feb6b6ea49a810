"""``kosmos train --config configs/train/NAME.yaml [--set key=value ...] [--resume]``; the same command under
``torchrun --nproc-per-node N`` trains data-parallel (``parallel.data_parallel: ddp`` or ``fsdp``).

Prints a progress line every ``run.log_every`` steps and, at the end, one JSON line with the run's summary. Exit
status: 0 done; 1 the run stopped (repeated non-finite steps, a failed checkpoint write, SIGTERM/SIGINT: the message
says which, and ``--resume`` continues from the last complete checkpoint); 2 bad config or files. On SIGTERM or
SIGINT (a cluster's pre-emption notice, Ctrl-C) the current step is finished and a checkpoint saved first; a second
signal stops at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML (configs/train/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    code = _train(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End a rank of a multi-process run without interpreter finalization. The process group is destroyed by then,
    but gloo's worker threads outlive it, and one may still be releasing the tensors of the last collective: taking
    the GIL while the interpreter finalizes aborts the process (SIGABRT, "terminate called without an active
    exception") after a run that succeeded. Every output is flushed first; nothing else is left to clean up."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _train(args: argparse.Namespace) -> int:
    from grit_core.config import ConfigError
    from kosmos.data.parquet import ParquetSourceError
    from kosmos.train.config import load_train_config
    from kosmos.train.loop import TrainingError
    from kosmos.train.run import run_training
    from kosmos.train.state import CheckpointError

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s" if "WORLD_SIZE" in os.environ else None,
    )
    try:
        cfg = load_train_config(args.config, args.set)
        summary = run_training(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, CheckpointError, ParquetSourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if rank == 0 or "rank" in summary:
        # One write per line: under torchrun the ranks share stdout, and print's separate newline could interleave.
        sys.stdout.write(json.dumps(summary) + "\n")
        sys.stdout.flush()
    return 0
