"""Generated inputs for the pipeline tests: good and malformed images, captions, tars (hostile ones too), tables.

Everything is built in memory from seeds, so the tests need no files of their own and two calls give the same bytes.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Captions whose noun chunks the small English pipeline finds reliably.
CAPTIONS = (
    "a brown dog running on the beach",
    "two children playing with a red ball in the park",
    "a man in a blue shirt riding a horse",
    "a white cat sleeping on a wooden chair",
    "a small boat on the lake near the mountains",
    "a woman holding an umbrella on a city street",
    "a plate of food on a kitchen table",
    "a train at the station under a cloudy sky",
    "an old car parked next to a brick building",
    "a bird sitting on the branch of a tree",
    "three people walking along a snowy road",
    "a green bicycle leaning against a wall",
)


def picture(seed: int, width: int = 96, height: int = 64, mode: str = "RGB") -> Image.Image:
    """A smooth synthetic picture (small when compressed), different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = rng.uniform(0, 255, size=3)
    freq = rng.uniform(0.02, 0.2, size=3)
    channels = [np.clip(base[c] + 80 * np.sin(freq[c] * (x + 2 * y) + c), 0, 255) for c in range(3)]
    arr = np.stack(channels, axis=-1).astype(np.uint8)
    im = Image.fromarray(arr, mode="RGB")
    return im.convert(mode) if mode != "RGB" else im


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def jpeg(seed: int, width: int = 96, height: int = 64) -> bytes:
    return encode(picture(seed, width, height), "JPEG", quality=85)


def png(seed: int, width: int = 96, height: int = 64) -> bytes:
    return encode(picture(seed, width, height), "PNG")


def exif_rotated_jpeg(seed: int, width: int = 96, height: int = 64, orientation: int = 6) -> bytes:
    """A JPEG stored ``width`` x ``height`` whose EXIF says to rotate it (6: 90 degrees clockwise)."""
    im = picture(seed, width, height)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", quality=90, exif=exif.tobytes())


def cmyk_jpeg(seed: int) -> bytes:
    return encode(picture(seed, mode="CMYK"), "JPEG", quality=90)


def png16(seed: int, width: int = 80, height: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (np.linspace(0, 65535, width * height).reshape(height, width)).astype(np.uint16)
    arr ^= rng.integers(0, 256, size=arr.shape, dtype=np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def palette_png(seed: int, transparent: bool = True) -> bytes:
    im = picture(seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(im, "PNG", transparency=0) if transparent else encode(im, "PNG")


def animated_gif(seed: int) -> bytes:
    frames = [picture(seed + i).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def huge_declared_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` pixels, followed by almost no data (a bomb's shape)."""
    data = png(0, 8, 8)
    ihdr = bytearray(data[8 : 8 + 25])
    ihdr[8:16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF
    ihdr[21:25] = struct.pack(">I", crc)
    return data[:8] + bytes(ihdr) + data[33:]


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


# ---------------------------------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------------------------------


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[dict]) -> Path:
    """img2dataset-style tar: per sample ``<key>.<ext>`` image, ``<key>.txt`` caption, ``<key>.json`` metadata.

    A sample dict has ``key`` and any of ``image`` (bytes), ``ext`` (default jpg), ``caption``, ``meta`` (dict).
    """
    with tarfile.open(path, "w") as tf:
        for s in samples:
            if s.get("image") is not None:
                add_member(tf, f"{s['key']}.{s.get('ext', 'jpg')}", s["image"])
            if s.get("caption") is not None:
                add_member(tf, f"{s['key']}.txt", s["caption"].encode("utf-8"))
            if s.get("meta") is not None:
                add_member(tf, f"{s['key']}.json", json.dumps(s["meta"]).encode("utf-8"))
    return path


def good_samples(n: int, seed: int = 0, prefix: str = "") -> list[dict]:
    """``n`` samples with a picture, a caption with noun chunks and img2dataset-like metadata."""
    out = []
    for i in range(n):
        key = f"{prefix}{seed * 1000 + i:09d}"
        meta = {"key": key, "url": f"https://example.com/{key}.jpg", "id": seed * 1000 + i}
        meta["clip_similarity_vitb32"] = 0.25 + 0.01 * (i % 7)
        out.append({"key": key, "image": jpeg(seed * 1000 + i), "caption": CAPTIONS[i % len(CAPTIONS)], "meta": meta})
    return out


def write_hostile_tar(path: Path, good: list[dict]) -> dict[str, int]:
    """A tar mixing good samples with members that must never be followed or written.

    Returns the number of members of each refused kind, which the pipeline must count as ``unsafe_member``.
    """
    with tarfile.open(path, "w") as tf:
        for s in good[:2]:
            add_member(tf, f"{s['key']}.jpg", s["image"])
            add_member(tf, f"{s['key']}.txt", s["caption"].encode())
        add_member(tf, "../escape.txt", b"a dog outside the output folder")
        add_member(tf, "/tmp/absolute-escape.jpg", jpeg(99))
        add_member(tf, "dir/../../up.txt", b"a cat")
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        hard = tarfile.TarInfo("hard.txt")
        hard.type, hard.linkname = tarfile.LNKTYPE, f"{good[0]['key']}.txt"
        tf.addfile(hard)
        dev = tarfile.TarInfo("dev.jpg")
        dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
        tf.addfile(dev)
        fifo = tarfile.TarInfo("pipe.txt")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)
        for s in good[2:]:
            add_member(tf, f"{s['key']}.jpg", s["image"])
            add_member(tf, f"{s['key']}.txt", s["caption"].encode())
    return {"unsafe_member": 7}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
