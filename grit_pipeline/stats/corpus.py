"""Find what the report reads: a built corpus (shards marked complete by ``_stats.json``) or bare parquet files.

A folder with ``<shard>_stats.json`` files is one of two layouts, told apart by what the counters hold:

- ``shards``: a corpus written by ``grit build`` (docs/format.md; counters under ``counts``). Each complete shard
  has its parquet index, its tar and its counters; tars or parquet files without counters are unfinished and left
  out, and said so.
- ``img2dataset``: an img2dataset download (the route GRIT-20M's card gives: its parquet files as the URL list,
  the GRIT columns saved with ``--save_additional_columns``). Counters ``count``, ``successes``,
  ``failed_to_download``, ``failed_to_resize``; the parquet has one row per input URL with img2dataset's
  ``status`` (``success`` or the failure); the tar holds the successes. A success is a kept record, a failure a
  dropped input whose reason is its status.

Counters of neither kind, or of both kinds in one folder, stop the report with a :class:`CorpusError`: counting
such a folder one way or the other would print wrong figures. A folder without any ``_stats.json`` (or a single
``.parquet`` file) is read as parquet records: GRIT-20M-style files (every row a record, no images, no counters),
or index files with a ``status`` column (a grit index, or img2dataset's, recognised per file).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATS_SUFFIX = "_stats.json"
# Keys every img2dataset ``<shard>_stats.json`` holds (img2dataset's logger.write_stats).
IMG2DATASET_STATS_KEYS = frozenset(("count", "successes", "failed_to_download", "failed_to_resize"))
IMG2DATASET_SUCCESS = "success"
IMG2DATASET_DROP_REASONS = ("failed_to_download", "failed_to_resize")


def stats_layout(stats: dict[str, Any]) -> str | None:
    """``"shards"`` for a grit build's counters, ``"img2dataset"`` for img2dataset's, None for neither."""
    if isinstance(stats.get("counts"), dict):
        return "shards"
    if stats.keys() >= IMG2DATASET_STATS_KEYS:
        return "img2dataset"
    return None


def shard_counters(shard: Shard, mode: str) -> dict[str, Any] | None:
    """A shard's counters in grit's names (``input``, ``kept``, ``dropped``, ``dropped_<reason>``)."""
    if mode != "img2dataset":
        return shard.stats.get("counts")
    st = shard.stats
    values = {k: st.get(k) for k in IMG2DATASET_STATS_KEYS}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
        return None
    out = {"input": values["count"], "kept": values["successes"], "dropped": values["count"] - values["successes"]}
    for reason in IMG2DATASET_DROP_REASONS:
        out[f"dropped_{reason}"] = values[reason]
    return out


def shard_seconds(shard: Shard, mode: str) -> dict[str, Any] | None:
    if mode != "img2dataset":
        return shard.stats.get("seconds")
    duration = shard.stats.get("duration")
    return {"download": duration} if isinstance(duration, (int, float)) else None


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
    mode: str  # "shards" (built by grit build), "img2dataset" (a download) or "parquet" (bare parquet files)
    shards: list[Shard] = field(default_factory=list)
    parquet_files: list[Path] = field(default_factory=list)  # parquet mode only
    manifest: dict[str, Any] | None = None
    incomplete: list[str] = field(default_factory=list)  # shard names without _stats.json, ignored
    problems: list[str] = field(default_factory=list)  # unreadable files, missing indexes

    def index_files(self) -> list[tuple[str, Path]]:
        """``(shard name, parquet path)`` for every index file the figures are computed from, in order."""
        if self.mode != "parquet":
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
    layouts: dict[str, list[str]] = {}
    for path_ in stats_files:
        name = path_.name[: -len(STATS_SUFFIX)]
        stats = _read_json(path_, problems)
        if stats is None:
            continue
        layouts.setdefault(str(stats_layout(stats)), []).append(path_.name)
        parquet = root / f"{name}.parquet"
        tar = root / f"{name}.tar"
        if not parquet.exists():
            problems.append(f"shard {name}: {parquet.name} is missing, its records are not in the figures")
        shards.append(Shard(name, parquet if parquet.exists() else None, tar if tar.exists() else None, stats))
    if "None" in layouts:
        raise CorpusError(
            f"{root}: {layouts['None'][0]} holds neither a grit build's counters ('counts') nor img2dataset's "
            f"({', '.join(sorted(IMG2DATASET_STATS_KEYS))}); the report cannot tell what the folder holds"
        )
    if len(layouts) > 1:
        raise CorpusError(
            f"{root} mixes a grit build's shards ({layouts['shards'][0]}, ...) with an img2dataset download's "
            f"({layouts['img2dataset'][0]}, ...); give each its own folder"
        )
    mode = next(iter(layouts), "shards")
    complete = {s.name for s in shards} | {p.name[: -len(STATS_SUFFIX)] for p in stats_files}
    others = {p.stem for p in root.glob("*.tar")} | {p.stem for p in root.glob("*.parquet")}
    incomplete = sorted(n for n in others - complete if "." not in n)
    return Corpus(root, mode, shards, [], manifest, incomplete, problems)


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO 8601 timestamp, or None; naive times are taken as UTC."""
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
