"""``grit`` command line: thin entry points that parse arguments, load the config and call one function.

Subcommands live in their own modules and are imported only when chosen, so ``grit phrases`` does not pay for
importing torch or Ray. Each module defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "phrases": ("grit_pipeline.phrases_cli", "show how captions are parsed into noun chunks and expressions"),
    "build": ("grit_pipeline.build", "build a GRIT corpus from image-caption pairs (Ray Data job)"),
    "stats": ("grit_pipeline.stats", "write the statistics report of a built corpus"),
    "export": ("grit_pipeline.export", "write a built corpus's kept records as GRIT-20M-schema parquet"),
}


def dispatch(
    prog: str, subcommands: dict[str, tuple[str, str]], argv: list[str] | None, version: str | None = None
) -> int:
    """Shared by ``grit`` and ``kosmos``: pick the subcommand, import its module, parse and run it.

    ``--version`` prints ``<prog> <version>`` (the package's ``__version__``) without importing any subcommand.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(12, *(len(name) + 2 for name in subcommands))
    names = "\n".join(f"  {name:<{width}}{help_}" for name, (_, help_) in subcommands.items())
    usage = (
        f"usage: {prog} <command> [options]\n       {prog} --version\n\ncommands:\n{names}\n\n"
        f"`{prog} <command> --help` for a command's options"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version") and version is not None:
        print(f"{prog} {version}")
        return 0
    name = argv[0]
    if name not in subcommands:
        print(f"{prog}: unknown command {name!r}\n\n{usage}", file=sys.stderr)
        return 2
    module = importlib.import_module(subcommands[name][0])
    parser = argparse.ArgumentParser(prog=f"{prog} {name}", description=subcommands[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    from grit_pipeline import __version__

    return dispatch("grit", SUBCOMMANDS, argv, version=__version__)


if __name__ == "__main__":
    sys.exit(main())
