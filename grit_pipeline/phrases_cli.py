"""``grit phrases``: print how captions will be parsed (noun chunks, filters, expressions, containment)."""

from __future__ import annotations

import argparse
import json
import sys

from grit_pipeline.config import TextConfig
from grit_pipeline.text import SpacyModelMissing, TextStage, describe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="captions to parse")
    parser.add_argument("--model", default=TextConfig.spacy_model, help="spaCy pipeline (default %(default)s)")
    parser.add_argument("--file", help="a file with one caption per line ('-' for standard input)")
    parser.add_argument("--keep-pronouns", action="store_true", help="do not filter chunks whose root is a pronoun")


def run(args: argparse.Namespace) -> int:
    captions = list(args.texts)
    if args.file:
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
        with stream:
            captions.extend(line.rstrip("\n") for line in stream)
    if not captions:
        print("grit phrases: give captions as arguments or with --file", file=sys.stderr)
        return 2
    stage = TextStage(TextConfig(spacy_model=args.model, drop_pronouns=not args.keep_pronouns))
    try:
        stage.setup()
    except SpacyModelMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    batch = 1024
    for i in range(0, len(captions), batch):
        for result in stage(captions[i : i + batch]):
            print(json.dumps(describe(result), ensure_ascii=False))
    return 0
