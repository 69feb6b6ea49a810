"""Finding input files: paths, globs and folders (local or any fsspec URL) into the ordered list of inputs."""

from __future__ import annotations

import os

import fsspec

from grit_pipeline.readers.references import is_local
from grit_pipeline.readers.sample import FORMATS, InputError, InputFile


def format_of(path: str) -> str | None:
    name = path.lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):  # not .json: a folder of images may hold .json sidecars
        return "jsonl"
    return None


def _url(fs, path: str) -> str:
    if is_local(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def resolve_inputs(patterns: list[str], fmt: str = "auto") -> list[InputFile]:
    """Expand paths, globs and folders into the ordered list of input files.

    Order: patterns as given, matches of one pattern sorted; a file named twice is read once. A folder is read as
    the files it holds of one format (tars first, as img2dataset output folders also hold metadata parquet files),
    or, holding none, as a folder of images with same-named ``.txt`` captions.
    """
    if fmt not in ("auto", *FORMATS):
        raise InputError(f"input.format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")
    if not patterns:
        raise InputError("no input given: pass --input PATTERN or set input.paths in the config")
    found: list[tuple[str, str]] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        if any(ch in path for ch in "*?["):
            matches = sorted(fs.glob(path))
            if not matches:
                raise InputError(f"input pattern {pattern!r} matches no file")
            for match in matches:
                found.extend(_classify(fs, match, fmt, pattern))
        elif fs.exists(path):
            found.extend(_classify(fs, path, fmt, pattern))
        else:
            raise InputError(f"input {pattern!r} does not exist")
    seen: set[str] = set()
    files: list[InputFile] = []
    for path, kind in found:
        if path in seen:
            continue
        seen.add(path)
        files.append(InputFile(index=len(files), path=path, format=kind))
    return files


def _classify(fs, path: str, fmt: str, pattern: str) -> list[tuple[str, str]]:
    if not fs.isdir(path):
        kind = fmt if fmt != "auto" else format_of(path)
        if kind is None or kind == "images":
            raise InputError(f"cannot tell the format of {pattern!r} from its name: set input.format")
        return [(_url(fs, path), kind)]
    if fmt == "images":
        return [(_url(fs, path), "images")]
    children = sorted(p for p in fs.ls(path, detail=False) if not fs.isdir(p))
    for kind in ("webdataset", "parquet", "jsonl"):
        if fmt not in ("auto", kind):
            continue
        chosen = [p for p in children if format_of(p) == kind]
        if chosen:
            return [(_url(fs, p), kind) for p in chosen]
    if fmt == "auto":
        return [(_url(fs, path), "images")]
    raise InputError(f"folder {pattern!r} holds no {fmt} files")
