"""``kosmos generate --checkpoint DIR --image FILE [--prompt "<grounding>An image of"] [--out FILE]``: grounded
generation for one image. Prints one JSON object (the text, the generated tags, and each entity's phrase, span and
boxes) and saves the image with the boxes drawn.

``DIR`` is a checkpoint folder, a training run folder (its latest checkpoint) or a ``kosmos convert`` output; its
tokenizer is the ``tokenizer/`` folder beside the weights (training checkpoints), tokenizer files beside them
(converted Hugging Face folders), or ``--tokenizer``. Boxes are given twice: normalised to the centre crop the
model sees (``boxes``, as transformers' ``post_process_generation`` gives them) and in pixels of the input image
(``boxes_px``), which is what is drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


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


def pick_device(name: str) -> str:
    """``auto``: CUDA when there is a GPU, else the CPU."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def crop_box_to_pixels(box: tuple[float, ...], width: int, height: int, size: int) -> list[float]:
    """A box normalised to the ``size`` centre crop of a ``width x height`` image, in that image's pixels."""
    from kosmos.image_transform import resize_crop_geometry

    new_w, new_h, left, top = resize_crop_geometry(width, height, size)
    sx, sy = width / new_w, height / new_h
    x1, y1, x2, y2 = box
    return [(x1 * size + left) * sx, (y1 * size + top) * sy, (x2 * size + left) * sx, (y2 * size + top) * sy]


def draw_entities(image: Image.Image, entities: list[dict[str, Any]]) -> Image.Image:
    """A copy of ``image`` with every entity's boxes and phrase drawn."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    line = max(1, round(min(out.size) / 150))
    for i, entity in enumerate(entities):
        colour = PALETTE[i % len(PALETTE)]
        for x1, y1, x2, y2 in entity["boxes_px"]:
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
            label = entity["phrase"]
            left, top, right, bottom = draw.textbbox((x1, y1), label)
            lift = bottom - top + 2
            draw.rectangle((x1, y1 - lift, x1 + right - left + 4, y1), fill=colour)
            draw.text((x1 + 2, y1 - lift), label, fill=(255, 255, 255))
    return out


def generate_for_image(
    model, tokenizer, image: Image.Image, prompt: str, args: argparse.Namespace | None = None
) -> dict[str, Any]:
    """Run the model on ``image`` after ``prompt`` and parse the result (no files written)."""
    import torch

    from kosmos.image_transform import clip_transform
    from kosmos.sequence import build_prompt, parse_generated_ids

    cfg = model.config
    device = next(model.parameters()).device
    ids, slots = build_prompt(tokenizer, prompt, cfg.latent_query_num)
    pixels = clip_transform(image.convert("RGB"), cfg.vision.image_size)[None].to(device)
    generator = None
    if args is not None and args.sample:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(
        pixels,
        torch.tensor([ids], device=device),
        torch.tensor([slots], device=device),
        max_new_tokens=args.max_new_tokens if args else 64,
        do_sample=bool(args and args.sample),
        temperature=args.temperature if args else 1.0,
        top_k=(args.top_k or None) if args else None,
        no_repeat_ngram_size=args.no_repeat_ngram_size if args else 3,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        generator=generator,
    )
    new_ids = out[0, len(ids) :].tolist()
    text, entities = parse_generated_ids(ids + new_ids, tokenizer, cfg.loc_bins)
    return {
        "prompt": prompt,
        "text": text,
        "generated": tokenizer.decode(new_ids, skip_special_tokens=True),
        "entities": [
            {
                "phrase": phrase,
                "span": list(span),
                "boxes": [list(b) for b in boxes],
                "boxes_px": [crop_box_to_pixels(b, image.width, image.height, cfg.vision.image_size) for b in boxes],
            }
            for phrase, span, boxes in entities
        ],
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from kosmos.checkpoint import load_model
    from kosmos.tokenizer import KosmosTokenizer
    from kosmos.train_state import CheckpointError, resolve_model_dir, resolve_tokenizer_dir

    try:
        model_dir = resolve_model_dir(args.checkpoint)
        tokenizer = KosmosTokenizer.from_pretrained(args.tokenizer or resolve_tokenizer_dir(model_dir))
        device = torch.device(pick_device(args.device))
        model = load_model(model_dir, device=device).eval()
        image = Image.open(args.image)
        image.load()
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = generate_for_image(model, tokenizer, image, args.prompt, args)
    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}_boxes.png")
    draw_entities(image, result["entities"]).save(out)
    result["checkpoint"] = str(model_dir)
    result["image_out"] = str(out)
    print(json.dumps(result))
    return 0
