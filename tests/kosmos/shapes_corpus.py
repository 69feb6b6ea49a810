"""A synthetic grounded corpus for the training tests: small images of coloured shapes with their true boxes.

Each scene holds one or two shapes (circle, square, triangle; red, green, blue or yellow; no repeated colour and
shape in one scene) of random size at random places on a grey background. Captions come from a handful of
templates ("a red circle", "a red circle and a blue square on a grey background", ...), none of which says where
anything is, so the text alone cannot tell the box: only the image can.

Through ``grit build`` a phrase followed by a template's suffix becomes a longer referring expression ("a blue square
on a grey background": the suffix is in the noun's subtree); the expression is what the model is trained and
evaluated on, as for any GRIT corpus.

``write_build_input`` writes the scenes as ``grit build`` input for the annotations source (a JSONL table with
image paths and ``annotations`` of caption spans and boxes); ``write_shards`` writes GRIT shards directly in the
record format (docs/format.md), for tests that need shards but not the pipeline.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
# Every template starts with the shapes, so the first phrase of a caption stands where the phrase-grounding prompt
# puts it (right after <grounding>); the order of the shapes is random, so every shape is seen first.
TEMPLATES = ("{}", "{} on a grey background", "{} in a small picture")


def draw_scene(
    rng: random.Random, size: int = 64, max_shapes: int = 2, templates: tuple[str, ...] = TEMPLATES
) -> tuple[Image.Image, str, list]:
    """``(image, caption, [(start, end, (x1, y1, x2, y2)), ...])`` with boxes normalised to the image."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    used: set[tuple[str, str]] = set()
    objects = []
    for _ in range(rng.randint(1, max_shapes)):
        while True:
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if (colour, shape) not in used:
                break
        used.add((colour, shape))
        side = rng.randint(size * 7 // 32, size * 15 // 32)
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        if shape == "circle":
            draw.ellipse((x, y, x + side - 1, y + side - 1), fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle((x, y, x + side - 1, y + side - 1), fill=COLOURS[colour])
        else:
            draw.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=COLOURS[colour])
        objects.append((f"a {colour} {shape}", (x / size, y / size, (x + side) / size, (y + side) / size)))
    body = " and ".join(text for text, _ in objects)
    template = rng.choice(templates)
    caption = template.format(body)
    offset = template.index("{}")
    spans = []
    for text, box in objects:
        start = caption.index(text, offset)
        spans.append((start, start + len(text), box))
        offset = start + len(text)
    return image, caption, spans


def scenes(
    count: int, seed: int, size: int = 64, max_shapes: int = 2, templates: tuple[str, ...] = TEMPLATES
) -> list[tuple[Image.Image, str, list]]:
    rng = random.Random(seed)
    return [draw_scene(rng, size, max_shapes, templates) for _ in range(count)]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_build_input(folder: Path, items: list, name: str = "scenes") -> Path:
    """``folder/<name>.jsonl`` + ``folder/<name>/NNNNNN.png``: grit build input for ``detector.kind: annotations``."""
    images = folder / name
    images.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (image, caption, spans) in enumerate(items):
            (images / f"{i:06d}.png").write_bytes(_png(image))
            annotations = [{"start": a, "end": b, "box": list(box)} for a, b, box in spans]
            row = {"key": f"{name}{i:06d}", "caption": caption, "image": f"{name}/{i:06d}.png"}
            f.write(json.dumps({**row, "annotations": annotations}) + "\n")
    return path


def write_shards(folder: Path, items: list, per_shard: int = 500, prefix: str = "s") -> list[Path]:
    """GRIT shards (``NNNNN.tar`` + ``NNNNN_stats.json``) holding the scenes, boxes as ``ref_exps`` with score 1."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, len(items), per_shard)):
        path = folder / f"{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i, (image, caption, spans) in enumerate(items[start : start + per_shard], start):
                entries = [[a, b, *box, 1.0] for a, b, box in spans]
                record = {
                    "key": f"{prefix}{i:06d}",
                    "caption": caption,
                    "width": image.width,
                    "height": image.height,
                    "noun_chunks": entries,
                    "ref_exps": entries,
                }
                sink.write(
                    {
                        "__key__": record["key"],
                        "png": _png(image),
                        "txt": caption.encode(),
                        "json": json.dumps(record).encode(),
                    }
                )
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"shard": f"{shard:05d}"}))
        paths.append(path)
    return paths
