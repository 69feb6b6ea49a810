"""The Ray Data plan of ``grit build``: settings refused before anything starts, the preflight that loads the
models once (a task of its own on a cluster; on the embedded local Ray the stages' actors, through a
:class:`StartGate`), the opening of the output once the preflight has passed, the input units through every stage of
``grit_pipeline.stages.STAGES``, and the workers' fragment writing appended to it (which waits for that opening)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from grit_pipeline.cluster import actor_start_timeout, auto_gpus, hub_environment
from grit_pipeline.config import GritConfig
from grit_pipeline.manifest import check_results, new_manifest, result_settings, write_manifest
from grit_pipeline.outcome import BuildRefused
from grit_pipeline.output_store import OutputStore
from grit_pipeline.writer import run_dir, write_fragments


def _loading_stages():
    """The stages whose setup loads a model the manifest records (spaCy, the detector)."""
    from grit_pipeline.stages import STAGES

    return [stage for stage in STAGES if stage.loads]


def _preflight(
    cfg: GritConfig, detector_factory: Callable[[GritConfig], Any] | None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Runs as a Ray task: set up each stage that loads a model once (spaCy, the detector), so a missing model
    fails before any input; what they loaded, as the manifest records it."""
    from grit_pipeline.stages import BuildContext

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env = hub_environment(cfg) if env is None else env
    os.environ.update(env)
    context = BuildContext(detector_factory=detector_factory, env=env)
    info: dict[str, Any] = {}
    for stage_cls in _loading_stages():
        stage = stage_cls(cfg, context)
        stage.setup()  # where a model cannot be had, this raises with the loader's message
        info.update(stage.loaded())
    return {**info, "env": env}


class StartAbandoned(RuntimeError):
    """What :meth:`StartGate.open` raises once the driver said the stages stopped before every model was reported:
    the build did not start, and nothing was written."""


class StartGate:
    """The preflight of the embedded local Ray, done by the stages' own actors (a Ray actor, one per build).

    Each actor of a stage that loads a model reports what its setup loaded, or the loader's error, before it
    serves (:meth:`report`); :meth:`open` waits until every such model is reported, then opens the output as the
    opening task does (:func:`_open_output`). A model that cannot be loaded refuses the build with the loader's
    message and nothing written, as the preflight task does, without loading each model once more in a task of its
    own. The first report of each model counts (a restarted actor reports again); an error counts only while a
    model is still unreported. :meth:`abandon` (the driver's, when the job failed or it must stop first) makes a
    waiting :meth:`open` raise :class:`StartAbandoned` instead.
    """

    def __init__(self, needs: tuple[str, ...]):
        import asyncio

        self.needs = needs
        self.loaded: dict[str, Any] = {}
        self.error: str | None = None
        self.abandoned = False
        self.changed = asyncio.Event()

    def _ready(self) -> bool:
        return all(k in self.loaded for k in self.needs)

    def report(self, loaded: dict[str, Any], error: str | None = None) -> None:
        if error is not None and self.error is None and not self._ready():
            self.error = error
        for key, value in loaded.items():
            self.loaded.setdefault(key, value)
        self.changed.set()

    def abandon(self) -> None:
        self.abandoned = True
        self.changed.set()

    async def open(
        self, store: OutputStore, cfg: GritConfig, inputs: list[str], old: dict[str, Any] | None, run: str, env
    ) -> dict[str, Any]:
        while True:
            if self.error is not None:
                raise BuildRefused(self.error)
            if self._ready():
                break
            if self.abandoned:
                raise StartAbandoned("the stages stopped before their models were loaded")
            self.changed.clear()
            await self.changed.wait()
        info = {**{k: self.loaded[k] for k in self.needs}, "env": env}
        return _open_output(info, store, cfg, inputs, old, run)


def start_gate(store: OutputStore, cfg: GritConfig, inputs: list[str], old, run: str, env: dict[str, str]):
    """A :class:`StartGate` and its opening of the output under way: (the actor, the opening's ObjectRef)."""
    import ray

    needs = tuple(key for stage in _loading_stages() for key in stage.loads)
    gate = ray.remote(num_cpus=0, max_restarts=0)(StartGate).remote(needs)
    return gate, gate.open.remote(store, cfg, inputs, old, run, env)


def refusal(exc: Exception) -> str:
    """The message of a failed preflight or opening task: the task's own error, not Ray's wrapping of it."""
    cause = getattr(exc, "cause", None)
    return str(cause) if cause is not None else str(exc).strip().splitlines()[-1]


def preflight(cfg: GritConfig, detector_factory: Callable[[GritConfig], Any] | None) -> dict[str, Any]:
    """The preflight, waited for: its result, or :class:`BuildRefused` with the loader's message."""
    import ray

    try:
        return ray.get(start_preflight(cfg, detector_factory, None))
    except ray.exceptions.RayTaskError as exc:
        raise BuildRefused(refusal(exc)) from None


def start_preflight(cfg: GritConfig, detector_factory: Callable[[GritConfig], Any] | None, env: dict[str, str] | None):
    """The preflight as a running task (its ObjectRef), so the stages' actors can start beside it."""
    import ray

    return ray.remote(num_cpus=0, max_retries=0)(_preflight).remote(cfg, detector_factory, env)


def worker_environment(cfg: GritConfig) -> dict[str, str]:
    """What :func:`grit_pipeline.cluster.hub_environment` says on a worker (the workers load the models, and their
    network is what counts), asked before any actor starts."""
    import ray

    return ray.get(ray.remote(num_cpus=0, max_retries=0)(hub_environment).remote(cfg))


def _open_output(
    info: dict[str, Any], store: OutputStore, cfg: GritConfig, inputs: list[str], old: dict[str, Any] | None, run: str
) -> dict[str, Any]:
    """Runs as a Ray task once the preflight has passed (``info`` is its result): refuse settings that differ from
    the output's (:class:`ManifestMismatch`), else write the manifest (``running``) and make the run's folder. Until
    this returns nothing has touched the output; the write tasks wait for it (``attach_writer``'s ``start_after``).
    """
    settings = result_settings(cfg, info["detector"], info["spacy_model"])
    changed = check_results(old, settings, cfg.output.overwrite_config, store.url)
    manifest = new_manifest(cfg, inputs, info["detector"], info["spacy_model"], old, changed)
    write_manifest(store, manifest)
    store.make_dir(run_dir(run))  # the workers write in it, never create it (OutputStore.write_bytes)
    return {"info": info, "manifest": manifest}


def start_opening(preflight_ref, store: OutputStore, cfg: GritConfig, inputs: list[str], old, run: str):
    """:func:`_open_output` as a task that runs when the preflight task has returned (its ObjectRef)."""
    import ray

    return ray.remote(num_cpus=0, max_retries=0)(_open_output).remote(preflight_ref, store, cfg, inputs, old, run)


def build_dataset(
    cfg: GritConfig,
    units: list[dict[str, Any]],
    detector_factory: Callable[[GritConfig], Any] | None = None,
    num_gpus: float | None = None,
    env: dict[str, str] | None = None,
    gate=None,
):
    """The Ray Data plan: the input units through every stage of ``grit_pipeline.stages.STAGES``, in order.

    Each stage's pool size, CPUs, GPUs and batch size come from ``ray.stages.<name>`` over its declared defaults;
    ``num_gpus`` is what ``num_gpus: -1`` stands for (default: one where the cluster has GPUs). A pool whose actors
    cannot all start within ``ray.actor_start_timeout_s`` fails the job instead of waiting for ever. ``gate``: the
    build's :class:`StartGate`, which the actors of the stages that load a model report to.
    """
    import ray

    from grit_pipeline.stages import STAGES, BuildContext
    from grit_pipeline.stages.ray_adapter import add_stage

    ray.data.DataContext.get_current().wait_for_min_actors_s = actor_start_timeout(cfg)
    context = BuildContext(
        detector_factory=detector_factory,
        env=dict(env or {}),
        auto_gpus=auto_gpus() if num_gpus is None else num_gpus,
        gate=gate,
    )
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    cuts = block_cuts([s.resources_for(cfg) for s in STAGES] + [cfg.output.write_resources()])
    for i, stage in enumerate(STAGES):
        later = {reason for s in STAGES[i + 1 :] for reason in s.reconsiders}
        ds = add_stage(
            ds, stage, cfg, context, max_tasks=len(units), block_rows=cuts[i], final=i == len(STAGES) - 1,
            keep_image_for=tuple(later),
        )  # fmt: skip
    return ds


def block_cuts(steps: list) -> list[int]:
    """Rows per block to cut each step's output to (0: no cut), from the steps' resources (the stages, then the
    writer). A step's blocks hold at least its batch size (Ray Data bundles smaller ones up to it) and at most what
    it was given. A block goes whole to one worker of the next step, so blocks larger than that step's batch are cut
    to it where the step has several workers, so that each gets work. No other cut: each is a task of its own per
    block (Ray Data fuses none after an actor pool), and the next step bundles small blocks up to its batch itself.
    """
    cuts, rows = [], 0
    for step, after in zip(steps, steps[1:]):
        rows = max(rows, step.batch_size)
        cut = after.batch_size if after.actors > 1 and rows > after.batch_size else 0
        rows = cut or rows
        cuts.append(cut)
    return cuts


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


class NotStarted(RuntimeError):
    """What a write task raises when the task it waits for (the opening of the output) failed: the build did not
    start, and nothing was written."""


_STARTED: set[str] = set()  # the opening tasks this worker process has seen return (a process runs many write tasks)


def _write_once_started(batch, start_after=None, **kwargs):
    """:func:`~grit_pipeline.writer.write_fragments`, once the task ``start_after`` (an ObjectRef) has returned.
    Its result (the manifest among it) is fetched once per worker process, not once per batch."""
    if start_after is not None and start_after.hex() not in _STARTED:
        import ray

        try:
            ray.get(start_after)
        except ray.exceptions.RayError as exc:
            raise NotStarted(f"not started: {type(exc).__name__}") from None
        _STARTED.add(start_after.hex())
    return write_fragments(batch, **kwargs)


def attach_writer(ds, store: OutputStore, run: str, cfg: GritConfig, skip_blocks: frozenset, start_after=None):
    """Append the workers' fragment writing to the plan: rows in, one small metadata row per fragment out.

    ``start_after`` (the opening task's ObjectRef): the write tasks wait for it and fail if it failed, so no worker
    writes before the output is opened, while the stages before them read and work meanwhile.
    """
    import ray

    res = cfg.output.write_resources()
    extra = {"resources": dict(cfg.output.ray_resources)} if cfg.output.ray_resources else {}
    return ds.map_batches(
        _write_once_started,
        fn_kwargs={"store": store, "run": run, "samples_per_shard": cfg.output.samples_per_shard,
                   "skip_blocks": skip_blocks, "start_after": start_after},
        batch_size=res.batch_size,
        batch_format="pyarrow",
        num_cpus=res.num_cpus,
        compute=ray.data.TaskPoolStrategy(size=max(1, res.actors)),
        **extra,
    )  # fmt: skip
