"""A folder of images with same-named captions: ``<stem>.jpg`` + ``<stem>.txt`` (+ optional ``<stem>.json``).

Samples come in sorted path order (recursive). On a local filesystem only regular files inside the folder are read:
a symbolic link is followed only when its target stays inside the folder, and FIFOs, devices and sockets are
skipped without being opened (``references.read_local`` opens non-blocking and checks the open descriptor too, so
a file swapped for a FIFO later still never blocks). Any failure while reading one sample is that sample's drop.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import stat
from collections.abc import Iterator

import fsspec

from grit_pipeline.config import InputConfig
from grit_pipeline.readers.references import NotRegularFile, Target, is_local, read_local, read_reference
from grit_pipeline.readers.sample import (
    IMAGE_EXTS,
    InputSample,
    Skip,
    apply_metadata,
    decode_text,
    failed_sample,
    make_key,
    split_member_name,
)

logger = logging.getLogger(__name__)


def _local_files(root: str) -> tuple[list[str], int]:
    """Regular files under ``root`` (symlinks only when they resolve inside it), and how many entries were skipped."""
    real_root = os.path.realpath(root)
    files: list[str] = []
    skipped = 0
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            skipped += 1
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                    continue
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if not target.startswith(real_root + os.sep) or not stat.S_ISREG(os.stat(target).st_mode):
                        skipped += 1
                        continue
                elif not entry.is_file(follow_symlinks=False):  # FIFO, device, socket
                    skipped += 1
                    continue
                files.append(entry.path)
            except OSError:  # ELOOP, ENAMETOOLONG, vanished: not a sample we can name safely
                skipped += 1
    return sorted(files), skipped


def _read_text(fs, path: str, cfg: InputConfig, local: bool) -> bytes | None:
    if local:
        return read_local(path, cfg.max_text_bytes)
    with fs.open(path, "rb") as f:
        data = f.read(cfg.max_text_bytes + 1)
    return None if len(data) > cfg.max_text_bytes else data


def iter_image_folder(path: str, cfg: InputConfig, max_bytes: int, skip: int | Skip = 0) -> Iterator[InputSample]:
    """Every image under ``path`` (sorted, recursive) with ``<stem>.txt`` as caption and optional ``<stem>.json``."""
    skip = Skip.of(skip)
    fs, root = fsspec.core.url_to_fs(path)
    local = is_local(fs)
    if local:
        files, skipped = _local_files(root)
        if skipped:
            logger.warning("%s: %d entries skipped (not regular files inside the folder)", path, skipped)
    else:
        files = sorted(p for p in fs.find(root) if not fs.isdir(p))
    present = set(files)
    images = [p for p in files if split_member_name(p)[1] in IMAGE_EXTS]
    for i, image_path in enumerate(images):
        stem = split_member_name(image_path)[0]
        try:
            key = make_key(posixpath.relpath(stem, root))
        except Exception as exc:  # noqa: BLE001
            yield failed_sample(f"image_{i:09d}", path, exc, "key")
            continue
        source = image_path if local else fs.unstrip_protocol(image_path)
        sample = InputSample(key=key, source=source)
        if i in skip:
            sample.drop_reason = "skipped"
            yield sample
            continue
        try:
            if stem + ".txt" in present:
                data = _read_text(fs, stem + ".txt", cfg, local)
                if data is None:
                    sample.drop_reason = "caption_too_long"
                    sample.detail = f"caption file over input.max_text_bytes={cfg.max_text_bytes}"
                    yield sample
                    continue
                sample.caption = decode_text(data, "caption file")
            if stem + ".json" in present:
                data = _read_text(fs, stem + ".json", cfg, local)
                if data is None:
                    sample.drop_reason = "cell_too_large"
                    sample.detail = f"metadata file over input.max_text_bytes={cfg.max_text_bytes}"
                    yield sample
                    continue
                meta = json.loads(decode_text(data, "metadata file"))
                if not isinstance(meta, dict):
                    raise ValueError("metadata file is not a JSON object")
                apply_metadata(sample, meta)
            read_reference(Target("local" if local else "fsspec", image_path, fs), max_bytes, cfg.references, sample)
        except NotRegularFile as exc:
            sample = failed_sample(key, source, exc)
        except Exception as exc:  # noqa: BLE001 - one sample's failure is its drop
            sample = failed_sample(key, source, exc)
        yield sample
