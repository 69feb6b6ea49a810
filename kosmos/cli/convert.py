"""``kosmos convert --from-hf DIR --out DIR`` and ``kosmos convert --to-hf DIR --out DIR``: checkpoints to and from
Hugging Face's ``Kosmos2ForConditionalGeneration`` layout (:mod:`kosmos.model.hf`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kosmos.model.checkpoint import load_config
from kosmos.model.hf import convert_from_hf, convert_to_hf

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--from-hf", metavar="DIR", help="a Hugging Face Kosmos2ForConditionalGeneration folder")
    which.add_argument("--to-hf", metavar="DIR", help="one of our checkpoint folders")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating weights (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace weights already in --out")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "model.safetensors").exists() and not args.overwrite:
        print(f"kosmos convert: {out} already holds model.safetensors (--overwrite to replace)", file=sys.stderr)
        return 2
    dtype = _DTYPES.get(args.dtype) if args.dtype else None
    try:
        if args.from_hf:
            cfg = convert_from_hf(args.from_hf, out, dtype)
            what = f"HF {args.from_hf} -> kosmos {out}"
        else:
            convert_to_hf(args.to_hf, out, dtype)
            cfg = load_config(args.to_hf)
            what = f"kosmos {args.to_hf} -> HF {out}"
    except (FileNotFoundError, ValueError) as exc:
        print(f"kosmos convert: {exc}", file=sys.stderr)
        return 2
    t, v = cfg.text, cfg.vision
    print(f"{what}: text {t.layers}x{t.dim}, vision {v.layers}x{v.width}, vocab {t.vocab_size}")
    return 0
