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
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from grit_pipeline.config import GritConfig, StageResources, dump_config
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
    """Logical CPUs the actor pools reserve for the whole run, plus one read task."""
    pools = (cfg.text.resources, cfg.image.resources, cfg.detector.resources)
    return sum(r.actors * r.num_cpus for r in pools) + cfg.input.resources.num_cpus


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


def grounding_gpus(cfg: GritConfig) -> float:
    """GPUs per grounding actor: as configured, or (``-1``) one where the cluster has GPUs, none where it has none."""
    requested = cfg.detector.resources.num_gpus
    if requested >= 0:
        return requested
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def check_capacity(cfg: GritConfig, num_gpus: float) -> None:
    """Refuse a plan the cluster can never schedule (Ray would wait forever for actors)."""
    import ray

    have = ray.cluster_resources()
    need_cpu = stage_cpus(cfg)
    need_gpu = cfg.detector.resources.actors * num_gpus
    if need_gpu > have.get("GPU", 0):
        raise BuildRefused(
            f"the grounding stage needs {need_gpu:g} GPU(s) ({cfg.detector.resources.actors} actor(s) x {num_gpus:g}) "
            f"but the Ray cluster has {have.get('GPU', 0):g}: lower detector.resources.actors or num_gpus"
        )
    if need_cpu > have.get("CPU", 0) and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        raise BuildRefused(
            f"the stages reserve {need_cpu:g} CPUs but ray.num_cpus={have.get('CPU', 0):g}: raise ray.num_cpus "
            "(0 = enough for the stages) or lower the stages' actors/num_cpus"
        )
    if need_cpu > have.get("CPU", 0):
        logger.warning("the stages reserve %g CPUs, the cluster has %g: waiting for the autoscaler", need_cpu, have)


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


def build_dataset(
    cfg: GritConfig, units: list[dict[str, Any]], detector_factory, num_gpus: float, env: dict[str, str] | None = None
):
    """The Ray Data plan; each stage's pool size, CPUs, GPUs and batch size come from the config."""
    import ray

    from grit_pipeline.stages import GroundingActor, ImageActor, TextActor, read_stage

    def actors(res: StageResources) -> ray.data.ActorPoolStrategy:
        return ray.data.ActorPoolStrategy(size=max(1, res.actors))

    read, text, image, det = (cfg.input.resources, cfg.text.resources, cfg.image.resources, cfg.detector.resources)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(
        read_stage,
        fn_kwargs={"cfg": cfg},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=read.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(read.actors, len(units)))),
    )

    def actor_stage(ds, actor_cls, res: StageResources, kwargs: dict[str, Any], **resources):
        return ds.map_batches(
            actor_cls,
            fn_constructor_kwargs=kwargs,
            batch_size=res.batch_size,
            batch_format="pyarrow",
            num_cpus=res.num_cpus,
            compute=actors(res),
            **resources,
        )

    ds = actor_stage(ds, TextActor, text, {"cfg": cfg})
    ds = actor_stage(ds, ImageActor, image, {"cfg": cfg})
    grounding_kwargs = {"cfg": cfg, "detector_factory": detector_factory, "env": env or {}}
    return actor_stage(ds, GroundingActor, det, grounding_kwargs, num_gpus=num_gpus)


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
    for name, res in (
        ("input", cfg.input.resources),
        ("text", cfg.text.resources),
        ("image", cfg.image.resources),
        ("detector", cfg.detector.resources),
    ):
        if res.actors < 1 or res.batch_size < 1 or res.num_cpus < 0:
            problems.append(f"{name}.resources: actors and batch_size must be >= 1 and num_cpus >= 0")
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
