"""Shard lists: pattern expansion, completeness, the split among readers, and caption text for tokenizer training.

A pattern may hold several alternatives separated by ``::`` (WebDataset's convention), braces
(``shards/{00000..00099}.tar``) and, for local paths, glob characters (``corpus/*/*.tar``). Remote URLs
(``s3://``, ``https://``, ``pipe:``) pass through unchanged for WebDataset to open.

A local tar whose ``<name>_stats.json`` is missing is still being written (our shards and img2dataset's both write
that file last), so :func:`complete_shards` leaves it out and says so.
"""

from __future__ import annotations

import glob
import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import braceexpand

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shard_patterns(patterns: str | Sequence[str]) -> list[str]:
    """Every shard a list of patterns names, in order, without duplicates. A local pattern that matches nothing
    raises ``FileNotFoundError`` naming it (a typo must not silently train on less data)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        for alternative in str(pattern).split("::"):
            for url in braceexpand.braceexpand(alternative.strip()):
                if not url:
                    continue
                if is_remote(url):
                    matches = [url]
                elif _GLOB_CHARS & set(url):
                    matches = sorted(glob.glob(url))
                else:
                    matches = [url] if Path(url).exists() else []
                if not matches:
                    raise FileNotFoundError(f"shard pattern {pattern!r}: {url!r} matches no file")
                for match in matches:
                    if match not in seen:
                        seen.add(match)
                        out.append(match)
    return out


def stats_path(tar_path: str) -> Path:
    path = Path(tar_path)
    return path.with_name(path.name[: -len(".tar")] + "_stats.json") if path.name.endswith(".tar") else path


def complete_shards(urls: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(complete, incomplete)``: local tars with their ``_stats.json``, and those without. Remote URLs and
    non-tar files count as complete (nothing cheap can tell)."""
    complete, incomplete = [], []
    for url in urls:
        if not is_remote(url) and url.endswith(".tar") and not stats_path(url).exists():
            incomplete.append(url)
        else:
            complete.append(url)
    return complete, incomplete


def assign_shards(urls: Sequence[str], slot: int, num_slots: int) -> tuple[list[str], int, int]:
    """What reader ``slot`` of ``num_slots`` (rank * workers + worker) reads: ``(urls, stride, offset)``.

    With at least as many shards as readers, shards are dealt round-robin and every sample of a reader's shards is
    its own (stride 1); with fewer, every reader opens every shard and keeps samples ``offset, offset + stride,
    ...`` so that no reader sits idle and no sample is read twice.
    """
    if not 0 <= slot < num_slots:
        raise ValueError(f"reader slot {slot} outside [0, {num_slots})")
    if len(urls) >= num_slots:
        return list(urls[slot::num_slots]), 1, 0
    return list(urls), num_slots, slot


def iter_shard_texts(urls: Sequence[str], text_field: str = "text") -> Iterator[str]:
    """Caption text of every sample in local tar shards (``<key>.txt``, else the ``caption`` of ``<key>.json``) and
    the ``text_field`` (else ``caption``) of every line of JSONL files. Unreadable members are logged and skipped."""
    for url in urls:
        if is_remote(url):
            raise ValueError(f"{url}: tokenizer training reads local shards only")
        if url.endswith(".jsonl"):
            yield from _jsonl_texts(url, text_field)
        else:
            yield from _tar_texts(url)


def _jsonl_texts(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = (row.get(text_field) or row.get("caption")) if isinstance(row, dict) else row
            except json.JSONDecodeError as exc:
                log.warning("%s:%d: bad JSON line skipped (%s)", path, line_no, exc)
                continue
            if isinstance(text, str) and text.strip():
                yield text


def _tar_texts(path: str) -> Iterator[str]:
    # Random-access reading: image members are skipped by seeking, never read.
    captions: dict[str, str] = {}
    fallbacks: dict[str, str] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isreg() or "." not in member.name:
                    continue
                key, ext = member.name.split(".", 1)
                if ext not in ("txt", "json"):
                    continue
                data = tar.extractfile(member).read()
                if key not in captions and key not in fallbacks:
                    order.append(key)
                try:
                    if ext == "txt":
                        captions[key] = data.decode("utf-8")
                    else:
                        meta = json.loads(data)
                        if isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                            fallbacks[key] = meta["caption"]
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    log.warning("%s: member %s skipped (%s)", path, member.name, exc)
    except (tarfile.TarError, OSError) as exc:
        log.warning("%s: unreadable tar, %d samples read before the error (%s)", path, len(order), exc)
    for key in order:
        text = captions.get(key) or fallbacks.get(key)
        if text and text.strip():
            yield text
