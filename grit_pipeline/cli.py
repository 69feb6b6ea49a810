"""``grit`` command line: thin entry points that parse arguments, load the config and call one function.

Subcommands live in their own modules and are imported only when chosen, so ``grit phrases`` does not pay for
importing torch or Ray. Each module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import sys

from grit_core.cli import dispatch

SUBCOMMANDS = {
    "phrases": ("grit_pipeline.phrases_cli", "show how captions are parsed into noun chunks and expressions"),
    "build": ("grit_pipeline.build", "build a GRIT corpus from image-caption pairs (Ray Data job)"),
    "stats": ("grit_pipeline.stats", "write the statistics report of a built corpus"),
    "export": ("grit_pipeline.export", "write a built corpus's kept records as GRIT-20M-schema parquet"),
}


def main(argv: list[str] | None = None) -> int:
    from grit_pipeline import __version__

    return dispatch("grit", SUBCOMMANDS, argv, version=__version__)


if __name__ == "__main__":
    sys.exit(main())
