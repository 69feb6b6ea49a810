"""The ``grit build`` job: input -> Ray Data stages -> shards written by the workers; the driver plans and watches.

::

    from_items(input files) -> read (tasks) -> text (actors, spaCy) -> image (actors: checks, decode, preprocess)
        -> grounding (actors, GPU where there is one) -> fragments (tasks, writer.write_fragments)
    driver: iter_batches of fragment metadata -> ShardTracker -> assemble_shard tasks (tar, parquet, _stats.json)

Ray: ``ray.address`` or ``RAY_ADDRESS`` joins a cluster (``ray job submit`` sets it); otherwise an embedded local
Ray is started, sized to hold every stage's actors (dashboard off) and shut down at the end. If Ray is already
initialised in this process (tests, notebooks), that session is used and left running.

On a cluster, before any input is read, one Ray task loads the spaCy pipeline and builds the detector, so a missing
model stops the build at once with the loader's message; once it has returned, a second task compares the settings
with the output's manifest (refusing other ones), writes the manifest and makes the run's folder. On the embedded
local Ray the stages' actors load the models instead and report them to a ``plan.StartGate``, which opens the output
once both are in; the stages read and work meanwhile. The write tasks wait for the opening either way. The output
is any fsspec location (``output_store.OutputStore``); the workers write to it directly, the driver only writes the
manifest and holds the output's lease (``output_lock.OutputLease``). A build that does not start leaves the output
as it found it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from grit_pipeline.assembly_tasks import AssemblyTasks
from grit_pipeline.cluster import (
    StageDemand,
    actor_start_timeout,
    auto_gpus,
    capacity_problem,
    check_capacity,
    configure_ray_data,
    grounding_gpus,
    hub_environment,
    stage_cpus,
    stage_demand,
    start_ray,
)
from grit_pipeline.config import GritConfig, dump_config
from grit_pipeline.manifest import CONFIG_COPY, ManifestMismatch, check_layout, layout, read_manifest, write_manifest
from grit_pipeline.outcome import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, BuildOutcome, BuildRefused
from grit_pipeline.output_lock import LOCK_NAME, LeaseLost, OutputLease, OutputLocked
from grit_pipeline.output_store import TMP_ROOT, OutputStore
from grit_pipeline.plan import (
    StartAbandoned,
    attach_writer,
    build_dataset,
    preflight,
    refusal,
    start_gate,
    start_opening,
    start_preflight,
    validate_settings,
    worker_environment,
)
from grit_pipeline.progress import Progress, merge_stats, summary_table
from grit_pipeline.readers import InputError, InputFile, resolve_inputs
from grit_pipeline.shard_tracker import ShardTracker
from grit_pipeline.stop_signals import BuildInterrupted, catch_signals, check_stop, signals_interrupt, stopped_by
from grit_pipeline.writer import (
    ShardWriteError,
    run_dir,
    scan_complete,
    stale_runs,
)

# The driver lives here; the plan and the cluster checks have modules of their own, and their names are kept
# importable from here.
__all__ = [
    "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_REFUSED", "BuildInterrupted", "BuildOutcome", "BuildRefused",
    "StageDemand", "actor_start_timeout", "attach_writer", "auto_gpus", "build_dataset", "capacity_problem",
    "check_capacity", "configure_ray_data", "grounding_gpus", "hub_environment", "preflight", "run_build",
    "stage_cpus", "stage_demand", "start_ray", "validate_settings",
]  # fmt: skip

logger = logging.getLogger(__name__)


OWN_NAMES = (LOCK_NAME, TMP_ROOT)  # what a build may leave in an output before its manifest exists


def _check_output_folder(store: OutputStore, has_manifest: bool) -> None:
    """Refuse a non-empty output that is not a grit output: its files are someone else's."""
    if has_manifest:
        return
    others = [name for name in store.listdir() if name not in OWN_NAMES]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise BuildRefused(
            f"{store.url} is not empty ({shown}) and holds no grit manifest.json: not a grit output; "
            "use a new or empty output"
        )


def _units(files: list[InputFile], tracker: ShardTracker) -> tuple[list[dict[str, Any]], frozenset]:
    """Read units for the files not wholly complete. Each skips its leading complete shards (``skip`` samples) and
    any complete shard after a gap (``skip_blocks``): the reader goes past their samples without reading them or
    sending them on. Those ``(file, block)`` also go to the writer, which never rewrites a complete shard."""
    n = tracker.n
    units, skip_blocks = [], set()
    for inp in files:
        if tracker.file_complete(inp.index):
            continue
        lead = 0
        while (inp.index, lead) in tracker.complete:
            lead += 1
        later = sorted(b for f, b in tracker.complete if f == inp.index and b > lead)
        unit = {"index": inp.index, "path": inp.path, "format": inp.format, "skip": lead * n, "skip_blocks": later}
        units.append(unit)
        skip_blocks.update((inp.index, b) for b in later)
    return units, frozenset(skip_blocks)


def _known_sizes(files: list[InputFile], known: dict[int, int]) -> dict[int, int]:
    """Samples per input file where that is cheap to know: recorded earlier, or a parquet file's metadata."""
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    sizes = dict(known)
    for inp in files:
        if inp.index in sizes or inp.format != "parquet":
            continue
        try:
            fs, path = url_to_fs(inp.path)
            with fs.open(path, "rb") as f:
                sizes[inp.index] = pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - unreadable here: the reader reports it; the size stays unknown
            continue
    return sizes


def _say(stream: TextIO, text: str) -> None:
    print(f"grit build: {text}", file=stream, flush=True)


@dataclass
class _Run:
    """What the clean-up of a build needs to know, whatever point it reached."""

    store: OutputStore | None = None
    lease: OutputLease | None = None
    existed: bool = True
    manifest: dict[str, Any] | None = None
    run_id: str = ""
    started: bool = False  # the manifest was written: from here on the output is this build's
    tracker: ShardTracker | None = None
    assembler: AssemblyTasks | None = None
    complete_stats: list[dict[str, Any]] = field(default_factory=list)
    preflight: Any = None  # ObjectRef of the preflight task (a cluster, or nothing to read)
    gate: Any = None  # the StartGate actor (the embedded local Ray): the stages' actors are the preflight
    opening: Any = None  # ObjectRef of the opening of the output, once the preflight has passed
    settled: bool = False  # _settle_start ran


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
    owns_ray = False
    st = _Run()
    # Ray Data's note that a small input cannot use every fragment task: true, and not the user's concern.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    try:
        with signals_interrupt():
            try:
                validate_settings(cfg)
                files = resolve_inputs(cfg.input.paths, cfg.input.format)
                paths = [f.path for f in files]
                try:
                    st.store = store = OutputStore(cfg.output.path)
                except (ValueError, ImportError) as exc:
                    raise BuildRefused(f"cannot open the output {cfg.output.path!r}: {exc}") from None
                old = read_manifest(store)
                _check_output_folder(store, old is not None)
                check_layout(old, layout(cfg, paths), store.url)
                st.existed = store.exists()
                lease = OutputLease(store, cfg.output.lock_ttl_s)
                lease.acquire()
                st.lease = lease
                if lease.took_over:
                    holder = lease.took_over.get("holder")
                    _say(stream, f"took over the lease of a build that is gone ({holder})")

                _say(stream, "starting Ray" if not cfg.ray.address else f"joining Ray at {cfg.ray.address}")
                try:
                    owns_ray = start_ray(cfg)
                except Exception as exc:  # noqa: BLE001 - Ray's own errors: connection refused, bad address, ...
                    raise BuildRefused(f"cannot start or join Ray: {type(exc).__name__}: {exc}") from exc
                configure_ray_data()
                catch_signals()
                num_gpus = grounding_gpus(cfg)
                check_capacity(cfg, num_gpus)
                check_stop()
                env = worker_environment(cfg)
                # From here until the opening returns, it may touch the output: the driver waits for it on every
                # way out (_settle_start) before it answers.
                st.run_id = uuid.uuid4().hex
                embedded = actor_start_timeout(cfg) < 0
                if not embedded:
                    _say(stream, "loading the spaCy pipeline and the detector (preflight)")
                    st.preflight = start_preflight(cfg, detector_factory, env)
                    st.opening = start_opening(st.preflight, store, cfg, paths, old, st.run_id)

                # Read-only until the output is opened: what is complete, and so what is left to read.
                n = cfg.output.samples_per_shard
                _say(stream, f"scanning {store.url} for complete shards")
                complete = scan_complete(store, n)
                st.complete_stats = [complete[k] for k in sorted(complete)]
                totals = {int(k): int(v) for k, v in ((old or {}).get("file_samples") or {}).items()}
                for (f, _), stats in complete.items():
                    if stats["input"].get("last_block") and isinstance(stats["input"].get("file_samples"), int):
                        totals[f] = stats["input"]["file_samples"]
                id_type = (old or {}).get("id_type") or (cfg.output.id_type if cfg.output.id_type != "auto" else None)
                st.tracker = tracker = ShardTracker(n, len(files), set(complete), totals, id_type)
                tracker.decide_id_type(complete)
                units, skip_blocks = _units(files, tracker)
                resumed = merge_stats(st.complete_stats)[0]
                sizes = _known_sizes(files, totals)
                total = sum(sizes.values()) if len(sizes) == len(files) else None
                progress = Progress(
                    cfg.output.progress_interval_s, len(complete), resumed.get("input", 0), stream, total_samples=total
                )
                # On the embedded local Ray the pools start together and asynchronously: the stages' actors load
                # spaCy and the detector and report to the gate, which opens the output once both are in (no
                # preflight task loads them once more); the stages read and work meanwhile, and the write tasks
                # wait for the opening. On a cluster Ray Data starts the pools one by one and blocks meanwhile, so
                # the preflight task and the opening (which may refuse) are waited for first.
                overlap = bool(units) and embedded
                if overlap:
                    _say(stream, "starting the stages' actors (they load the spaCy pipeline and the detector)")
                    st.gate, st.opening = start_gate(store, cfg, paths, old, st.run_id, env)
                elif embedded:  # nothing to read: no stage starts, so the preflight task checks the models
                    _say(stream, "loading the spaCy pipeline and the detector (preflight)")
                    st.preflight = start_preflight(cfg, detector_factory, env)
                    st.opening = start_opening(st.preflight, store, cfg, paths, old, st.run_id)
                if not overlap:
                    info = _await_start(st)
                batches: Any = iter(())
                if units:
                    st.assembler = assembler = AssemblyTasks(cfg, store, st.run_id, paths)
                    ds = build_dataset(cfg, units, detector_factory, num_gpus, env, gate=st.gate)
                    ds = attach_writer(ds, store, st.run_id, cfg, skip_blocks, start_after=st.opening)
                    if not overlap:
                        _say(stream, "starting the stages' actors")
                    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2))
                if overlap:
                    batches = _first_batch(st, batches)
                    info = _await_start(st)
            except (BuildRefused, ManifestMismatch, InputError, OutputLocked) as exc:
                _undo_start(st)
                print(f"error: {exc}", file=stream, flush=True)
                return BuildOutcome(EXIT_REFUSED, "refused", str(exc), wall_s=time.monotonic() - t_start)

            manifest = st.manifest
            store.write_bytes(CONFIG_COPY, dump_config(cfg).encode("utf-8"))
            for stale in stale_runs(store):
                if stale != run_dir(st.run_id):
                    store.delete_tree(stale)  # fragments of an earlier build of this output (we hold the lease)
            random_weights = info["detector"]["random_weights"]
            if random_weights:
                print(f"WARNING: {manifest['warnings'][0]}", file=stream, flush=True)
            _say(
                stream,
                f"{len(files)} input file(s), {len(units)} to read, {len(complete)} shard(s) already complete"
                + (f", {total:,} samples in all" if total is not None else "")
                + f"; detector {info['detector']['model']} ({num_gpus:g} GPU per actor), spaCy "
                f"{info['spacy_model']['pipeline']} {info['spacy_model']['version']} -> {store.url}",
            )
            written: list[dict[str, Any]] = []
            bad_inputs: list[str] = []
            if units:
                _say(stream, "reading the input")
                progress.start()

                def collect(timeout: float) -> None:
                    for key, result in assembler.finished(timeout):
                        if result["status"] == "complete":
                            tracker.done(key)
                            written.append(result["stats"])
                            progress.shard_done(result["stats"])
                        elif result["status"] == "bad_input":
                            tracker.fail(key, result["detail"])
                            bad_inputs.append(f"{result['file']} ({result['detail']})")
                        else:
                            tracker.retry(key)

                def launch() -> None:
                    id_was = tracker.id_type
                    if tracker.decide_id_type(complete) and id_was is None:
                        manifest["id_type"] = tracker.id_type
                        manifest["file_samples"] = {str(k): v for k, v in sorted(tracker.file_totals.items())}
                        write_manifest(store, manifest)
                    for shard in tracker.ready():
                        assembler.launch(shard, tracker.id_type)

                try:
                    for batch in batches:
                        before = tracker.samples_seen
                        for row in batch.to_pylist():
                            tracker.add(row)
                        if progress.total_samples is None and len(tracker.file_totals) == len(files):
                            progress.set_total(sum(tracker.file_totals.values()))
                        launch()
                        collect(0.0)
                        progress.rows_seen(tracker.samples_seen - before, len(tracker.open))
                        lease.check()
                        check_stop()
                    launch()
                    while assembler.pending:
                        collect(1.0)
                        launch()
                        lease.check()
                        check_stop()
                finally:
                    progress.stop()
            all_stats = st.complete_stats + written
            counts, seconds = merge_stats(all_stats)
            manifest["file_samples"] = {str(k): v for k, v in sorted(tracker.file_totals.items())}
            if bad_inputs or not tracker.whole:
                missing = tracker.missing()
                if bad_inputs:
                    message = (
                        f"input could not be read: {'; '.join(bad_inputs[:5])}. The shards holding the unreadable "
                        "part are not marked complete; fix or replace the file and run the same command again"
                    )
                else:
                    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                    message = (
                        f"the pipeline ended with input not written ({shown}); run the same command again to resume"
                    )
                return _failed(st, message, t_start, stream, len(all_stats))
            manifest.update(status="complete", id_type=tracker.id_type, shards=len(all_stats), totals=dict(counts))
            write_manifest(store, manifest)
            _finish(st)
            wall = time.monotonic() - t_start
            print(summary_table(counts, seconds, wall, len(all_stats), "complete", manifest["warnings"]), file=stream)
            return BuildOutcome(
                EXIT_OK, "complete", "", len(all_stats), dict(counts), seconds, wall, random_weights=random_weights
            )
    except BuildInterrupted as exc:
        return _stopped(st, exc.signum, t_start, stream, cfg.output.drain_timeout_s)
    except KeyboardInterrupt:
        message = "interrupted; complete shards are kept: run the same command again to resume"
        return _failed(st, message, t_start, stream, code=EXIT_INTERRUPTED[signal.SIGINT])
    except ShardWriteError as exc:
        return _failed(st, str(exc), t_start, stream)
    except LeaseLost as exc:
        return _failed(st, f"{exc}: this build stopped so that two builds never write at once", t_start, stream)
    except OSError as exc:
        where = getattr(exc, "filename", None) or cfg.output.path
        message = (
            f"writing to {where} failed: {exc.strerror or exc}; fix the cause and run the same command again to resume"
        )
        return _failed(st, message, t_start, stream)
    except Exception as exc:  # noqa: BLE001 - any failure of the Ray job: report it, keep complete shards
        if (signum := stopped_by()) is not None:  # a signal that surfaced inside a Ray call
            return _stopped(st, signum, t_start, stream, cfg.output.drain_timeout_s)
        message = f"the build failed: {_root_cause(exc)}"
        logger.debug("build failed", exc_info=True)
        return _failed(st, message + "; run the same command again to resume", t_start, stream)
    finally:
        if st.lease is not None:
            st.lease.release()
        if owns_ray:
            import ray

            ray.shutdown()
            if st.started and st.run_id and st.store is not None:
                with contextlib.suppress(OSError):  # again, now that no worker of this build runs (an object
                    st.store.delete_tree(run_dir(st.run_id))  # store's late writes): this run's folder only


_ERROR_LINE = re.compile(r"\b(?!RayTaskError|UserCodeException)(\w+(?:Error|Exception)): (.+)")


def _root_cause(exc: BaseException) -> str:
    """The innermost error behind a failure of the Ray job (a worker's ``OSError: ... No space left on device``),
    rather than Ray's own summary line."""
    seen, chain = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    for err in reversed(chain):
        if not type(err).__module__.startswith("ray"):
            text = str(err).strip().splitlines()
            return f"{type(err).__name__}: {text[-1] if text else ''}"
    found = [m for line in str(chain[0]).splitlines() if (m := _ERROR_LINE.search(line))]
    if found:
        return f"{found[-1].group(1)}: {found[-1].group(2)}"
    text = str(chain[0]).strip().splitlines()
    return f"{type(chain[0]).__name__}: {text[-1] if text else ''}"


def _await_start(st: _Run) -> dict[str, Any]:
    """Wait for the preflight and the opening of the output (answering signals meanwhile); the preflight's result.
    A failed preflight raises :class:`BuildRefused` with the loader's message, other settings than the output's
    :class:`ManifestMismatch`: in both cases nothing was written."""
    import ray

    while not ray.wait([st.opening], timeout=0.5)[0]:
        check_stop()
        if st.lease is not None:
            st.lease.check()
    try:
        result = ray.get(st.opening)
    except ray.exceptions.RayTaskError as exc:
        st.settled = True
        cause = getattr(exc, "cause", None)
        if isinstance(cause, OSError):  # writing the manifest failed (space, permissions): a failed build
            raise cause from None
        if isinstance(cause, StartAbandoned):
            raise StartAbandoned(str(cause)) from None
        if isinstance(cause, ManifestMismatch):
            raise ManifestMismatch(refusal(exc)) from None
        raise BuildRefused(refusal(exc)) from None
    _mark_started(st, result)
    return result["info"]


def _first_batch(st: _Run, batches):
    """``batches`` with its first batch already taken: it comes once the output is opened, as the write tasks wait
    for that. A failed preflight or opening fails the write tasks too: that failure is raised as the refusal it is."""
    try:
        first = next(batches)
    except StopIteration:
        return iter(())
    except Exception:
        if st.gate is not None:
            st.gate.abandon.remote()  # a model still unreported will not be: the opening gives up
        # A pool that cannot load its model reported the loader's error: that refusal is raised. A job that failed
        # before every model was reported (an actor died) ends as that failure, with nothing written.
        with contextlib.suppress(StartAbandoned):
            _await_start(st)
        raise
    return itertools.chain([first], batches)


def _mark_started(st: _Run, result: dict[str, Any]) -> None:
    """The opening task wrote the manifest and made the run's folder: from here on the output is this build's."""
    st.settled = True
    st.manifest = manifest = result["manifest"]
    st.started = True
    if st.tracker is not None and st.tracker.id_type and manifest.get("id_type") != st.tracker.id_type:
        manifest["id_type"] = st.tracker.id_type


def _settle_start(st: _Run, wait_s: float = 30.0) -> None:
    """On a way out before the driver saw the output opened: the opening task must not write after the driver has
    answered. The preflight is cancelled if it still runs, or the gate told to give up (the opening then never
    writes); an opening under way is waited for (it takes a moment): if it opened the output, the build counts as
    started and ends as one."""
    if st.opening is None or st.settled:
        return
    st.settled = True
    import ray

    with contextlib.suppress(Exception):
        if st.gate is not None:
            st.gate.abandon.remote()  # an opening still waiting for the models gives up
        elif not ray.wait([st.preflight], timeout=0)[0]:
            ray.cancel(st.preflight, force=True)
    try:
        if not ray.wait([st.opening], timeout=wait_s)[0]:
            if st.gate is not None:
                ray.kill(st.gate)
            else:
                ray.cancel(st.opening, force=True)
            return
        result = ray.get(st.opening)
    except Exception:  # noqa: BLE001 - the preflight or the opening failed, or was cancelled: nothing written
        return
    _mark_started(st, result)


def _undo_start(st: _Run) -> None:
    """A build that did not start leaves the output as it found it: no lease, no temporary folder, no new folder."""
    if st.store is None:
        return
    _settle_start(st)
    if st.started:  # the opening task had written the manifest: end as a started build
        if st.manifest is not None:
            st.manifest["status"] = "incomplete"
            with contextlib.suppress(OSError):
                write_manifest(st.store, st.manifest)
        _finish(st)
        return
    if st.lease is not None:
        st.lease.release()
        st.lease = None
    with contextlib.suppress(OSError, ValueError):
        if not st.store.listdir(TMP_ROOT):
            st.store.delete_tree(TMP_ROOT)
    if not st.existed:
        st.store.remove_root_if_empty()


def _finish(st: _Run) -> None:
    """Remove this run's temporary folder (its fragments) and the build's temporary root when empty."""
    if st.lease is not None:
        st.lease.release()  # first: its heartbeat writes through the temporary root removed below
    if st.store is None or not st.run_id:
        return
    with contextlib.suppress(OSError):
        st.store.delete_tree(run_dir(st.run_id))
    with contextlib.suppress(OSError, ValueError):
        if not st.store.listdir(TMP_ROOT):
            st.store.delete_tree(TMP_ROOT)


def _stopped(st: _Run, signum: int, t_start, stream, drain: float):
    """End a build stopped by a signal: as a failed one, with the signal's exit code."""
    message = (
        f"stopped by {signal.Signals(signum).name}; complete shards are kept: run the same command again to resume"
    )
    return _failed(st, message, t_start, stream, code=EXIT_INTERRUPTED.get(signum, EXIT_FAILED), drain=drain)


def _failed(st: _Run, message, t_start, stream, shards: int = 0, code: int = EXIT_FAILED, drain: float = 0.0):
    """End a started build: shards being assembled finish within ``drain`` seconds or are abandoned, the manifest
    says ``incomplete``, this run's temporary files go."""
    _settle_start(st)
    if st.assembler is not None and st.tracker is not None:
        st.assembler.drop_queued()  # shards not started stay incomplete: only those being assembled may finish
        deadline = time.monotonic() + drain
        with contextlib.suppress(Exception):
            while st.assembler.in_flight and time.monotonic() < deadline:
                for key, result in st.assembler.finished(min(1.0, max(0.0, deadline - time.monotonic()))):
                    if result["status"] == "complete":
                        st.tracker.done(key)
        st.assembler.cancel()
    if st.tracker is not None:
        shards = max(shards, len(st.tracker.complete))
    print(f"error: {message}", file=stream, flush=True)
    if st.manifest is not None and st.store is not None:
        st.manifest["status"] = "incomplete"
        if st.tracker is not None:
            st.manifest["file_samples"] = {str(k): v for k, v in sorted(st.tracker.file_totals.items())}
        # The same cause (disk full, permissions) may stop this write too; the shards are what count.
        with contextlib.suppress(OSError):
            write_manifest(st.store, st.manifest)
    if st.started:
        _finish(st)
    else:
        with contextlib.suppress(OSError):
            _undo_start(st)
    return BuildOutcome(code, "failed", message, shards=shards, wall_s=time.monotonic() - t_start)
