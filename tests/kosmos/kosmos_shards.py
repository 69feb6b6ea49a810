"""Builders for the kosmos tests: a tokenizer trained on a fixed caption set, drawn images, and real WebDataset
shards in the layout of docs/format.md (and img2dataset's), written with webdataset's TarWriter."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")

# Every word of the test captions, repeated so that the BPE learns each as one token.
CORPUS = [
    "A dog and two cats on a sofa",
    "a red square next to a blue circle",
    "a green circle above a yellow square",
    "An image of a snowman warming himself by a fire",
    "two cats sleeping on a red sofa near the window",
    "a man riding a horse on the beach at sunset",
] * 40

CAPTIONS_WITH_TAGS = [
    "An image of a snowman warming himself by a fire.",
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming "
    "himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.",
    "<grounding>two cats<phrase> a red sofa</phrase><object><patch_index_0001><patch_index_0100>"
    "</delimiter_of_multi_objects/><patch_index_0200><patch_index_1023></object>",
    "  A dog   and two\tcats on a sofa  ",
    "<image></image> a man riding a horse </doc>",
    "Ünïcödé caption, with punctuation!? and digits 123",
]


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def shapes_sample(key: str, rng: random.Random, width: int = 320, height: int = 240) -> dict:
    """An image with two coloured shapes, its caption and GRIT record (two phrases; boxes exact)."""
    image = Image.new("RGB", (width, height), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    caption_parts, entries = [], []
    colours = rng.sample(sorted(COLOURS), 2)
    for i, colour in enumerate(colours):
        shape = rng.choice(SHAPES)
        w, h = rng.randint(width // 6, width // 3), rng.randint(height // 6, height // 3)
        x = rng.randint(0, width - w - 1) if i == 0 else rng.randint(width // 2, width - w - 1)
        y = rng.randint(0, height - h - 1)
        (draw.rectangle if shape == "square" else draw.ellipse)((x, y, x + w, y + h), fill=COLOURS[colour])
        phrase = f"a {colour} {shape}"
        start = len(" next to ".join(caption_parts)) + (len(" next to ") if caption_parts else 0)
        caption_parts.append(phrase)
        box = [x / width, y / height, (x + w) / width, (y + h) / height]
        entries.append([start, start + len(phrase), *box, 0.9])
    caption = " next to ".join(caption_parts)
    record = {
        "key": key,
        "caption": caption,
        "width": width,
        "height": height,
        "noun_chunks": entries,
        "ref_exps": entries,
    }
    return {"__key__": key, "jpg": jpeg_bytes(image), "txt": caption.encode(), "json": json.dumps(record).encode()}


def write_shard(path: Path, samples: list[dict], stats: bool = True) -> Path:
    """A tar with ``samples`` (dicts of member extension -> bytes) and, unless ``stats`` is false, its
    ``_stats.json`` completion marker."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    if stats:
        name = path.name[: -len(".tar")]
        (path.parent / f"{name}_stats.json").write_text(json.dumps({"shard": name, "counts": {"kept": len(samples)}}))
    return path


def write_grit_shards(folder: Path, num_shards: int, per_shard: int, seed: int = 0, prefix: str = "s") -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for s in range(num_shards):
        samples = [shapes_sample(f"{prefix}{s}x{i:03d}", rng) for i in range(per_shard)]
        paths.append(write_shard(folder / f"{s:05d}.tar", samples))
    return paths


def write_text_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    return path
