"""Loader throughput: samples/s per worker (read, decode, CLIP transform, tokenise, batch) on generated shards.

Writes generated GRIT shards (640 x 480 JPEG photos-like images with drawn objects, captions with two grounded
phrases), trains a small BPE on their captions, then measures
- each stage alone, in this process, in microseconds per sample;
- the whole loader in the training process (``num_workers=0``: one reader, i.e. one worker's rate);
- the loader with ``num_workers = cores`` (what the machine gives in all).

The loader runs on the CPU whatever the training device, so the ``cuda`` variant measures the same thing on the GPU
machine's CPU. The trainer's consumption rate (tiny size measured, 1.6B derived from the H200 step benchmark) goes
beside these numbers in ``trainer_consumption`` (benchmarks/trainer_consumption.py).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import tempfile
import time
from pathlib import Path

NUM_SHARDS = 2
PER_SHARD = 150
IMAGE_SIZE = (640, 480)
BATCH_SIZE = 16


def _photo(rng: random.Random, width: int, height: int):
    """A JPEG-friendly image with texture (so files have the size of real photos) and two filled shapes."""
    import numpy as np
    from PIL import Image, ImageDraw

    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * rng.random() + yy * rng.random()) % 256 for _ in range(3)], axis=-1)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 18, (height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8"))
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(2):
        w, h = rng.randint(width // 8, width // 2), rng.randint(height // 8, height // 2)
        x, y = rng.randint(0, width - w - 1), rng.randint(0, height - h - 1)
        draw.rectangle((x, y, x + w, y + h), fill=tuple(rng.randrange(256) for _ in range(3)))
        boxes.append([x / width, y / height, (x + w) / width, (y + h) / height])
    return image, boxes


def write_shards(folder: Path, seed: int = 0) -> tuple[list[str], list[str]]:
    import webdataset as wds

    rng = random.Random(seed)
    things = ["a red car", "a small dog", "two people", "a wooden table", "the old bridge", "a green umbrella"]
    places = ["on a street", "near the river", "in a park", "at the beach", "under a cloudy sky"]
    captions, paths = [], []
    for s in range(NUM_SHARDS):
        path = folder / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(PER_SHARD):
                image, boxes = _photo(rng, *IMAGE_SIZE)
                first, second = rng.sample(things, 2)
                caption = f"{first} and {second} {rng.choice(places)}"
                spans = [(0, len(first)), (len(first) + 5, len(first) + 5 + len(second))]
                entries = [[a, b, *box, 0.8] for (a, b), box in zip(spans, boxes)]
                record = {"key": f"b{s}x{i:04d}", "caption": caption, "width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1]}
                record.update(noun_chunks=entries, ref_exps=entries)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                sink.write(
                    {
                        "__key__": record["key"],
                        "jpg": buf.getvalue(),
                        "txt": caption.encode(),
                        "json": json.dumps(record).encode(),
                    }
                )
                captions.append(caption)
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"shard": f"{s:05d}"}))
        paths.append(str(path))
    return paths, captions


def _stage_timings(paths: list[str], tokenizer, cfg) -> dict:
    """Microseconds per sample of each stage, run alone in this process."""
    from collections import Counter

    import webdataset as wds
    from PIL import Image

    from grit_core.record import GritRecord
    from kosmos.data.sequence import build_grounded_sample
    from kosmos.data.transform import normalize_to_array, resize_and_crop

    t0 = time.perf_counter()
    raws = list(wds.DataPipeline(wds.SimpleShardList(paths), wds.tarfile_to_samples()))
    read = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = [Image.open(io.BytesIO(r["jpg"])).convert("RGB") for r in raws]
    decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    crops = [resize_and_crop(im) for im in images]
    resize = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in raws:
        image = Image.open(io.BytesIO(r["jpg"]))
        image.draft("RGB", (224, 224))
        resize_and_crop(image.convert("RGB"))
    draft = time.perf_counter() - t0
    t0 = time.perf_counter()
    for crop in crops:
        normalize_to_array(crop)
    normalise = time.perf_counter() - t0
    records = [GritRecord.from_dict(json.loads(r["json"])) for r in raws]
    counts: Counter = Counter()
    t0 = time.perf_counter()
    for i, record in enumerate(records):
        build_grounded_sample(record, tokenizer, cfg.sequence, random.Random(i), *IMAGE_SIZE, counts=counts)
    tokenise = time.perf_counter() - t0
    n = len(raws)
    per = {
        "read_tar": read,
        "decode_jpeg": decode,
        "resize_crop": resize,
        "normalise": normalise,
        "tokenise": tokenise,
    }
    out = {name: round(seconds / n * 1e6, 1) for name, seconds in per.items()}
    out["total"] = round(sum(per.values()) / n * 1e6, 1)
    out["decode_and_resize_crop_with_fast_jpeg_decode"] = round(draft / n * 1e6, 1)
    out["samples"] = n
    out["jpeg_kib_mean"] = round(sum(len(r["jpg"]) for r in raws) / n / 1024, 1)
    return out


def _loader_rate(cfg, tokenizer, batches: int) -> dict:
    from kosmos.data.loader import make_loader

    loader = make_loader(cfg, tokenizer)
    iterator = iter(loader)
    t_start = time.perf_counter()
    next(iterator)  # start-up (worker processes, first shuffle buffer) timed apart
    startup = time.perf_counter() - t_start
    t0 = time.perf_counter()
    samples = tokens = 0
    for batch in itertools.islice(iterator, batches):
        samples += len(batch["keys"])
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - t0
    return {
        "num_workers": cfg.num_workers,
        "batch_size": cfg.batch_size,
        "batches": batches,
        "samples": samples,
        "seconds": round(seconds, 3),
        "startup_s": round(startup, 3),
        "samples_per_s": round(samples / seconds, 1),
        "samples_per_s_per_worker": round(samples / seconds / max(1, cfg.num_workers), 1),
        "tokens_per_sample": round(tokens / samples, 1),
        "counts": dict(loader.counts),
    }


def run(device: str) -> dict:
    try:
        import webdataset  # noqa: F401
    except ImportError:
        return {"skipped": "webdataset is not installed on this machine; the loader runs on the CPU side anyway"}
    from benchmarks.trainer_consumption import derive_1p6b, measure_tiny
    from kosmos.data.loader import DataConfig, SourceConfig
    from kosmos.data.tokenizer import KosmosTokenizer

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        paths, captions = write_shards(Path(tmp))
        t0 = time.perf_counter()
        tokenizer = KosmosTokenizer.train(captions * 4, vocab_size=1000)
        train_s = time.perf_counter() - t0

        def config(workers: int, fast: bool = False) -> DataConfig:
            source = SourceConfig(name="grit", kind="grit", shards=[str(Path(tmp) / "*.tar")])
            return DataConfig(
                sources=[source],
                batch_size=BATCH_SIZE,
                num_workers=workers,
                shuffle_buffer=256,
                fast_jpeg_decode=fast,
            )

        stages = _stage_timings(paths, tokenizer, config(0))
        single = _loader_rate(config(0), tokenizer, batches=24)
        single_fast = _loader_rate(config(0, fast=True), tokenizer, batches=24)
        parallel = _loader_rate(config(cores), tokenizer, batches=48)
    return {
        "device_note": "the loader runs on the CPU; on a GPU machine this measures its CPU"
        if device.startswith("cuda")
        else "",
        "data": {
            "shards": NUM_SHARDS,
            "samples_per_shard": PER_SHARD,
            "image_size": list(IMAGE_SIZE),
            "phrases_per_caption": 2,
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "tokenizer_train_s": round(train_s, 2),
        },
        "loader": {
            "stages_us_per_sample": stages,
            "one_reader": single,
            "one_reader_fast_jpeg_decode": single_fast,
            "all_cores": parallel,
            "samples_per_s_per_worker": single["samples_per_s"],
        },
        # Samples/s the training step consumes at the tiny (measured) and 1.6B (derived) sizes, beside the loader's
        # per-worker rate (workers needed = consumption / per-worker rate); benchmarks/trainer_consumption.py.
        "trainer_consumption": {
            "tiny": measure_tiny(),
            "kosmos2_1.6b": derive_1p6b(single["samples_per_s"], single["tokens_per_sample"]),
        },
    }
