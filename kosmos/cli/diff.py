"""``kosmos diff-checkpoints BEFORE AFTER [--expect-frozen PREFIX] [--expect-trained PREFIX] [--json]``: which
weights changed between two checkpoints, per module (:mod:`kosmos.eval.weight_diff`). Exit status 1 when an
expectation fails.
"""

from __future__ import annotations

import argparse
import json
import sys

from kosmos.eval.weight_diff import check_expectations, diff_state_dicts, format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("before", help="checkpoint folder (or run folder: its latest checkpoint)")
    parser.add_argument("after", help="checkpoint folder (or run folder: its latest checkpoint)")
    parser.add_argument("--depth", type=int, default=2, help="name components per module (default %(default)s)")
    parser.add_argument("--expect-frozen", action="append", default=[], metavar="PREFIX", help="e.g. vision")
    parser.add_argument("--expect-trained", action="append", default=[], metavar="PREFIX", help="e.g. blocks")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from kosmos.model.checkpoint import load_state_dict
    from kosmos.train.state import resolve_model_dir

    try:
        a, b = resolve_model_dir(args.before), resolve_model_dir(args.after)
        rows = diff_state_dicts(load_state_dict(a), load_state_dict(b), args.depth)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = check_expectations(rows, args.expect_frozen, args.expect_trained)
    if args.json:
        print(json.dumps({"before": str(a), "after": str(b), "modules": rows, "problems": problems}))
    else:
        print(f"{a} -> {b}")
        print(format_table(rows))
        for problem in problems:
            print(f"PROBLEM: {problem}")
    return 1 if problems else 0
