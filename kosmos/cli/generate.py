"""``kosmos generate --checkpoint DIR --image FILE [--prompt "<grounding>An image of"] [--out FILE]``: grounded
generation for one image. Prints one JSON object (the text, the generated tags, and each entity's phrase, span and
boxes) and saves the image with the boxes drawn.

``DIR`` is a checkpoint folder, a training run folder (its latest checkpoint) or a ``kosmos convert`` output; its
tokenizer is the ``tokenizer/`` folder beside the weights (training checkpoints), tokenizer files beside them
(converted Hugging Face folders), or ``--tokenizer``. The work is :mod:`kosmos.eval.generate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from kosmos.data.transform import resolve_image_frame
from kosmos.eval.generate import draw_entities, generate_for_image, pick_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint, run or converted model folder")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument(
        "--prompt", default="<grounding>An image of", help="text after the image (default %(default)r)"
    )
    parser.add_argument("--out", default="", help="where to save the image with boxes (default: <image>_boxes.png)")
    parser.add_argument("--tokenizer", default="", help="tokenizer folder, if not beside the weights")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=3, help="the released model uses 3")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument(
        "--image-frame",
        choices=("auto", "center_crop", "square"),
        default="auto",
        help="how the image becomes the model's square: auto (square for a converted Hugging Face checkpoint, as its "
        "processor does; else the frame the model was trained with, center_crop by default)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from kosmos.data.tokenizer import KosmosTokenizer
    from kosmos.model.checkpoint import load_model
    from kosmos.train.state import CheckpointError, resolve_model_dir, resolve_tokenizer_dir

    try:
        model_dir = resolve_model_dir(args.checkpoint)
        tokenizer = KosmosTokenizer.from_pretrained(args.tokenizer or resolve_tokenizer_dir(model_dir))
        device = torch.device(pick_device(args.device))
        model = load_model(model_dir, device=device).eval()
        frame = resolve_image_frame(args.image_frame, model_dir)
        image = Image.open(args.image)
        image.load()
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = generate_for_image(model, tokenizer, image, args.prompt, args, frame)
    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}_boxes.png")
    draw_entities(image, result["entities"]).save(out)
    result["checkpoint"] = str(model_dir)
    result["image_out"] = str(out)
    print(json.dumps(result))
    return 0
