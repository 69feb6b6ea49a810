"""The Ray side of ``grit build``: joining a cluster or starting an embedded local Ray, what each stage asks for
(``stage_demand``, read from ``grit_pipeline.stages.STAGES`` plus the writing task), and the capacity check that
refuses, or waits for, a cluster that cannot hold the plan."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from grit_pipeline.config import GritConfig
from grit_pipeline.outcome import BuildRefused

logger = logging.getLogger(__name__)

# How long an idle task worker of the embedded local Ray stays alive. Ray's default (1 s, once the node has more
# workers than CPUs, which the actor pools alone make it have) kills the read, write and assembly tasks' workers
# between their bursts, and every next burst starts new ones: about a CPU-second and a second or two of wall time
# each, on the build's critical path at its end. The local Ray lives only for the build, and the idle workers are
# bounded by the tasks that can run at once, so they are kept.
IDLE_WORKER_KEEP_MS = 10 * 60 * 1000


def stage_cpus(cfg: GritConfig) -> float:
    """Logical CPUs the plan reserves for the whole run: every actor pool, one read task and one writing task."""
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
    # The sink: at least one writing task (fragments or a shard's assembly) must find CPUs the pools do not hold.
    out.append(StageDemand("write", 1, cfg.output.write_resources().num_cpus, 0.0, "task"))
    return out


def assembly_slots(cfg: GritConfig, cluster_cpus: float) -> int:
    """How many shards may be assembled at once: the writing tasks that fit in the CPUs the actor pools leave free
    (at least 2). More only queue in Ray, which starts a new worker process for each queued task (about a CPU-second
    each) although the running ones free up in a fraction of that."""
    write_cpus = cfg.output.write_resources().num_cpus
    if write_cpus <= 0:
        return 1 << 30  # tasks that reserve no CPU: Ray does not bound them, nor does this
    held = sum(d.cpus for d in stage_demand(cfg) if d.kind == "actor")
    return max(2, int(max(0.0, cluster_cpus - held) / write_cpus + 1e-9))


_STARTED_LOCAL: dict[str, str] = {}  # {"gcs": address} of the local instance start_ray started, while it runs


def private_local_ray() -> bool:
    """True while the Ray session is the local instance :func:`start_ray` started: sized for this plan, and no other
    job knows of it."""
    import ray

    if not ray.is_initialized() or "gcs" not in _STARTED_LOCAL:
        return False
    return ray.get_runtime_context().gcs_address == _STARTED_LOCAL["gcs"]


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
            _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
            **common,
        )
        _STARTED_LOCAL["gcs"] = ray.get_runtime_context().gcs_address
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


def actor_start_timeout(cfg: GritConfig) -> int:
    """Seconds Ray Data waits for each pool's actors to be placed and set up before failing; -1 = no limit.

    On a cluster Ray Data waits for each pool in turn, so the pools start one after the other. On the private local
    instance (:func:`private_local_ray`), sized for the plan, every actor has its CPUs: there the pools start
    together (-1), which saves the sum of all but the slowest pool's start-up."""
    if private_local_ray():
        return -1
    limits = (cfg.ray.actor_start_timeout_s, cfg.ray.wait_for_resources_s)
    if any(v < 0 for v in limits):
        return -1
    return max(1, math.ceil(max(limits)))
