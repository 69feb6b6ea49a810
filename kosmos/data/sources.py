"""Reading one source: the per-epoch WebDataset (or JSONL) sample stream of one reader, and one raw sample turned
into a tokenised sample with its image tensor.

Source kinds:

- ``grit``: WebDataset shards with an image and a ``<key>.json`` GRIT record: ours (docs/format.md) and GRIT-20M
  downloaded by img2dataset with ``--save_additional_columns '["noun_chunks","ref_exps"]'``; or ``.parquet`` files
  with GRIT's record columns and the image bytes in a column, as Hub mirrors of GRIT hold them
  (:mod:`kosmos.data.parquet`). Boxes are normalised,
  so they are remapped with the size of the image as decoded, never the ``width``/``height`` of the JSON
  (img2dataset's hold the original size, which differs from the resized image it stores).
- ``caption``: WebDataset shards with an image and a ``<key>.txt`` caption (img2dataset's layout), or parquet files
  with an image column and a ``caption`` column: plain captions.
- ``text``: JSONL files, one ``{"text": ...}`` per line: text-only samples, no image.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

import webdataset as wds
from PIL import Image

from grit_core.record import GritRecord
from kosmos.data.parquet import is_parquet, parquet_samples
from kosmos.data.sequence import (
    ReservedTokenInText,
    SequenceConfig,
    TokenizedSample,
    build_grounded_sample,
    build_image_text_sample,
    build_text_sample,
)
from kosmos.data.shards import IMAGE_EXTENSIONS, assign_shards
from kosmos.data.tokenizer import KosmosTokenizer
from kosmos.data.transform import normalize_to_array, resize_and_crop

log = logging.getLogger(__name__)

SourceKind = Literal["grit", "caption", "text"]


@dataclass
class SourceConfig:
    """One data source. ``shards``: patterns (braces, globs, ``::``); ``weight``: its share of the mix."""

    name: str = ""  # defaults to "<kind><index>"; names key the resume state, so keep them stable
    kind: SourceKind = "grit"
    shards: list[str] = field(default_factory=list)
    weight: float = 1.0
    text_field: str = "text"  # JSONL field of a "text" source
    # Leave out local tars without their _stats.json (still being written). Shards from tools that write no
    # stats file need false.
    complete_shards_only: bool = True


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` becomes the ``dropped_<reason>`` counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from any printable parts; the same on every machine and Python (no ``hash()``)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def uniform(*parts: Any) -> float:
    """A number in [0, 1) determined by ``parts``: counter-based randomness that needs no state to resume."""
    return derive_seed(*parts) / 2.0**64


class LogAndContinue:
    """WebDataset exception handler: log the error (the first few of each type, then every 1000th), count it
    as ``read_errors``, and go on with the next sample or shard."""

    def __init__(self, counts: Counter) -> None:
        self.counts = counts
        self.seen: Counter = Counter()

    def __call__(self, exn: Exception) -> bool:
        self.counts["read_errors"] += 1
        name = type(exn).__name__
        self.seen[name] += 1
        if self.seen[name] <= 5 or self.seen[name] % 1000 == 0:
            log.warning("skipping unreadable data (%s #%d): %s", name, self.seen[name], exn)
        return True


# ---------------------------------------------------------------------------------------------------------------
# Raw sample streams
# ---------------------------------------------------------------------------------------------------------------


def take_every(stride: int, offset: int) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Pipeline stage: samples ``offset, offset + stride, ...`` (splitting a source with fewer shards than readers)."""

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        return islice(src, offset, None, stride) if stride > 1 else src

    return stage


def jsonl_lines(handler: LogAndContinue) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Pipeline stage: shard dicts ``{"url": ...}`` of JSONL files to one raw sample per non-empty line."""

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        for shard in src:
            url = shard["url"]
            stem = url.rsplit("/", 1)[-1].split(".", 1)[0]
            try:
                with wds.gopen(url, "rb") as f:
                    for line_no, line in enumerate(f, 1):
                        if line.strip():
                            yield {"__key__": f"{stem}-{line_no:09d}", "__url__": url, "line": line}
            except Exception as exn:  # noqa: BLE001 - a bad file is logged and skipped, the run goes on
                handler(exn)

    return stage


def shard_samples(handler: LogAndContinue) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Pipeline stage: shard dicts to raw samples, each shard read as what its name says (tar or parquet)."""
    tar, parquet = wds.tarfile_to_samples(handler=handler), parquet_samples(handler)

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        for shard in src:
            yield from (parquet if is_parquet(shard["url"]) else tar)(iter([shard]))

    return stage


def epoch_stream(
    source: SourceConfig,
    urls: Sequence[str],
    epoch: int,
    slot: int,
    num_slots: int,
    seed: int,
    shuffle_shards: bool,
    shuffle_buffer: int,
    shuffle_initial: int,
    handler: LogAndContinue,
) -> Iterator[dict]:
    """The raw samples reader ``slot`` gets from ``source`` in ``epoch``: a fixed function of its arguments.

    Stages: shard order (seeded by epoch), this reader's shards (``split_by_node`` and ``split_by_worker`` in one
    step: ``slot = rank * workers + worker``), read, per-reader sample split when shards are fewer than readers,
    shuffle buffer (seeded by epoch and slot). Nothing is decoded here, so replaying a stream to resume is cheap.
    """
    order = list(urls)
    if shuffle_shards:
        random.Random(derive_seed(seed, "shards", source.name, epoch)).shuffle(order)
    mine, stride, offset = assign_shards(order, slot, num_slots)
    read = jsonl_lines(handler) if source.kind == "text" else shard_samples(handler)
    stages: list[Any] = [wds.SimpleShardList(mine), read, take_every(stride, offset)]
    if shuffle_buffer > 1:
        rng = random.Random(derive_seed(seed, "shuffle", source.name, epoch, slot))
        stages.append(wds.shuffle(shuffle_buffer, min(shuffle_initial, shuffle_buffer), rng=rng))
    return iter(wds.DataPipeline(*stages))


class SourceStream:
    """A source's endless raw stream for one reader: epoch after epoch, with its position ``(epoch, offset)``
    (samples taken in that epoch). Built at a position, it replays the epoch's stream up to it."""

    def __init__(self, source: SourceConfig, make_epoch: Callable[[int], Iterator[dict]], epoch=0, offset=0) -> None:
        self.source = source
        self.make_epoch = make_epoch
        self.epoch = epoch
        self.offset = offset
        self._iter = islice(make_epoch(epoch), offset, None)

    def __next__(self) -> dict:
        for _ in range(2):
            try:
                sample = next(self._iter)
            except StopIteration:
                if self.offset == 0:
                    break
                self.epoch, self.offset = self.epoch + 1, 0
                self._iter = self.make_epoch(self.epoch)
                continue
            self.offset += 1
            sample["__epoch__"] = self.epoch
            return sample
        raise RuntimeError(
            f"source {self.source.name!r} gives this reader no samples in epoch {self.epoch}: its shards are "
            "empty or unreadable (see the warnings above)"
        )

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


# ---------------------------------------------------------------------------------------------------------------
# Decoding: raw sample -> tokens (+ image tensor)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LoaderSample:
    tokens: TokenizedSample
    pixel_values: Any  # (3, 224, 224) float32 numpy array, or None for text-only samples
    key: str
    source: str
    state: dict | None = None  # the reader's stream position right after this sample


def _image_bytes(raw: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if raw.get(ext):
            return raw[ext]
    raise SampleError("missing_image", f"{raw.get('__key__')}: no {'/'.join(IMAGE_EXTENSIONS)} member")


def _open_image(data: bytes, key: str, draft_size: int = 0) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        if draft_size and image.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale (DCT scaling), never below draft_size on either side.
            image.draft("RGB", (draft_size, draft_size))
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        raise SampleError("bad_image", f"{key}: {type(exc).__name__}: {exc}") from exc


def _text_member(raw: dict, key: str) -> str | None:
    data = raw.get("txt")
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError("bad_caption", f"{key}: caption is not UTF-8") from exc


def _entries(value: Any, key: str) -> list:
    if value is None:
        return []
    if isinstance(value, str):  # some exports keep the lists as JSON strings
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise SampleError("bad_record", f"{key}: noun_chunks/ref_exps is not a list") from exc
    if not isinstance(value, list):
        raise SampleError("bad_record", f"{key}: noun_chunks/ref_exps is not a list")
    return value


def _grit_tokens(raw: dict, key: str, image: Image.Image, tokenizer, cfg, rng, counts) -> TokenizedSample:
    if raw.get("json") is None:
        caption = _text_member(raw, key)
        if not caption:
            raise SampleError("missing_caption", f"{key}: no .json record and no .txt caption")
        counts["plain_no_record"] += 1
        return build_image_text_sample(tokenizer, caption, None, cfg, counts)
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SampleError("bad_record", f"{key}: record is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise SampleError("bad_record", f"{key}: record is not a JSON object")
    caption = meta.get("caption") if isinstance(meta.get("caption"), str) else _text_member(raw, key)
    if not caption:
        raise SampleError("missing_caption", f"{key}: empty caption")
    record = GritRecord(
        key=key,
        caption=caption,
        width=image.width,
        height=image.height,
        noun_chunks=_entries(meta.get("noun_chunks"), key),
        ref_exps=_entries(meta.get("ref_exps"), key),
    )
    return build_grounded_sample(record, tokenizer, cfg, rng, image.width, image.height, counts)


def decode_sample(
    raw: dict,
    source: SourceConfig,
    tokenizer: KosmosTokenizer,
    cfg: SequenceConfig,
    max_length: int,
    seed: int,
    counts: Counter,
    fast_jpeg: bool = False,
) -> LoaderSample:
    """Decode, transform and tokenise one raw sample. Raises :class:`SampleError` (or
    :class:`~kosmos.data.sequence.ReservedTokenInText`) for a sample to drop; the caller counts and logs it.

    ``fast_jpeg`` decodes large JPEGs at a reduced scale still at least the crop size (PIL's ``draft``): several
    times faster on photos, with pixels slightly different from a full decode followed by the bicubic resize.
    Boxes follow the decoded size, so they stay aligned either way."""
    key = raw.get("__key__", "?")
    if source.kind == "text":
        try:
            row = json.loads(raw["line"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SampleError("bad_record", f"{key}: line is not JSON ({exc})") from exc
        text = (row.get(source.text_field) or row.get("caption")) if isinstance(row, dict) else row
        if not isinstance(text, str) or not text.strip():
            raise SampleError("missing_caption", f"{key}: no {source.text_field!r} text")
        tokens = build_text_sample(tokenizer, text, max_length)
        counts["truncated"] += int(tokens.truncated)
        return LoaderSample(tokens, None, key, source.name)
    image = _open_image(_image_bytes(raw), key, cfg.image_size if fast_jpeg else 0)
    if source.kind == "grit":
        rng = random.Random(derive_seed(seed, "sample", source.name, raw.get("__epoch__", 0), key))
        tokens = _grit_tokens(raw, key, image, tokenizer, cfg, rng, counts)
    else:
        caption = _text_member(raw, key)
        if caption is None and raw.get("json") is not None:
            try:
                caption = json.loads(raw["json"]).get("caption")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                caption = None
        if not caption or not caption.strip():
            raise SampleError("missing_caption", f"{key}: no caption")
        tokens = build_image_text_sample(tokenizer, caption, None, cfg, counts)
    if len(tokens) > max_length:
        raise SampleError("too_long", f"{key}: {len(tokens)} tokens > max_length {max_length}")
    pixels = normalize_to_array(resize_and_crop(image, cfg.image_size, cfg.image_frame))
    return LoaderSample(tokens, pixels, key, source.name)


def decode_or_count(
    raw: dict,
    source: SourceConfig,
    tokenizer: KosmosTokenizer,
    cfg: SequenceConfig,
    max_length: int,
    seed: int,
    counts: Counter,
    logged: Counter,
    fast_jpeg: bool = False,
) -> LoaderSample | None:
    """:func:`decode_sample`, with a dropped sample counted (``dropped_<reason>``), logged and returned as None."""
    try:
        sample = decode_sample(raw, source, tokenizer, cfg, max_length, seed, counts, fast_jpeg)
    except SampleError as exc:
        reason, message = exc.reason, str(exc)
    except ReservedTokenInText as exc:
        reason, message = "reserved_token_in_text", f"{raw.get('__key__')}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one bad sample must not end the run; it is counted and logged
        reason, message = "error", f"{raw.get('__key__')}: {type(exc).__name__}: {exc}"
    else:
        counts["kept"] += 1
        counts[f"kept/{source.name}"] += 1
        return sample
    counts[f"dropped_{reason}"] += 1
    logged[reason] += 1
    if logged[reason] <= 5 or logged[reason] % 1000 == 0:
        log.warning("dropped sample from %s (%s #%d): %s", source.name, reason, logged[reason], message)
    return None
