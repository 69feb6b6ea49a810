"""The ``grit build`` job: input files -> Ray Data stages -> our shard writer on the driver.

::

    from_items(input files) -> read (tasks) -> text (actors, spaCy) -> image (actors: checks, decode, preprocess)
        -> grounding (actors, GPU where there is one) -> iter_batches on the driver -> ShardWriter

Ray: ``ray.address`` or ``RAY_ADDRESS`` joins a cluster (``ray job submit`` sets it); otherwise an embedded local
Ray is started, sized to hold every stage's actors (dashboard off) and shut down at the end. If Ray is already
initialised in this process (tests, notebooks), that session is used and left running.

Before any input is read, one Ray task loads the spaCy pipeline and builds the detector, so a missing model stops
the build at once with the loader's message. The writer lives on the driver: only the driver writes to the output
folder, which therefore needs to be on the driver's filesystem (see docs/cluster.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from grit_pipeline.config import GritConfig, dump_config
from grit_pipeline.manifest import (
    CONFIG_COPY,
    ManifestMismatch,
    check_layout,
    check_results,
    layout,
    new_manifest,
    read_manifest,
    result_settings,
    write_manifest,
)
from grit_pipeline.progress import Progress, merge_stats, summary_table
from grit_pipeline.readers import InputError, InputFile, resolve_inputs
from grit_pipeline.writer import STATS_SUFFIX, ShardWriteError, ShardWriter, clean_output, scan_output

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1  # started and did not finish: re-run the same command to resume
EXIT_REFUSED = 2  # did not start: bad config or input, settings mismatch, missing model


class BuildRefused(RuntimeError):
    """The build cannot start; the message says why and what to do."""


@dataclass
class BuildOutcome:
    exit_code: int
    status: str  # "complete", "incomplete", "failed", "refused"
    message: str = ""
    shards: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    random_weights: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------------------------


def stage_cpus(cfg: GritConfig) -> float:
    """Logical CPUs the plan reserves for the whole run: every actor pool, plus one read task."""
    return sum(d.cpus for d in stage_demand(cfg))


@dataclass
class StageDemand:
    """What one stage holds while the build runs: ``workers`` actors (one task for a source stage) of
    ``cpus_each``/``gpus_each``."""

    stage: str
    workers: int
    cpus_each: float
    gpus_each: float
    kind: str = "actor"  # or "task" (reading)

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_each

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_each

    def describe(self) -> str:
        gpus = f" + {self.gpus_each:g} GPU" if self.gpus_each else ""
        plural = "s" if self.workers != 1 else ""
        return f"{self.stage} ({self.workers} {self.kind}{plural} x {self.cpus_each:g} CPU{gpus})"


def stage_demand(cfg: GritConfig, auto_gpus: float = 0.0) -> list[StageDemand]:
    """Per stage, in plan order, the resources it holds; ``auto_gpus`` is what ``num_gpus: -1`` stands for."""
    from grit_pipeline.stages import STAGES, SourceStage

    out = []
    for stage in STAGES:
        res = stage.resources_for(cfg)
        source = issubclass(stage, SourceStage)
        workers = 1 if source else max(1, res.actors)  # reading needs one task at a time, not a pool
        gpus = auto_gpus if res.num_gpus < 0 else res.num_gpus
        out.append(StageDemand(stage.name, workers, res.num_cpus, gpus, "task" if source else "actor"))
    return out


def start_ray(cfg: GritConfig) -> bool:
    """Join or start Ray; returns True when this call started it (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    common = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **common)
    else:
        # Actor pools hold their CPUs for the whole run; a machine with fewer cores than they reserve still runs
        # them all (oversubscribed), rather than waiting forever for CPUs that never free up.
        num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(stage_cpus(cfg) + 0.999))
        ray.init(
            address="local",  # a new local instance, never a cluster some `ray start` left on this machine
            num_cpus=num_cpus,
            num_gpus=None if cfg.ray.num_gpus < 0 else cfg.ray.num_gpus,
            object_store_memory=cfg.ray.object_store_memory or None,
            include_dashboard=False,
            **common,
        )
    return True


def configure_ray_data() -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line instead of one bar per operator
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": we know


def auto_gpus() -> float:
    """What ``num_gpus: -1`` means on the Ray cluster this process is connected to: one GPU where it has GPUs."""
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def grounding_gpus(cfg: GritConfig) -> float:
    """GPUs per grounding actor: as configured, or (``-1``) one where the cluster has GPUs, none where it has none."""
    from grit_pipeline.stages import GroundingStage

    requested = GroundingStage.resources_for(cfg).num_gpus
    return requested if requested >= 0 else auto_gpus()


def capacity_problem(demand: list[StageDemand], total: dict[str, float], largest: dict[str, float]) -> str:
    """Why a cluster with ``total`` resources (its largest node: ``largest``) cannot hold ``demand``; "" if it can.

    Pools are placed in plan order; the message names the pools that do not fit and what is missing.
    """
    problems = []
    for d in demand:
        for kind, each in (("CPU", d.cpus_each), ("GPU", d.gpus_each)):
            if each > largest.get(kind, 0.0) + 1e-9:
                problems.append(
                    f"one {d.stage} worker needs {each:g} {kind}, the largest node has {largest.get(kind, 0.0):g}"
                )
    for kind, attr in (("CPU", "cpus"), ("GPU", "gpus")):
        need = sum(getattr(d, attr) for d in demand)
        have = total.get(kind, 0.0)
        if need <= have + 1e-9:
            continue
        used, short = 0.0, []
        for d in demand:
            used += getattr(d, attr)
            if getattr(d, attr) and used > have + 1e-9:
                short.append(d.describe())
        parts = ", ".join(f"{d.stage} {getattr(d, attr):g}" for d in demand if getattr(d, attr))
        problems.append(
            f"the stages reserve {need:g} {kind} ({parts}) but the cluster has {have:g}: {need - have:g} {kind} "
            f"missing; pool(s) that do not fit: {'; '.join(short)}"
        )
    return "; ".join(problems)


def _cluster_resources() -> tuple[dict[str, float], dict[str, float]]:
    import ray

    total = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    largest: dict[str, float] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        for kind in ("CPU", "GPU"):
            largest[kind] = max(largest.get(kind, 0.0), float(node.get("Resources", {}).get(kind, 0.0)))
    return total, largest


def _warn_if_busy(demand: list[StageDemand], largest: dict[str, float], cfg: GritConfig) -> None:
    """The plan fits the cluster, but not what is free of it now: say which pools will wait, and how long."""
    import ray

    free = {k: float(v) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    busy = capacity_problem(demand, free, largest)
    if busy:
        limit = actor_start_timeout(cfg)
        logger.warning(
            "other work holds part of the Ray cluster (%s); the stages wait for it %s",
            busy.replace("the cluster has", "the cluster has free"),
            "for ever" if limit < 0 else f"up to {limit} s (ray.actor_start_timeout_s)",
        )


def check_capacity(cfg: GritConfig, num_gpus: float | None = None) -> None:
    """Refuse a plan the cluster cannot hold (Ray would wait for ever for its actors), naming the pools and the
    missing resources. ``ray.wait_for_resources_s`` > 0 first waits that long for the cluster to grow (an
    autoscaler), -1 for ever; an embedded local Ray never grows, so there it refuses at once.

    ``num_gpus``: what ``num_gpus: -1`` resolves to (default: from the cluster).
    """
    demand = stage_demand(cfg, auto_gpus() if num_gpus is None else num_gpus)
    joined = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    wait = cfg.ray.wait_for_resources_s if joined else 0.0
    t0 = time.monotonic()
    warned = False
    while True:
        total, largest = _cluster_resources()
        problem = capacity_problem(demand, total, largest)
        if not problem:
            _warn_if_busy(demand, largest, cfg)
            return
        waited = time.monotonic() - t0
        if wait >= 0 and waited >= wait:
            if joined:
                hint = (
                    "lower ray.stages.<stage>.actors or num_cpus/num_gpus, add nodes, or set "
                    "ray.wait_for_resources_s to wait for an autoscaler"
                )
                if wait > 0:
                    hint = f"waited {waited:.0f} s; " + hint
            else:
                hint = "raise ray.num_cpus (0 = enough for the stages) or lower ray.stages.<stage>.actors or num_cpus"
            raise BuildRefused(f"the Ray cluster cannot hold this plan: {problem}; {hint}")
        if not warned:
            limit = "for ever" if wait < 0 else f"up to {wait:g} s"
            logger.warning("the Ray cluster cannot hold this plan yet (%s): waiting %s for it to grow", problem, limit)
            warned = True
        time.sleep(min(2.0, max(0.1, wait - waited)) if wait > 0 else 2.0)


def hub_environment(cfg: GritConfig) -> dict[str, str]:
    """``{"HF_HUB_OFFLINE": "1"}`` when the detector names a hub model and the hub cannot be reached, else ``{}``.

    Offline, the hub client would retry for half a minute before giving up; in offline mode it answers at once from
    the local cache (a model downloaded earlier still loads) or fails with the loader's message.
    """
    model = cfg.detector.model
    if cfg.detector.kind != "grounding_dino" or os.path.isdir(model) or os.environ.get("HF_HUB_OFFLINE"):
        return {}
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return {"HF_HUB_OFFLINE": "1"}
    return {}


def _preflight(cfg: GritConfig, detector_factory: Callable[[GritConfig], Any] | None) -> dict[str, Any]:
    """Runs as a Ray task: load spaCy and build the detector once, so a missing model fails before any input."""
    from grit_pipeline.stages import default_detector_factory
    from grit_pipeline.text import load_spacy

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env = hub_environment(cfg)
    os.environ.update(env)
    nlp = load_spacy(cfg.text.spacy_model)
    detector = (detector_factory or default_detector_factory)(cfg)
    detector.setup()  # loads the weights: where they cannot be had, this raises with the loader's message
    return {
        "spacy_model": {
            "name": cfg.text.spacy_model,
            "pipeline": f"{nlp.meta.get('lang')}_{nlp.meta.get('name')}",
            "version": nlp.meta.get("version"),
        },
        "detector": {
            "kind": cfg.detector.kind,
            "model": getattr(detector, "model_id", cfg.detector.model),
            "random_weights": bool(getattr(detector, "random_weights", False)),
            "notes": list(getattr(detector, "notes", [])),
        },
        "env": env,
    }


def preflight(cfg: GritConfig, detector_factory: Callable[[GritConfig], Any] | None) -> dict[str, Any]:
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(_preflight)
    try:
        return ray.get(task.remote(cfg, detector_factory))
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        message = str(cause) if cause is not None else str(exc).strip().splitlines()[-1]
        raise BuildRefused(message) from None


def actor_start_timeout(cfg: GritConfig) -> int:
    """Seconds Ray Data waits for each pool's actors to be placed and set up before failing; -1 = no limit."""
    limits = (cfg.ray.actor_start_timeout_s, cfg.ray.wait_for_resources_s)
    if any(v < 0 for v in limits):
        return -1
    return max(1, math.ceil(max(limits)))


def build_dataset(
    cfg: GritConfig,
    units: list[dict[str, Any]],
    detector_factory: Callable[[GritConfig], Any] | None = None,
    num_gpus: float | None = None,
    env: dict[str, str] | None = None,
):
    """The Ray Data plan: the input units through every stage of ``grit_pipeline.stages.STAGES``, in order.

    Each stage's pool size, CPUs, GPUs and batch size come from ``ray.stages.<name>`` over its declared defaults;
    ``num_gpus`` is what ``num_gpus: -1`` stands for (default: one where the cluster has GPUs). A pool whose actors
    cannot all start within ``ray.actor_start_timeout_s`` fails the job instead of waiting for ever.
    """
    import ray

    from grit_pipeline.stages import STAGES, BuildContext
    from grit_pipeline.stages.ray_adapter import add_stage

    ray.data.DataContext.get_current().wait_for_min_actors_s = actor_start_timeout(cfg)
    context = BuildContext(
        detector_factory=detector_factory, env=dict(env or {}), auto_gpus=auto_gpus() if num_gpus is None else num_gpus
    )
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    for i, stage in enumerate(STAGES):
        later = {reason for s in STAGES[i + 1 :] for reason in s.reconsiders}
        ds = add_stage(
            ds, stage, cfg, context, max_tasks=len(units), final=i == len(STAGES) - 1, keep_image_for=tuple(later)
        )
    return ds


# ---------------------------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------------------------


def validate_settings(cfg: GritConfig) -> None:
    """Settings that are well-typed but unusable, refused before anything starts."""
    problems = []
    if cfg.output.samples_per_shard < 1:
        problems.append("output.samples_per_shard must be at least 1")
    if cfg.output.id_type not in ("auto", "int64", "string"):
        problems.append(f"output.id_type must be auto, int64 or string, got {cfg.output.id_type!r}")
    if cfg.detector.kind not in ("grounding_dino", "annotations"):
        problems.append(f"detector.kind must be grounding_dino or annotations, got {cfg.detector.kind!r}")
    from grit_pipeline.stages import STAGE_NAMES, STAGES

    unknown = sorted(set(cfg.ray.stages) - set(STAGE_NAMES))
    if unknown:
        problems.append(f"ray.stages.{unknown[0]}: no such stage (stages: {', '.join(STAGE_NAMES)})")
    for stage in STAGES:
        res = stage.resources_for(cfg)
        if res.actors < 1 or res.batch_size < 1 or res.num_cpus < 0 or not (res.num_gpus >= 0 or res.num_gpus == -1):
            problems.append(
                f"ray.stages.{stage.name}: actors and batch_size must be >= 1, num_cpus >= 0, num_gpus >= 0 or -1"
            )
    if not cfg.output.path:
        problems.append("output.path is empty: pass --output DIR")
    if problems:
        raise BuildRefused("; ".join(problems))


def _check_output_folder(out_dir: Path, has_manifest: bool) -> None:
    if has_manifest or not out_dir.exists():
        return
    if any(out_dir.glob("*.tar")) or any(out_dir.glob(f"*{STATS_SUFFIX}")):
        raise BuildRefused(f"{out_dir} holds shards but no manifest.json: not a grit output; use a new folder")


def _units(files: list[InputFile], next_file: int, next_block: int, n: int) -> list[dict[str, Any]]:
    units = []
    for inp in files[next_file:]:
        skip = next_block * n if inp.index == next_file else 0
        units.append({"index": inp.index, "path": inp.path, "format": inp.format, "skip": skip})
    return units


def run_build(
    cfg: GritConfig,
    detector_factory: Callable[[GritConfig], Any] | None = None,
    stream: TextIO | None = None,
) -> BuildOutcome:
    """Build (or continue) the corpus described by ``cfg``. Never raises for expected failures: the outcome's
    ``exit_code`` and ``message`` say what happened.

    ``detector_factory(cfg) -> Detector`` replaces ``grounding.make_detector`` (a plug-in point; it must be
    picklable, as it is sent to the grounding actors).
    """
    stream = stream or sys.stderr
    t_start = time.monotonic()
    out_dir = Path(cfg.output.path)
    owns_ray = False
    writer = None
    manifest: dict[str, Any] | None = None
    try:
        validate_settings(cfg)
        files = resolve_inputs(cfg.input.paths, cfg.input.format)
        paths = [f.path for f in files]
        old = read_manifest(out_dir)
        _check_output_folder(out_dir, old is not None)
        check_layout(old, layout(cfg, paths), out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        n = cfg.output.samples_per_shard
        state = scan_output(out_dir, n)
        removed = clean_output(out_dir, state)
        if removed:
            logger.info("removed leftovers of an interrupted run: %s", ", ".join(removed))

        try:
            owns_ray = start_ray(cfg)
        except Exception as exc:  # noqa: BLE001 - Ray's own errors: connection refused, bad address, ...
            raise BuildRefused(f"cannot start or join Ray: {type(exc).__name__}: {exc}") from exc
        configure_ray_data()
        info = preflight(cfg, detector_factory)
        settings = result_settings(cfg, info["detector"], info["spacy_model"])
        changed = check_results(old, settings, cfg.output.overwrite_config, out_dir)
        manifest = new_manifest(cfg, paths, info["detector"], info["spacy_model"], old, changed)
        random_weights = info["detector"]["random_weights"]
        if random_weights:
            print(f"WARNING: {manifest['warnings'][0]}", file=stream, flush=True)
        write_manifest(out_dir, manifest)
        dump_config(cfg, out_dir / CONFIG_COPY)

        num_gpus = grounding_gpus(cfg)
        check_capacity(cfg, num_gpus)
        id_type = manifest["id_type"] or cfg.output.id_type
        writer = ShardWriter(out_dir, n, paths, state, id_type=id_type)
        units = _units(files, state.next_file, state.next_block, n)
        resumed = merge_stats(state.shards)[0]
        progress = Progress(cfg.output.progress_interval_s, len(state.shards), resumed.get("input", 0), stream)
        print(
            f"grit build: {len(files)} input file(s), {len(units)} to read, {len(state.shards)} shard(s) already "
            f"complete; detector {info['detector']['model']} ({num_gpus:g} GPU per actor), "
            f"spaCy {info['spacy_model']['pipeline']} {info['spacy_model']['version']} -> {out_dir}",
            file=stream,
            flush=True,
        )
        if units:
            ds = build_dataset(cfg, units, detector_factory, num_gpus, info.get("env"))
            progress.start()
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                    rows = batch.to_pylist()
                    for stats in writer.add_rows(rows):
                        progress.shard_done(stats)
                        manifest["id_type"] = writer.id_type
                    progress.rows_seen(sum(1 for r in rows if r["kind"] == "sample"), len(writer.buffers))
            finally:
                progress.stop()
        all_stats = state.shards + writer.written
        counts, seconds = merge_stats(all_stats)
        if not writer.complete:
            missing = writer.pending()
            raise ShardWriteError(
                f"the pipeline ended with input not written (open blocks: {missing or 'none'}; next shard from "
                f"input file {writer.cursor[0]}, block {writer.cursor[1]}); run the same command again to resume"
            )
        manifest.update(status="complete", id_type=writer.id_type, shards=len(all_stats), totals=dict(counts))
        write_manifest(out_dir, manifest)
        writer.close()
        wall = time.monotonic() - t_start
        print(summary_table(counts, seconds, wall, len(all_stats), "complete", manifest["warnings"]), file=stream)
        return BuildOutcome(
            EXIT_OK, "complete", "", len(all_stats), dict(counts), seconds, wall, random_weights=random_weights
        )
    except (BuildRefused, ManifestMismatch, InputError) as exc:
        print(f"error: {exc}", file=stream, flush=True)
        return BuildOutcome(EXIT_REFUSED, "refused", str(exc), wall_s=time.monotonic() - t_start)
    except KeyboardInterrupt:
        message = "interrupted; complete shards are kept: run the same command again to resume"
        return _failed(out_dir, manifest, writer, message, t_start, stream, code=130)
    except ShardWriteError as exc:
        return _failed(out_dir, manifest, writer, str(exc), t_start, stream)
    except Exception as exc:  # noqa: BLE001 - any failure of the Ray job: report it, keep complete shards
        text = str(exc).strip().splitlines()
        message = f"the build failed: {type(exc).__name__}: {text[-1] if text else ''}"
        logger.debug("build failed", exc_info=True)
        return _failed(out_dir, manifest, writer, message + "; run the same command again to resume", t_start, stream)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


def _failed(out_dir, manifest, writer, message, t_start, stream, code: int = EXIT_FAILED) -> BuildOutcome:
    shards = 0
    if writer is not None:
        writer.abort()
        shards = writer.next_number
    print(f"error: {message}", file=stream, flush=True)
    if manifest is not None:
        manifest["status"] = "incomplete"
        # The same cause (disk full, permissions) may stop this write too; the shards are what count.
        with contextlib.suppress(OSError):
            write_manifest(out_dir, manifest)
    return BuildOutcome(code, "failed", message, shards=shards, wall_s=time.monotonic() - t_start)
