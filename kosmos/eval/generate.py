"""Grounded generation for one image: the prompt with its image slots, decoding, the entities parsed out of the
generated text with their boxes, and a drawing of them. The library behind ``kosmos generate``
(``kosmos/cli/generate.py``).

Boxes are given twice: normalised to the crop the model sees (``boxes``, as transformers' ``post_process_generation``
gives them) and in pixels of the input image (``boxes_px``), which is what is drawn.
"""

from __future__ import annotations

import argparse
from typing import Any

from PIL import Image, ImageDraw

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def pick_device(name: str) -> str:
    """``auto``: CUDA when there is a GPU, else the CPU."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def crop_box_to_pixels(
    box: tuple[float, ...], width: int, height: int, size: int, frame: str = "center_crop"
) -> list[float]:
    """A box normalised to the model's ``size x size`` frame of a ``width x height`` image (its centre crop, or the
    whole image for ``square``), in that image's pixels."""
    from kosmos.data.transform import frame_geometry

    new_w, new_h, left, top = frame_geometry(width, height, size, frame)
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
    model,
    tokenizer,
    image: Image.Image,
    prompt: str,
    args: argparse.Namespace | None = None,
    frame: str = "center_crop",
) -> dict[str, Any]:
    """Run the model on ``image`` (in ``frame``: ``center_crop`` or ``square``, see kosmos/data/transform.py) after
    ``prompt`` and parse the result (no files written)."""
    import torch

    from kosmos.data.sequence import build_prompt, parse_generated_ids
    from kosmos.data.transform import clip_transform

    cfg = model.config
    device = next(model.parameters()).device
    ids, slots = build_prompt(tokenizer, prompt, cfg.latent_query_num)
    pixels = clip_transform(image.convert("RGB"), cfg.vision.image_size, frame)[None].to(device)
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
        "image_frame": frame,
        "text": text,
        "generated": tokenizer.decode(new_ids, skip_special_tokens=True),
        "entities": [
            {
                "phrase": phrase,
                "span": list(span),
                "boxes": [list(b) for b in boxes],
                "boxes_px": [
                    crop_box_to_pixels(b, image.width, image.height, cfg.vision.image_size, frame) for b in boxes
                ],
            }
            for phrase, span, boxes in entities
        ],
    }
