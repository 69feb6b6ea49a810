"""The build's output as one fsspec filesystem and root: a local folder, a shared mount, ``s3://``, ``gs://``, ...

Everything that touches the output (the driver's manifest and lock, the workers' fragments and shards) goes through
:class:`OutputStore`, which is small and picklable (it is rebuilt from its URL in each Ray worker). Writes are
whole-object: on a local filesystem a file is written under the build's own temporary folder, fsynced and renamed
into place; on an object store one PUT (or a multipart upload that only becomes visible when it completes) is atomic
by itself. So a name under the output either holds complete bytes or does not exist.

Exclusive creation (the lock, :meth:`OutputStore.create_exclusive`): ``O_CREAT | O_EXCL`` locally; a conditional PUT
(``If-None-Match: *``) on S3 and stores whose fsspec driver offers ``mode="create"``. A store without it falls back
to check-then-write followed by a read-back of the owner token, which narrows the race to the time between the two
requests but does not close it (docs/cluster.md says so).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import uuid
from typing import Any

from grit_core.durable import fsync_dir

TMP_ROOT = ".grit-tmp"  # the build's own folder for temporary names; nothing outside it is ever deleted


class ExclusiveCreateUnsupported(RuntimeError):
    pass


def _protocol(fs) -> str:
    protocol = fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


class OutputStore:
    """The output root ``url`` and the few operations a build needs, relative to it (``rel`` uses ``/``)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        from fsspec.core import url_to_fs

        self.storage_options = dict(storage_options or {})
        fs, path = url_to_fs(url, **self.storage_options)
        self.fs = fs
        self.local = _protocol(fs) in ("file", "local")
        if self.local:
            path = os.path.abspath(path)  # workers run in other folders (ray job submit's working dir)
        self.root = path.rstrip("/") or "/"
        self.url = self.root if self.local else fs.unstrip_protocol(self.root)

    def __reduce__(self):
        return (OutputStore, (self.url, self.storage_options))

    def __repr__(self) -> str:
        return f"OutputStore({self.url!r})"

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url_of(self, rel: str) -> str:
        return self.path(rel) if self.local else self.fs.unstrip_protocol(self.path(rel))

    # -- reading ---------------------------------------------------------------------------------------------

    def _fresh(self, path: str) -> str:
        # Other processes (workers, other builds) write here: never answer from this process's listing cache.
        if not self.local:
            self.fs.invalidate_cache(path)
        return path

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._fresh(self.path(rel)))

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and folders); empty when it does not exist."""
        if self.local:
            try:
                return sorted(os.listdir(self.path(rel)))
            except (FileNotFoundError, NotADirectoryError):
                return []
        try:
            entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        base = self.path(rel).rstrip("/")
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base]
        return sorted(set(names))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._fresh(self.path(rel)))

    def read_many(self, rels: list[str]) -> dict[str, bytes | None]:
        """Several small files at once (concurrent requests on object stores); ``None`` for any that failed."""
        if not rels:
            return {}
        paths = [self._fresh(self.path(r)) for r in rels]
        got = self.fs.cat(paths, on_error="return")
        out: dict[str, bytes | None] = {}
        for rel, path in zip(rels, paths):
            value = got.get(path) if isinstance(got, dict) else None
            if value is None:  # some drivers key results by the stripped path
                value = got.get(self.fs._strip_protocol(path)) if isinstance(got, dict) else None
            out[rel] = value if isinstance(value, bytes) else None
        return out

    # -- writing ---------------------------------------------------------------------------------------------

    def make_dir(self, rel: str) -> None:
        """Create the folder ``rel`` (locally; object stores have no folders). The driver makes a run's temporary
        folder with it before any worker writes there: workers never create that folder (see :meth:`write_bytes`)."""
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)

    def _require_dir(self, rel: str) -> str:
        path = self.path(rel)
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, "the build's temporary folder is gone: its build has ended", path)
        return path

    def write_bytes(self, rel: str, data: bytes, tmp_rel: str = TMP_ROOT, durable: bool = True) -> None:
        """``data`` under ``rel``, whole or not at all (temporary name under ``tmp_rel`` + rename, locally).
        ``durable=False`` skips the fsyncs (temporary files that a crash makes useless anyway).

        The driver writes with the default ``tmp_rel``, which is created when missing. Any other ``tmp_rel`` is a
        run's temporary folder made by the driver (:meth:`make_dir`); it must exist, and of the folders a name
        under it needs, only those below it are created. So once the driver has removed a run's folder, a worker
        still writing for that run fails instead of bringing the folder back."""
        if self.local:
            run_folder = tmp_rel != TMP_ROOT
            if run_folder:
                tmp_dir = self._require_dir(tmp_rel)
            else:
                tmp_dir = self.path(tmp_rel)
                os.makedirs(tmp_dir, exist_ok=True)
            tmp = posixpath.join(tmp_dir, f"{posixpath.basename(rel)}.{uuid.uuid4().hex[:8]}.part")
            final = self.path(rel)
            parent = posixpath.dirname(final)
            if run_folder and parent.startswith(tmp_dir + "/"):
                below = tmp_dir
                for part in posixpath.relpath(parent, tmp_dir).split("/"):
                    below = posixpath.join(below, part)
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(below)  # FileNotFoundError when the run's folder went meanwhile
            else:
                os.makedirs(parent, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    if durable:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if durable:
                fsync_dir(posixpath.dirname(final))
        else:
            self.fs.pipe_file(self.path(rel), data)

    def put_file(self, local_path: str, rel: str) -> None:
        """Move (local) or upload (remote) a finished local file to ``rel``; the caller's file is consumed."""
        final = self.path(rel)
        if self.local:
            os.makedirs(posixpath.dirname(final), exist_ok=True)
            os.replace(local_path, final)  # local_path lies under the output's temporary folder: same filesystem
            fsync_dir(posixpath.dirname(final))
        else:
            try:
                self.fs.put_file(local_path, final)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(local_path)

    def local_tmp_dir(self, rel: str) -> str | None:
        """A local folder for temporary files that :meth:`put_file` can move (under the output when local)."""
        if not self.local:
            return None
        return self._require_dir(rel)  # a run's folder, made by the driver: never recreated by a worker

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist; False when it already exists."""
        final = self.path(rel)
        if self.local:
            os.makedirs(posixpath.dirname(final), exist_ok=True)
            try:
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(posixpath.dirname(final))
            return True
        try:
            self.fs.pipe_file(final, data, mode="create")
            return True
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError) as exc:
            raise ExclusiveCreateUnsupported(str(exc)) from exc
        except OSError as exc:
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))

    def delete_tree(self, rel: str) -> None:
        """Remove a folder (prefix) of the build's own; a missing one is fine."""
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"refusing to delete {rel!r}: only the build's own temporary folders are removed")
        if self.local:
            path = self.path(rel)
            if posixpath.basename(posixpath.dirname(path)) == TMP_ROOT and os.path.isdir(path):
                # A run's folder, where a stopping build's workers may still be writing. Renamed first (one atomic
                # step): from then on its name does not exist, and as workers never create it (write_bytes), no
                # new file can land in it. The new name is one a later build removes as stale, should this stop.
                doomed = posixpath.join(posixpath.dirname(path), uuid.uuid4().hex)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, doomed)
                    path = doomed
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(path)
            parent = posixpath.dirname(self.path(rel))
            if posixpath.basename(parent) == TMP_ROOT:
                with contextlib.suppress(OSError):
                    os.rmdir(parent)  # only when empty
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(rel), recursive=True)

    def remove_root_if_empty(self) -> None:
        """Remove the output folder itself when nothing is left in it (a build that did not start)."""
        if self.local:
            with contextlib.suppress(OSError):
                os.rmdir(self.root)
        # Object stores have no empty folders: nothing to remove.
