"""``kosmos eval --checkpoint DIR --shards PATTERN [--shards ...]``: loss and phrase-grounding accuracy on held-out
GRIT shards, printed as one JSON object.

For every sample: the loss of its grounded sequence (mean over target tokens); for every phrase it grounds (after
the loader's score threshold, crop and containment filter): the box the model gives when prompted with
``<grounding><phrase> text</phrase>``, correct when its IoU with one of the phrase's boxes is >= 0.5
(kosmos/eval/grounding.py has the protocol). Beside the accuracy: the mean-box and centred-box baselines on the
same phrases, and with ``--shuffle-images`` the same scoring with every caption given another sample's image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint, run or converted model folder")
    parser.add_argument("--shards", action="append", required=True, metavar="PATTERN", help="GRIT shards; repeat")
    parser.add_argument("--tokenizer", default="", help="tokenizer folder, if not beside the weights")
    parser.add_argument("--max-samples", type=int, default=0, help="stop after this many samples (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle-images", action="store_true", help="score each caption with another image")
    parser.add_argument("--box-score-threshold", type=float, default=0.65, help="as the training loader (0.65)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument(
        "--image-frame",
        choices=("auto", "center_crop", "square"),
        default="auto",
        help="auto: square for a converted Hugging Face checkpoint, else the frame the model was trained with",
    )
    parser.add_argument("--out", default="", help="also write the JSON to this file")


def run(args: argparse.Namespace) -> int:
    import torch

    from kosmos.data.sequence import SequenceConfig
    from kosmos.data.tokenizer import KosmosTokenizer
    from kosmos.data.transform import resolve_image_frame
    from kosmos.eval.generate import pick_device
    from kosmos.eval.grounding import evaluate_samples, read_eval_samples
    from kosmos.model.checkpoint import load_model
    from kosmos.train.state import CheckpointError, resolve_model_dir, resolve_tokenizer_dir

    t0 = time.perf_counter()
    try:
        model_dir = resolve_model_dir(args.checkpoint)
        tokenizer = KosmosTokenizer.from_pretrained(args.tokenizer or resolve_tokenizer_dir(model_dir))
        model = load_model(model_dir, device=torch.device(pick_device(args.device))).eval()
        cfg = model.config
        seq = SequenceConfig(
            box_score_threshold=args.box_score_threshold,
            image_frame=resolve_image_frame(args.image_frame, model_dir),
            image_size=cfg.vision.image_size,
            num_image_tokens=cfg.latent_query_num,
            num_bins=cfg.loc_bins,
        )
        samples, counts = read_eval_samples(
            args.shards, tokenizer, seq, args.max_samples, max_length=cfg.text.max_positions
        )
        if not samples:
            raise ValueError(f"no usable sample in {args.shards} (counts: {dict(counts)})")
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = evaluate_samples(model, tokenizer, samples, args.batch_size, shuffle_images=args.shuffle_images)
    result = {
        "checkpoint": str(model_dir),
        "shards": args.shards,
        "image_frame": seq.image_frame,
        **result,
        "counts": dict(counts),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0
