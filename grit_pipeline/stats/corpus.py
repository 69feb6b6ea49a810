"""Find what the report reads: a built corpus (shards marked complete by ``_stats.json``) or bare parquet files.

A folder with ``<shard>_stats.json`` files is a corpus written by ``grit build`` (docs/format.md): each complete
shard has its parquet index, its tar and its counters; tars or parquet files without counters are unfinished
and left out, and said so. A folder without any ``_stats.json`` (or a single ``.parquet`` file) is read as
GRIT-20M-style parquet: every row is a kept record, there are no images and no counters.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATS_SUFFIX = "_stats.json"


class CorpusError(ValueError):
    """The path holds nothing the report can read; the message says what was looked for."""


@dataclass
class Shard:
    name: str
    parquet: Path | None
    tar: Path | None
    stats: dict[str, Any]


@dataclass
class Corpus:
    root: Path
    mode: str  # "shards" (built by grit build) or "parquet" (GRIT-20M-style files)
    shards: list[Shard] = field(default_factory=list)
    parquet_files: list[Path] = field(default_factory=list)  # parquet mode only
    manifest: dict[str, Any] | None = None
    incomplete: list[str] = field(default_factory=list)  # shard names without _stats.json, ignored
    problems: list[str] = field(default_factory=list)  # unreadable files, missing indexes

    def index_files(self) -> list[tuple[str, Path]]:
        """``(shard name, parquet path)`` for every index file the figures are computed from, in order."""
        if self.mode == "shards":
            return [(s.name, s.parquet) for s in self.shards if s.parquet is not None]
        return [(p.stem, p) for p in self.parquet_files]

    def tar_of(self, shard: str) -> Path | None:
        for s in self.shards:
            if s.name == shard:
                return s.tar
        return None


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name}: unreadable ({exc})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name}: not a JSON object")
        return None
    return data


def open_corpus(path: str | Path) -> Corpus:
    """Look at ``path`` and say what it holds; reads only the small JSON files."""
    root = Path(path)
    if root.is_file():
        if root.suffix != ".parquet":
            raise CorpusError(f"{root} is a file but not a .parquet file; give a corpus folder or a parquet file")
        return Corpus(root=root, mode="parquet", parquet_files=[root])
    if not root.is_dir():
        raise CorpusError(f"{root} does not exist")
    problems: list[str] = []
    manifest = _read_json(root / "manifest.json", problems) if (root / "manifest.json").exists() else None
    stats_files = sorted(root.glob(f"*{STATS_SUFFIX}"))
    if not stats_files:
        parquet = sorted(root.glob("*.parquet"))
        if not parquet:
            raise CorpusError(
                f"{root} holds no shards (<shard>{STATS_SUFFIX}) and no .parquet files; is it a grit build output?"
            )
        return Corpus(root=root, mode="parquet", parquet_files=parquet, manifest=manifest, problems=problems)
    shards = []
    for path_ in stats_files:
        name = path_.name[: -len(STATS_SUFFIX)]
        stats = _read_json(path_, problems)
        if stats is None:
            continue
        parquet = root / f"{name}.parquet"
        tar = root / f"{name}.tar"
        if not parquet.exists():
            problems.append(f"shard {name}: {parquet.name} is missing, its records are not in the figures")
        shards.append(Shard(name, parquet if parquet.exists() else None, tar if tar.exists() else None, stats))
    complete = {s.name for s in shards} | {p.name[: -len(STATS_SUFFIX)] for p in stats_files}
    others = {p.stem for p in root.glob("*.tar")} | {p.stem for p in root.glob("*.parquet")}
    incomplete = sorted(n for n in others - complete if "." not in n)
    return Corpus(root, "shards", shards, [], manifest, incomplete, problems)


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO 8601 timestamp, or None; naive times are taken as UTC."""
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
