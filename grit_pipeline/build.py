"""``grit build``: build (or continue) a GRIT corpus from image-caption pairs. See docs/pipeline.md.

Exit status: 0 when every input sample is in a complete shard (kept or counted as dropped); 1 when the build
started and did not finish (re-run the same command to resume); 130 / 143 when SIGINT / SIGTERM stopped it (the
manifest says incomplete; re-run to resume); 2 when it could not start (bad config or input, settings that differ
from the output's manifest, a model that cannot be loaded, an output that is not a grit output or that another
build holds).
"""

from __future__ import annotations

import argparse
import logging
import sys

from grit_pipeline.config import ConfigError, GritConfig, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (configs/default.yaml documents every key)")
    parser.add_argument(
        "--input",
        action="append",
        default=None,
        metavar="PATTERN",
        help="input file, folder or glob (repeatable; replaces input.paths): WebDataset tars, parquet, JSONL, "
        "or a folder of images with same-named .txt captions; local or fsspec URLs",
    )
    parser.add_argument("--output", help="output folder or fsspec URL, e.g. s3://bucket/prefix (output.path)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (a.b=value)"
    )
    parser.add_argument(
        "--offline-random-detector",
        action="store_true",
        help="where the detector's weights cannot be loaded, use a randomly initialised tiny detector "
        "(detector.allow_random_weights=true): a demo of the pipeline whose boxes are MEANINGLESS",
    )
    parser.add_argument(
        "--overwrite-config",
        action="store_true",
        help="continue an output built with other result settings (output.overwrite_config=true)",
    )
    parser.add_argument("--verbose", action="store_true", help="log at INFO level")


def config_from_args(args: argparse.Namespace) -> GritConfig:
    overrides = list(args.set)
    if args.output:
        overrides.append(f"output.path={args.output}")
    if args.offline_random_detector:
        overrides.append("detector.allow_random_weights=true")
    if args.overwrite_config:
        overrides.append("output.overwrite_config=true")
    cfg = load_config(GritConfig, args.config, overrides)
    if args.input:
        cfg.input.paths = list(args.input)
    return cfg


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = config_from_args(args)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from grit_pipeline.pipeline import run_build

    outcome = run_build(cfg)
    if outcome.random_weights:
        print(
            "WARNING: built with a RANDOMLY INITIALISED detector (--offline-random-detector): the corpus shows the "
            "pipeline working, but every box in it is meaningless.",
            file=sys.stderr,
        )
    return outcome.exit_code
