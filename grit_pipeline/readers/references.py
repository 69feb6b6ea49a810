"""The reference policy: which image paths and URLs named by a table may be read, and how they are read.

A table (parquet, JSONL) is written by whoever supplied the data, so its image column is untrusted: a path like
``/etc/hostname``, ``../secret.jpg``, ``file:///...``, ``zip://x::file:///...`` or ``http://127.0.0.1:8080/`` would
otherwise copy local files or internal URLs into the corpus. By default (``input.references``) a reference is read
only when it is a relative path that stays under the table's own folder, symlinks resolved; everything else is
refused as ``reference_not_allowed`` *before* anything is opened, so the answer never depends on whether the path
exists. A user widens this with ``allow_roots`` (local folders or URL prefixes) or ``allow_schemes``; every remote
read then has a connect timeout, a read timeout and the byte bound ``image.max_bytes``, and HTTP redirects are
followed only to places the policy allows.

Local files are opened non-blocking and checked with ``fstat`` on the open descriptor: a FIFO or device never blocks
a read task and is never read.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import fsspec

from grit_pipeline.config import ReferencesConfig
from grit_pipeline.readers.sample import InputSample, describe_exception

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
LOCAL_PROTOCOLS = ("file", "local")


class ReferenceRefused(Exception):
    """A reference outside the policy; the message says which rule refused it (never whether it exists)."""


@dataclass
class Target:
    """Where an allowed reference points: a local path (``fs`` None), an http(s) URL, or an fsspec path."""

    kind: str  # "local", "http" or "fsspec"
    path: str
    fs: object | None = None


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in LOCAL_PROTOCOLS


def _has_dotdot(path: str) -> bool:
    return ".." in re.split(r"[\\/]+", path)


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def _url_under(url: str, prefix: str) -> bool:
    if not prefix.endswith("/"):
        prefix += "/"
    return url.startswith(prefix) or url == prefix.rstrip("/")


def _realpath(path: str) -> str:
    return os.path.realpath(path)


def resolve(ref: str, table_fs, table_dir: str, policy: ReferencesConfig) -> Target:
    """Where ``ref`` (an image cell of a table in ``table_dir`` on ``table_fs``) may be read, or raise refused."""
    if "\x00" in ref:
        raise ReferenceRefused("NUL in reference")
    if "::" in ref:
        raise ReferenceRefused("chained fsspec URLs (a::b) are never followed")
    if _has_dotdot(ref):
        raise ReferenceRefused("'..' in reference")
    match = _SCHEME.match(ref)
    if match and not _WINDOWS_DRIVE.match(ref):
        return _resolve_url(ref, match.group(1).lower(), policy)
    if _WINDOWS_DRIVE.match(ref) or ref.startswith(("/", "\\", "~")):
        if not is_local(table_fs):
            raise ReferenceRefused("absolute path in a table on a remote filesystem")
        real = _realpath(ref)
        if any(_under(real, _realpath(r)) for r in _local_roots(policy)):
            return Target("local", real)
        raise ReferenceRefused("absolute path outside input.references.allow_roots")
    if not is_local(table_fs):
        # Object stores have no symlinks; ".." was refused above.
        return Target("fsspec", posixpath.join(table_dir, ref), table_fs)
    real = _realpath(os.path.join(table_dir, ref))
    roots = [_realpath(table_dir), *(_realpath(r) for r in _local_roots(policy))]
    if any(_under(real, root) for root in roots):
        return Target("local", real)
    raise ReferenceRefused("path leaves the table's folder (through a symbolic link)")


def _local_roots(policy: ReferencesConfig) -> list[str]:
    """The allowed roots that are local folders (``/data`` or ``file:///data``), as paths."""
    roots = []
    for root in policy.allow_roots:
        if root.startswith("file://"):
            roots.append(urllib.parse.unquote(urllib.parse.urlparse(root).path))
        elif root.startswith("/"):
            roots.append(root)
    return roots


def _resolve_url(ref: str, scheme: str, policy: ReferencesConfig) -> Target:
    url_roots = [r for r in policy.allow_roots if _SCHEME.match(r) and not r.startswith("file://")]
    allowed = scheme in {s.lower() for s in policy.allow_schemes} or any(_url_under(ref, r) for r in url_roots)
    if scheme == "file":
        path = urllib.parse.urlparse(ref).path
        real = _realpath(urllib.parse.unquote(path))
        if allowed or any(_under(real, _realpath(r)) for r in _local_roots(policy)):
            return Target("local", real)
        raise ReferenceRefused("file:// URL outside input.references.allow_roots")
    if not allowed:
        raise ReferenceRefused(f"{scheme}:// URLs are not allowed (input.references.allow_schemes / allow_roots)")
    if scheme in ("http", "https"):
        return Target("http", ref)
    fs, path = fsspec.core.url_to_fs(ref, **_storage_options(scheme, policy))
    return Target("fsspec", path, fs)


def _storage_options(scheme: str, policy: ReferencesConfig) -> dict:
    if scheme in ("s3", "s3a"):
        return {
            "config_kwargs": {
                "connect_timeout": policy.connect_timeout_s,
                "read_timeout": policy.read_timeout_s,
                "retries": {"max_attempts": 1},
            }
        }
    return {}


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


class NotRegularFile(OSError):
    """The path names a FIFO, a device, a socket or a folder: never read."""


def read_local(path: str, max_bytes: int) -> bytes | None:
    """At most ``max_bytes`` of a regular local file; None when it is larger. Never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"not a regular file: {path}")
        if info.st_size > max_bytes:
            return None
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        data = b"".join(chunks)
        return None if len(data) > max_bytes else data
    finally:
        os.close(fd)


class _PolicyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to a URL the policy allows (an allowed CDN must not bounce us to 127.0.0.1)."""

    def __init__(self, policy: ReferencesConfig):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        match = _SCHEME.match(newurl)
        try:
            if match is None:
                raise ReferenceRefused("redirect without a scheme")
            target = _resolve_url(newurl, match.group(1).lower(), self.policy)
            if target.kind != "http":
                raise ReferenceRefused("redirect away from http(s)")
        except ReferenceRefused as exc:
            raise urllib.error.HTTPError(newurl, code, f"redirect refused: {exc}", headers, fp) from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def read_http(url: str, max_bytes: int, policy: ReferencesConfig) -> bytes | None:
    """At most ``max_bytes`` of an http(s) URL, with connect and read timeouts; None when it is larger."""
    import socket

    opener = urllib.request.build_opener(_PolicyRedirects(policy))
    request = urllib.request.Request(url, headers={"User-Agent": "grit-pipeline"})
    # urlopen's timeout is the connect timeout and then the limit on each blocking read.
    with opener.open(request, timeout=policy.connect_timeout_s) as response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return None
        sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
        if isinstance(sock, socket.socket):
            sock.settimeout(policy.read_timeout_s)
        data = response.read(max_bytes + 1)
    return None if len(data) > max_bytes else data


def read_reference(target: Target, max_bytes: int, policy: ReferencesConfig, sample: InputSample) -> None:
    """Fill ``sample.image`` from an allowed target, or set ``image_problem`` with the reason."""
    try:
        if target.kind == "local":
            data = read_local(target.path, max_bytes)
        elif target.kind == "http":
            data = read_http(target.path, max_bytes, policy)
        else:
            fs = target.fs
            size = fs.size(target.path)
            if size is not None and size > max_bytes:
                data = None
            else:
                with fs.open(target.path, "rb") as f:
                    data = f.read(max_bytes + 1)
                data = None if len(data) > max_bytes else data
    except NotRegularFile:
        sample.image_problem, sample.detail = "reference_not_allowed", "not a regular file"
        return
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        sample.image_problem, sample.detail = "missing_image", f"{type(exc).__name__}"
        return
    except Exception as exc:  # noqa: BLE001 - a failed fetch is this sample's drop, never the file's end
        problem = "image_fetch_failed" if target.kind != "local" else "missing_image"
        sample.image_problem, sample.detail = problem, describe_exception(exc)
        return
    if data is None:
        sample.image_problem, sample.detail = "image_too_many_bytes", f"over image.max_bytes={max_bytes}"
        return
    sample.image = data


def read_referenced_image(
    ref: str, table_fs, table_dir: str, policy: ReferencesConfig, max_bytes: int, sample: InputSample
) -> None:
    """Apply the policy to ``ref`` and read it into ``sample`` (or say why not)."""
    try:
        target = resolve(ref, table_fs, table_dir, policy)
    except ReferenceRefused as exc:
        sample.image_problem, sample.detail = "reference_not_allowed", str(exc)
        return
    except Exception as exc:  # noqa: BLE001 - an allowed protocol whose back end is missing or misconfigured
        sample.image_problem, sample.detail = "image_fetch_failed", describe_exception(exc)
        return
    read_reference(target, max_bytes, policy, sample)
