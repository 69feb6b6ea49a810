"""Durable writes: a file appears under its final name only once its bytes are on disk.

Shared by the shard writer and the trainer's checkpoints, so both survive a crash or a full disk the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames into it) to disk; a no-op where folders cannot be opened or synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, tmp_dir: Path) -> Iterator[BinaryIO]:
    """A file written under a temporary name in ``tmp_dir`` (same filesystem), fsynced, then renamed to ``path``.

    If the block raises (a failed write included), ``path`` is untouched and the temporary file is removed.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / (path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path) -> None:
    with atomic_file(path, tmp_dir) as f:
        f.write(data)
