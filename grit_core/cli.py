"""Subcommand dispatch shared by the ``grit`` and ``kosmos`` command lines.

A command line is a table ``{name: (module, help)}``. The chosen subcommand's module is imported only when chosen, so
a light command never pays for importing torch or Ray; each module defines ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def dispatch(
    prog: str, subcommands: dict[str, tuple[str, str]], argv: list[str] | None, version: str | None = None
) -> int:
    """Pick the subcommand named by ``argv[0]``, import its module, parse the rest and run it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(12, *(len(name) + 2 for name in subcommands))
    names = "\n".join(f"  {name:<{width}}{help_}" for name, (_, help_) in subcommands.items())
    usage = (
        f"usage: {prog} <command> [options]\n"
        + (f"       {prog} --version\n" if version is not None else "")
        + f"\ncommands:\n{names}\n\n`{prog} <command> --help` for a command's options"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if version is not None and argv[0] in ("-V", "--version"):
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
