"""The training loader: WebDataset shards (ours and GRIT-20M's), plain image-caption shards and text JSONL, mixed
by weight, tokenised into Kosmos-2 sequences, batched, with a position the trainer can checkpoint.

Per reader (a DataLoader worker of one rank; ``slot = rank * workers + worker``), the pipeline is::

    for each source: shard list -> shuffle shard order (seed, epoch) -> split by node and worker -> read tar/JSONL
                     -> shuffle buffer (seed, epoch, slot)                         [kosmos.data.sources.epoch_stream]
    mix: pick a source by weight (counter-based draw)      -> decode + CLIP transform + sequence building
         (bad samples logged, counted, skipped)            -> batch (pad, or pack)  -> DataLoader (batch_size=None)

Everything random is a function of ``seed`` and a position: the shard order of an epoch, the shuffle buffer of
a reader's epoch, the source picked by the n-th draw, and the grounded-or-plain choice of a sample (seeded by its
source, epoch and key). The data position is therefore small: per reader, the number of draws and each source's
``(epoch, offset)``. Every batch carries its reader's position; :class:`KosmosLoader` keeps the one of the last
batch handed to the trainer, and ``state_dict()`` / ``make_loader(..., state=...)`` continue exactly there, shuffle
buffers and several workers included. Resuming replays each source's current epoch up to its offset without
decoding anything (reading tar bytes only), which costs far less than training on those samples but is not free.

The DataLoader takes batches from its workers in turn; after ``n`` batches the next one is due from worker
``n % workers``, so on resume worker ``w`` plays the role of ``(w + n) % workers``. Resuming needs the same seed,
world size and number of workers.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kosmos.data.collate import Batcher, collate_rows
from kosmos.data.parquet import PARQUET_MAGIC, ParquetSourceError, check_parquet, is_parquet
from kosmos.data.sequence import SequenceConfig
from kosmos.data.shards import complete_shards, expand_shard_patterns, is_remote
from kosmos.data.sources import (
    LogAndContinue,
    SourceConfig,
    SourceStream,
    decode_or_count,
    epoch_stream,
    uniform,
)
from kosmos.data.tokenizer import KosmosTokenizer

log = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1

__all__ = ["DataConfig", "KosmosLoader", "SequenceConfig", "SourceConfig", "make_loader"]


@dataclass
class DataConfig:
    """Loader settings (``data.*`` in the training config)."""

    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 8  # rows per batch, per rank (a micro-batch)
    max_length: int = 2048  # longest row; longer image samples are dropped, longer texts cut
    pack: bool = False  # several samples per row, up to max_length
    pad_to_multiple_of: int = 8
    num_workers: int = 2  # DataLoader workers per rank (0: read in the training process)
    prefetch_factor: int = 2
    pin_memory: bool = False
    shuffle_buffer: int = 1000  # samples per reader; 0 or 1 = read in shard order
    shuffle_initial: int = 100  # samples buffered before the first one is handed out
    shuffle_shards: bool = True  # a new shard order every epoch
    seed: int = 0
    # Decode JPEGs at a reduced scale (>= the crop size): faster on large photos; pixels differ slightly from the
    # original pipeline's full decode + bicubic resize, so it is off by default.
    fast_jpeg_decode: bool = False
    sequence: SequenceConfig = field(default_factory=SequenceConfig)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting; fills in default source names."""
        if not self.sources:
            raise ValueError("data.sources is empty: give at least one source with shards")
        names = set()
        for i, source in enumerate(self.sources):
            if not source.name:
                source.name = f"{source.kind}{i}"
            if not source.weight > 0:
                raise ValueError(f"data.sources[{i}].weight must be > 0, got {source.weight}")
            if not source.shards:
                raise ValueError(f"data.sources[{i}] ({source.name}) has no shards")
            if source.name in names:
                raise ValueError(f"data.sources: two sources are named {source.name!r}")
            names.add(source.name)
        if self.max_length < self.sequence.num_image_tokens + 8:
            raise ValueError(f"data.max_length {self.max_length} leaves no room for a caption")
        if self.num_workers < 0 or self.batch_size < 1:
            raise ValueError("data.num_workers must be >= 0 and data.batch_size >= 1")


def resolve_shards(source: SourceConfig) -> list[str]:
    """The source's shard list, incomplete local tar shards left out (and logged). Local parquet files are checked
    here, so one the source cannot use stops the run before it starts (:class:`ParquetSourceError`)."""
    urls = expand_shard_patterns(source.shards)
    parquet = [u for u in urls if is_parquet(u)]
    if parquet and source.kind == "text":
        raise ParquetSourceError(f"source {source.name!r}: a text source reads JSONL files, not {parquet[0]}")
    for url in urls:
        if is_remote(url):
            continue
        if is_parquet(url):
            check_parquet(url, source.kind)
        elif source.kind != "text" and Path(url).is_file() and _starts_with(url, PARQUET_MAGIC):
            raise ParquetSourceError(f"{url} is a parquet file: name it *.parquet to read it as one")
    if source.complete_shards_only and source.kind != "text" and len(parquet) < len(urls):
        tars, incomplete = complete_shards([u for u in urls if not is_parquet(u)])
        urls = [u for u in urls if is_parquet(u) or u in set(tars)]
        if incomplete:
            log.warning(
                "%s: %d shard(s) without _stats.json left out, e.g. %s", source.name, len(incomplete), incomplete[0]
            )
        if not urls:
            raise FileNotFoundError(
                f"source {source.name!r}: no complete shard (a tar with its _stats.json) in {source.shards}; "
                "set complete_shards_only: false for shards written by a tool that writes no stats file"
            )
    return urls


def _starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


class KosmosDataset(IterableDataset):
    """The per-reader pipeline of the module doc. Yields collated batches, each with its ``data_state`` and the
    ``counts`` its reader gathered since the previous batch (both taken off by :class:`KosmosLoader`)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: KosmosTokenizer,
        source_urls: list[list[str]],
        rank: int = 0,
        world_size: int = 1,
        worker_states: dict[int, dict] | None = None,
        worker_offset: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.source_urls = source_urls
        self.rank = rank
        self.world_size = world_size
        self.worker_states = worker_states or {}
        self.worker_offset = worker_offset

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = max(1, self.cfg.num_workers)
        physical = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # the workers decode; intra-op threads would only fight over cores
        return self.reader_batches((physical + self.worker_offset) % workers)

    def reader_batches(self, worker: int) -> Iterator[dict]:
        """The endless batch stream of logical ``worker`` of this rank."""
        cfg = self.cfg
        workers = max(1, cfg.num_workers)
        slot, num_slots = self.rank * workers + worker, self.world_size * workers
        state = self.worker_states.get(worker) or {}
        counts: Counter = Counter()
        logged: Counter = Counter()
        handler = LogAndContinue(counts)
        streams = []
        for source, urls in zip(cfg.sources, self.source_urls):
            position = state.get("sources", {}).get(source.name, {"epoch": 0, "offset": 0})

            def make_epoch(epoch: int, source=source, urls=urls) -> Iterator[dict]:
                return epoch_stream(
                    source,
                    urls,
                    epoch,
                    slot,
                    num_slots,
                    cfg.seed,
                    cfg.shuffle_shards,
                    cfg.shuffle_buffer,
                    cfg.shuffle_initial,
                    handler,
                )

            streams.append(SourceStream(source, make_epoch, position["epoch"], position["offset"]))
        cumulative = []
        total = 0.0
        for source in cfg.sources:
            total += source.weight
            cumulative.append(total)
        draws = int(state.get("draws", 0))
        batcher = Batcher(cfg.batch_size, cfg.max_length, cfg.pack)
        while True:
            point = uniform(cfg.seed, "mix", slot, draws) * total
            pick = min(bisect.bisect_right(cumulative, point), len(streams) - 1)
            draws += 1
            stream = streams[pick]
            raw = next(stream)
            counts["samples"] += 1
            sample = decode_or_count(
                raw,
                stream.source,
                self.tokenizer,
                cfg.sequence,
                cfg.max_length,
                cfg.seed,
                counts,
                logged,
                cfg.fast_jpeg_decode,
            )
            if sample is None:
                continue
            sample.state = {"draws": draws, "sources": {s.source.name: s.position() for s in streams}}
            rows = batcher.add(sample)
            if rows is None:
                continue
            batch = collate_rows(rows, self.tokenizer.pad_id, cfg.pad_to_multiple_of, cfg.sequence.image_size)
            batch["data_state"] = {"worker": worker, "state": rows[-1][-1].state}
            batch["counts"] = dict(counts)
            counts.clear()
            yield batch


class KosmosLoader:
    """Iterable of training batches for one rank, with a checkpointable position.

    ``for batch in loader`` runs forever (sources repeat epoch after epoch). ``state_dict()`` is the position after
    the last batch handed out; ``counts`` sums what every reader counted (samples, kept, ``dropped_<reason>``,
    grounded/plain choices, box and phrase filters, read errors).
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: KosmosTokenizer,
        rank: int = 0,
        world_size: int = 1,
        state: dict | None = None,
    ) -> None:
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.source_urls = [resolve_shards(s) for s in cfg.sources]
        self.batches = 0
        self.worker_states: dict[int, dict] = {}
        self.counts: Counter = Counter()
        if state is not None:
            self.load_state_dict(state)

    @property
    def num_readers(self) -> int:
        return max(1, self.cfg.num_workers)

    def dataset(self) -> KosmosDataset:
        return KosmosDataset(
            self.cfg,
            self.tokenizer,
            self.source_urls,
            self.rank,
            self.world_size,
            {w: dict(s) for w, s in self.worker_states.items()},
            self.batches % self.num_readers,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = self.dataset()
        if self.cfg.num_workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.cfg.num_workers,
                    prefetch_factor=self.cfg.prefetch_factor,
                    pin_memory=self.cfg.pin_memory,
                    persistent_workers=False,
                )
            )
        for batch in batches:
            data_state = batch.pop("data_state")
            self.worker_states[int(data_state["worker"])] = data_state["state"]
            self.counts.update(batch.pop("counts"))
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position; one per rank (save each rank's)."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "seed": self.cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_readers,
            "batches": self.batches,
            "sources": [{"name": s.name, "kind": s.kind, "weight": s.weight} for s in self.cfg.sources],
            "workers": {str(w): s for w, s in sorted(self.worker_states.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. The reader layout must match; a source the state does not know starts at its
        beginning (logged)."""
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(f"data state format {state.get('format_version')!r} is not {STATE_FORMAT_VERSION}")
        mine = {
            "seed": self.cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_readers,
        }
        for name, value in mine.items():
            if state.get(name) != value:
                raise ValueError(
                    f"data state was saved with {name}={state.get(name)!r}, this loader has {name}={value!r}: "
                    "resuming exactly needs the same seed, rank, world size and number of workers"
                )
        known = {s["name"] for s in state.get("sources", [])}
        for source in self.cfg.sources:
            if source.name not in known:
                log.warning("data source %r is not in the saved state: it starts from its beginning", source.name)
        self.batches = int(state["batches"])
        self.worker_states = {int(w): s for w, s in state.get("workers", {}).items()}


def make_loader(
    cfg: DataConfig,
    tokenizer: KosmosTokenizer,
    rank: int = 0,
    world_size: int = 1,
    state: dict | None = None,
) -> KosmosLoader:
    """The loader of rank ``rank`` out of ``world_size``, at the position ``state`` (from ``state_dict()``) if
    given. Each rank reads its own share of every source; no torch.distributed call is made here."""
    return KosmosLoader(cfg, tokenizer, rank=rank, world_size=world_size, state=state)
