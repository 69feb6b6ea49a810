"""``grit stats OUTPUT_DIR``: the statistics report of a built corpus (or of GRIT-20M-style parquet files).

Writes ``report.html`` (self-contained: charts and thumbnails embedded), ``stats.json`` (every figure) and
``summary.md``. Figures come from one streaming pass over the parquet index and the ``_stats.json`` counters;
images are read only for the gallery. See docs/stats.md.

The package's modules import pyarrow, numpy and Pillow; this module does not, so ``grit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "output_dir",
        metavar="OUTPUT_DIR",
        help="a grit build output, a folder of GRIT-20M-style parquet files, or one .parquet file",
    )
    parser.add_argument("--out", metavar="REPORT_DIR", help="where to write the report (default OUTPUT_DIR/report)")
    parser.add_argument("--samples", type=int, default=24, help="gallery size, 0 for none (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gallery's random pick (default %(default)s)")
    parser.add_argument("--top", type=int, default=30, help="rows in each top list (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=65_536, help="index rows per batch (default %(default)s)")


def default_report_dir(output_dir: str | Path) -> Path:
    path = Path(output_dir)
    return path.with_name(path.stem + "_report") if path.is_file() else path / "report"


def run(args: argparse.Namespace) -> int:
    from grit_pipeline.stats.corpus import CorpusError
    from grit_pipeline.stats.figures import FigureOptions
    from grit_pipeline.stats.report import make_report

    if args.samples < 0 or args.top < 1 or args.batch_size < 1:
        print("grit stats: --samples must be >= 0, --top and --batch-size >= 1", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_report_dir(args.output_dir)
    opts = FigureOptions(samples=args.samples, seed=args.seed, batch_size=args.batch_size, top_k=args.top)
    try:
        result = make_report(args.output_dir, out, opts)
    except CorpusError as exc:
        print(f"grit stats: {exc}", file=sys.stderr)
        return 1
    s = result.figures["samples"]
    what = " (img2dataset download: kept = downloaded)" if result.figures["source"]["mode"] == "img2dataset" else ""
    print(f"{s['input']:,} input pairs, {s['kept']:,} kept{what}; figures in {result.seconds['figures']:.1f} s")
    for warning in result.figures["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    for path in (result.html, result.stats, result.summary):
        print(path)
    return 0
