"""``kosmos`` command line: one module per subcommand in this package, each defining ``add_arguments(parser)`` and
``run(args) -> int`` that parse and call the library (``kosmos.model``, ``kosmos.data``, ``kosmos.train``,
``kosmos.eval``). ``kosmos --version`` prints the version."""

from __future__ import annotations

import sys

from grit_core.cli import dispatch
from kosmos import __version__

SUBCOMMANDS = {
    "tokenizer": ("kosmos.cli.tokenizer", "train a tokenizer on corpus captions (tokenizer train ...)"),
    "convert": ("kosmos.cli.convert", "convert checkpoints to and from Hugging Face Kosmos-2"),
    "train": ("kosmos.cli.train", "pretrain or fine-tune from GRIT shards (also under torchrun)"),
    "generate": ("kosmos.cli.generate", "grounded generation for an image"),
    "eval": ("kosmos.cli.eval", "loss and phrase-grounding accuracy on held-out shards"),
    "diff-checkpoints": ("kosmos.cli.diff", "which weights changed between two checkpoints, per module"),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("kosmos", SUBCOMMANDS, argv, version=__version__)


if __name__ == "__main__":
    sys.exit(main())
