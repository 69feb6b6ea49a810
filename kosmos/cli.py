"""``kosmos`` command line. Each subcommand's module defines ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import sys

from grit_pipeline.cli import dispatch

SUBCOMMANDS = {
    "tokenizer": ("kosmos.tokenizer_cli", "train a tokenizer on corpus captions (tokenizer train ...)"),
    "convert": ("kosmos.convert", "convert checkpoints to and from Hugging Face Kosmos-2"),
    "train": ("kosmos.train", "pretrain or fine-tune from GRIT shards (also under torchrun)"),
    "generate": ("kosmos.generate", "grounded generation for an image"),
    "eval": ("kosmos.evaluate", "loss and phrase-grounding accuracy on held-out shards"),
    "diff-checkpoints": ("kosmos.weight_diff", "which weights changed between two checkpoints, per module"),
}


def main(argv: list[str] | None = None) -> int:
    from kosmos import __version__

    return dispatch("kosmos", SUBCOMMANDS, argv, version=__version__)


if __name__ == "__main__":
    sys.exit(main())
