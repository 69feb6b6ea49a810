"""Reading WebDataset tars that may be hostile: streamed, never extracted, every member checked first.

Only regular-file members are read. Members with an absolute path, a ``..`` component, links, devices and FIFOs
are refused (``unsafe_member``), never followed or written; members over ``input.max_member_bytes`` are not read
(``member_too_large``); a tar is read up to ``input.max_tar_members`` members (``too_many_members``); pax and GNU
long-name headers too large to be real are refused before tarfile reads them whole. A truncated or corrupt archive
keeps the samples before the damage and drops the one it cuts (``bad_input``: the rest of the file is unknown).
A ``.txt`` or ``.json`` member over ``input.max_text_bytes`` is not read (``caption_too_long`` / ``cell_too_large``);
any other failure with one sample (bad JSON, a bad annotation) drops that sample (``bad_sample``) and the next is read.
Member names that are not UTF-8 are decoded with ``surrogateescape`` by tarfile and made valid UTF-8 by the caller.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec

from grit_pipeline.config import InputConfig
from grit_pipeline.readers.sample import (
    CAPTION_EXTS,
    IMAGE_EXTS,
    META_EXTS,
    InputSample,
    Skip,
    apply_metadata,
    decode_text,
    failed_sample,
    make_key,
    split_member_name,
)

logger = logging.getLogger(__name__)

# Pax and GNU long-name headers are read whole by tarfile; a real one is a few hundred bytes.
MAX_TAR_HEADER_BYTES = 1 << 20


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses pax and GNU long-name headers too large to be real (tarfile reads them whole)."""

    def _proc_member(self, tarfile_obj):  # noqa: D401 - tarfile's dispatch hook
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)
        if self.type in extended + (tarfile.SOLARIS_XHDTYPE,) and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.ReadError(f"extended header of {self.size} bytes (limit {MAX_TAR_HEADER_BYTES})")
        return super()._proc_member(tarfile_obj)


def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None for a plain regular file with a relative, contained name."""
    name = member.name
    if not (member.isreg() and not member.issparse()):
        kind = (
            "symbolic link"
            if member.issym()
            else "hard link"
            if member.islnk()
            else "device"
            if (member.ischr() or member.isblk())
            else "FIFO"
            if member.isfifo()
            else "sparse file"
            if member.issparse()
            else f"type {member.type!r}"
        )
        return f"{kind} {name!r}"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"absolute path {name!r}"
    if ".." in re.split(r"[\\/]+", name):
        return f"path with '..' {name!r}"
    if "\x00" in name:
        return f"NUL in name {name!r}"
    return None


def iter_tar(
    fileobj, source: str, cfg: InputConfig, skip: int | Skip = 0, seekable: bool = True
) -> Iterator[InputSample]:
    """Samples of one WebDataset tar: consecutive members with the same key form a sample.

    A refused member counts as one sample (dropped). The samples at the positions in ``skip`` (already in complete
    shards) come back as ``"skipped"`` placeholders and their data is not read. A member whose data ends early (a
    truncated tar) drops its sample as ``bad_input``; the samples before it are kept.
    """
    skip = Skip.of(skip)
    group_key: str | None = None
    group: dict[str, Any] = {}
    index = 0  # samples started so far
    members = 0

    def finish() -> InputSample | None:
        nonlocal group_key, group
        if group_key is None:
            return None
        sample = _tar_sample(group_key, group, source)
        group_key, group = None, {}
        return sample

    def single(key: str, reason: str, detail: str, where: str = "") -> InputSample:
        nonlocal index
        index += 1
        if index - 1 in skip:
            return InputSample(key="", source=source, drop_reason="skipped")
        return InputSample(key=make_key(key), source=source + where, drop_reason=reason, detail=detail)

    try:
        # Not a context manager: closing is the caller's (it owns ``fileobj``), and we stop mid-archive.
        tf = tarfile.open(fileobj=fileobj, mode="r:*" if seekable else "r|*", tarinfo=_BoundedTarInfo)  # noqa: SIM115
        while True:
            member = tf.next()
            if member is None:
                break
            tf.members.clear()  # tarfile keeps every header otherwise: memory grows with the tar
            members += 1
            if members > cfg.max_tar_members:
                detail = f"more than input.max_tar_members={cfg.max_tar_members} members; the rest is not read"
                logger.warning("%s: %s", source, detail)
                if group_key is not None and split_member_name(member.name)[0] == group_key:
                    # The bound cuts this sample in two: it is incomplete, and stands for the unread rest.
                    if not group["skip"]:
                        group["bad"] = ("too_many_members", detail)
                    yield finish()
                    return
                done = finish()
                if done is not None:
                    yield done
                yield single(f"{posixpath.basename(source)}_member_{members}", "too_many_members", detail)
                return
            if member.isdir():
                continue
            reason = unsafe_member_reason(member)
            if reason is not None:
                done = finish()
                if done is not None:
                    yield done
                logger.warning("%s: refused tar member: %s", source, reason)
                yield single(member.name, "unsafe_member", reason, where=f":{member.name}")
                continue
            key, ext = split_member_name(member.name)
            if key != group_key:
                done = finish()
                if done is not None:
                    yield done
                group_key = key
                group = {"skip": index in skip}
                index += 1
            if group["skip"]:
                continue
            if member.size > cfg.max_member_bytes:
                group["too_large"] = f"member {member.name!r} has {member.size} bytes > input.max_member_bytes"
                continue
            if ext not in IMAGE_EXTS and ext not in CAPTION_EXTS and ext not in META_EXTS:
                group["ignored"] = group.get("ignored", 0) + 1
                continue
            if ext not in IMAGE_EXTS and member.size > cfg.max_text_bytes:
                reason = "caption_too_long" if ext in CAPTION_EXTS else "cell_too_large"
                group.setdefault(
                    "text_too_large",
                    (
                        reason,
                        f"member {member.name!r} has {member.size} bytes > input.max_text_bytes={cfg.max_text_bytes}",
                    ),
                )
                continue
            handle = tf.extractfile(member)
            data = handle.read() if handle is not None else b""
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name!r} ends early")
            if ext in IMAGE_EXTS:
                if "image" in group:
                    group["ignored"] = group.get("ignored", 0) + 1
                else:
                    group["image"] = data
            else:
                group[ext] = data
    except Exception as exc:  # noqa: BLE001 - the archive breaks here; what came before is intact
        # Truncated or corrupt archive: the sample being read is incomplete; earlier ones are intact.
        logger.warning("%s: tar unreadable after %d members: %s", source, members, exc)
        if group_key is not None:
            if not group.get("skip"):
                group["bad"] = ("bad_input", f"tar unreadable here: {exc}")
        else:
            yield single(f"{posixpath.basename(source)}_unreadable_{members}", "bad_input", f"tar unreadable: {exc}")
    done = finish()
    if done is not None:
        yield done


def _tar_sample(key: str, group: dict[str, Any], source: str) -> InputSample | None:
    sample = InputSample(key=make_key(key), source=f"{source}:{key}")
    if group.get("skip"):
        sample.drop_reason = "skipped"  # resume: already in a complete shard; never reaches the output
        return sample
    if group.get("ignored"):
        sample.counters["members_ignored"] = group["ignored"]
    if "bad" in group:
        sample.drop_reason, sample.detail = group["bad"]
        return sample
    if "too_large" in group:
        sample.drop_reason, sample.detail = "member_too_large", group["too_large"]
        return sample
    if "text_too_large" in group:
        sample.drop_reason, sample.detail = group["text_too_large"]
        return sample
    try:
        if "txt" in group:
            sample.caption = decode_text(group["txt"], "caption")
        if "json" in group:
            meta = json.loads(decode_text(group["json"], ".json member"))
            if not isinstance(meta, dict):
                raise ValueError(".json member is not an object")
            apply_metadata(sample, meta)
    except Exception as exc:  # noqa: BLE001 - one sample's bad metadata is its drop
        return failed_sample(sample.key, sample.source, exc)
    sample.image = group.get("image")
    if sample.image is None:
        sample.image_problem = "missing_image"
    return sample


def iter_webdataset(path: str, cfg: InputConfig, max_bytes: int, skip: int | Skip = 0) -> Iterator[InputSample]:
    """Samples of one WebDataset tar (local or any fsspec URL); gzip-compressed tars are streamed."""
    del max_bytes  # members are bounded by input.max_member_bytes; the image stage checks image.max_bytes
    fs, fpath = fsspec.core.url_to_fs(path)
    with fs.open(fpath, "rb") as f:
        seekable = bool(getattr(f, "seekable", lambda: False)()) and not path.lower().endswith((".gz", ".tgz"))
        yield from iter_tar(f, path, cfg, skip=skip, seekable=seekable)
