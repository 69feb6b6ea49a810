"""``kosmos tokenizer train --shards PATTERN [--shards ...] --vocab-size N --out DIR``: a byte-level BPE trained on
corpus captions (tar shards: ``<key>.txt`` or the record's caption; JSONL: the ``text`` field), with the Kosmos-2
tokens appended. Prints a JSON summary."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from itertools import islice

from kosmos.data.shards import complete_shards, expand_shard_patterns, iter_shard_texts
from kosmos.data.tokenizer import KosmosTokenizer, TokenizerError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a tokenizer on corpus captions")
    train.add_argument(
        "--shards", action="append", required=True, metavar="PATTERN", help="tar/JSONL shards (braces, globs); repeat"
    )
    train.add_argument("--vocab-size", type=int, required=True, help="text pieces, <s> <pad> </s> <unk> included")
    train.add_argument("--out", required=True, help="folder to write the tokenizer to")
    train.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learnt")
    train.add_argument("--max-texts", type=int, default=0, help="stop after this many captions (0: all)")
    train.add_argument("--text-field", default="text", help="field of JSONL lines (default %(default)s)")
    train.add_argument("--all-shards", action="store_true", help="also read tars without their _stats.json")


def run(args: argparse.Namespace) -> int:
    if args.action != "train":  # pragma: no cover - argparse enforces the choice
        return 2
    try:
        urls = expand_shard_patterns(args.shards)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    skipped: list[str] = []
    if not args.all_shards:
        urls, skipped = complete_shards(urls)
        for url in skipped:
            print(f"warning: {url} has no _stats.json (incomplete shard): skipped", file=sys.stderr)
    if not urls:
        print("error: no shard to read", file=sys.stderr)
        return 2
    counter = {"texts": 0, "chars": 0}

    def texts() -> Iterator[str]:
        stream = iter_shard_texts(urls, args.text_field)
        if args.max_texts > 0:
            stream = islice(stream, args.max_texts)
        for text in stream:
            counter["texts"] += 1
            counter["chars"] += len(text)
            yield text

    t0 = time.perf_counter()
    try:
        tokenizer = KosmosTokenizer.train(texts(), args.vocab_size, args.min_frequency)
    except TokenizerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if counter["texts"] == 0:
        print("error: the shards hold no caption text", file=sys.stderr)
        return 1
    tokenizer.extra_meta.update(
        {
            "trained_on": {
                "shards": len(urls),
                "shards_skipped_incomplete": len(skipped),
                "patterns": list(args.shards),
                "texts": counter["texts"],
                "chars": counter["chars"],
                "requested_vocab_size": args.vocab_size,
                "min_frequency": args.min_frequency,
            }
        }
    )
    out = tokenizer.save_pretrained(args.out)
    summary = {
        "out": str(out),
        "texts": counter["texts"],
        "shards": len(urls),
        "vocab_size": tokenizer.vocab_size,
        "text_vocab_size": tokenizer.mask_id,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(summary))
    return 0
