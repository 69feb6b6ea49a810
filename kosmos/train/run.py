"""A training run end to end: :func:`run_training` sets up processes, tokenizer, model, optimizer and loader from a
:class:`~kosmos.train.config.TrainConfig`, resumes when asked, runs :class:`~kosmos.train.loop.Trainer`, evaluates,
and writes the weight-change summary. Under torchrun every rank calls it.

Exact resume: the model, AdamW state, step, the loader's position (per rank) and every RNG state (per rank) are in
the checkpoint; on resume the loader is restarted at its position, and the RNG states are restored *after* the
DataLoader has started (starting it draws a seed from torch's generator), so the resumed run draws the same dropout
masks as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import signal
import threading
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from grit_core.config import ConfigError, dump_config
from kosmos.data.tokenizer import KosmosTokenizer
from kosmos.data.transform import resolve_image_frame
from kosmos.model.checkpoint import load_state_dict, save_model
from kosmos.model.checkpoint_dcp import is_sharded_checkpoint, load_sharded
from kosmos.model.model import KosmosModel
from kosmos.model.parallelize import parallelize
from kosmos.train.config import TrainConfig
from kosmos.train.log import MetricsLogger
from kosmos.train.loop import Trainer
from kosmos.train.setup import Dist, build_model, load_tokenizer, make_optimizer, setup_distributed
from kosmos.train.state import (
    latest_checkpoint,
    read_optimizer_state,
    read_rank_files,
    read_trainer_state,
    remove_incomplete,
    restore_rng_state,
)

log = logging.getLogger(__name__)

INITIAL_WEIGHTS_DIR = "initial"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolved_config(cfg: TrainConfig, model: KosmosModel) -> TrainConfig:
    """``cfg`` with what the run derives filled in: the sequence geometry from the model (image size, image tokens,
    location bins) and the image frame ``auto`` stands for. A new config: the caller's is left as it was. The run
    folder's config files record this one, so a checkpoint says how it was trained."""
    seq = cfg.data.sequence
    derived = dataclasses.replace(
        seq,
        image_size=model.config.vision.image_size,
        num_image_tokens=model.config.latent_query_num,
        num_bins=model.config.loc_bins,
        image_frame=resolve_image_frame(
            seq.image_frame, cfg.model.checkpoint if cfg.model.init == "checkpoint" else None
        ),
    )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sequence=derived))


def run_training(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train as ``cfg`` says (continuing from the run folder's latest checkpoint with ``resume``); returns the
    run's summary. Under torchrun every rank calls this."""
    env = setup_distributed(cfg.run.device)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        return _run(cfg, resume, env)
    finally:  # process-wide settings go back to what they were (the trainer may run inside a larger program)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        if env.owns_group:
            dist.destroy_process_group()


def _run(cfg: TrainConfig, resume: bool, env: Dist) -> dict[str, Any]:
    from kosmos.data.loader import make_loader

    run = cfg.run
    if run.threads:
        torch.set_num_threads(run.threads)
    if run.deterministic:
        torch.use_deterministic_algorithms(True)
    out = Path(run.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name in remove_incomplete(out):
            log.warning("removed %s, left by an interrupted checkpoint write", name)
    env.barrier()
    found = latest_checkpoint(out)
    if found is not None and not resume:
        raise ConfigError(f"{out} already holds checkpoints (latest {found.name}): pass --resume, or a new output_dir")
    resume_from = found if resume else None
    if resume and resume_from is None and env.is_main:
        log.warning("--resume: no checkpoint in %s yet, starting from the beginning", out)

    tokenizer = load_tokenizer(cfg)
    seed_everything(run.seed)  # the same initial weights on every rank
    model = build_model(cfg, tokenizer, env.device)
    cfg = resolved_config(cfg, model)
    state = read_trainer_state(resume_from) if resume_from is not None else None
    sharded = resume_from is not None and is_sharded_checkpoint(resume_from)
    if state is not None:
        if state["world_size"] != env.world_size:
            raise ConfigError(
                f"{resume_from} was saved by {state['world_size']} ranks, this run has {env.world_size}: resuming "
                "exactly needs the same number (the loader's position is per rank); to continue from its weights "
                "at another world size, start a new run with model.init: checkpoint and model.checkpoint: "
                f"{resume_from}"
            )
        if not sharded:  # a sharded checkpoint loads after parallelize, straight into each rank's shards
            model.load_state_dict(load_state_dict(resume_from, env.device), strict=True)
    elif env.is_main and cfg.model.init == "scratch" and run.save_initial_weights:
        save_model(model, out / INITIAL_WEIGHTS_DIR)
    if env.is_main:
        dump_config(cfg, out / "config.yaml")
    module = parallelize(model, cfg.parallel, env.device)
    optimizer = make_optimizer(model, cfg.optim)
    logger = MetricsLogger(out, env.is_main, run.tensorboard, state["step"] if state else None)
    trainer = Trainer(cfg, model, module, optimizer, tokenizer, env, logger)
    data_state = rng = None
    if state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        optim_state = None if sharded else read_optimizer_state(resume_from)
        if sharded:
            load_sharded(resume_from, model, optimizer)
        elif optim_state is not None:
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state, options=options)
        trainer.load_counters(state)
        rng_tensors, rank_meta = read_rank_files(resume_from, env.rank)
        data_state, rng = rank_meta["data"], (rng_tensors, rank_meta["rng"])
    trainer.start_step = trainer.step
    loader = make_loader(cfg.data, tokenizer, env.rank, env.world_size, state=data_state)
    # Start the loader (its DataLoader draws a seed from torch's generator) before the RNG states are set, so a
    # resumed run continues the uninterrupted run's random streams exactly.
    stream = iter(loader)
    first = next(stream)
    if rng is not None:
        restore_rng_state(*rng)
    else:
        seed_everything(run.seed + 1 + env.rank)  # dropout differs across ranks
    batches = chain([first], stream)
    evaluate = make_evaluator(cfg, model, tokenizer, env, logger)
    stop = run.stop_at_step or run.max_steps
    logger.print(
        f"training {model.num_parameters():,} parameters ({model.num_parameters(trainable_only=True):,} trainable) "
        f"on {env.world_size} x {env.device.type}, steps {trainer.step + 1}..{stop} of {run.max_steps}"
    )
    previous = {}  # signal handlers can only be set from the main thread
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for signum in previous:
        signal.signal(signum, trainer.request_stop)
    try:
        trainer.fit(batches, loader, stop, evaluate)
        if evaluate is not None and (not cfg.eval.every or trainer.step % cfg.eval.every):
            evaluate(trainer.step)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        logger.close()
    summary = {
        "step": trainer.step,
        "max_steps": run.max_steps,
        "checkpoint": str(latest_checkpoint(out)) if env.is_main else None,
        "nonfinite_skipped": trainer.nonfinite_skipped,
        "samples_seen": trainer.samples_seen,
        "tokens_seen": trainer.tokens_seen,
        "train_seconds": round(trainer.train_seconds, 3),
        "data_counts": dict(loader.counts),
    }
    if env.world_size > 1:  # lets a person (and the tests) see that the ranks hold the same weights
        summary["rank"] = env.rank
        summary["param_checksum"] = parameter_checksum(model)
    if env.is_main:
        summary["weight_change"] = weight_change_summary(cfg, model, out)
    return summary


def parameter_checksum(model: torch.nn.Module) -> float:
    """Sum of every parameter value (float64): equal on every rank when data parallelism keeps them in sync."""
    total = 0.0
    for p in model.parameters():
        data = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += float(data.detach().double().sum())
    return total


def make_evaluator(
    cfg: TrainConfig, model: KosmosModel, tokenizer: KosmosTokenizer, env: Dist, logger: MetricsLogger
) -> Callable[[int], None] | None:
    """``evaluate(step)``: grounding accuracy and loss on ``eval.shards``, logged as kind "eval". Rank 0 evaluates
    (every rank under FSDP, whose forward needs them all); the others wait."""
    if not cfg.eval.shards:
        return None
    from kosmos.eval.grounding import evaluate_samples, read_eval_samples

    evaluates = env.is_main or cfg.parallel.data_parallel == "fsdp"
    samples = []
    if evaluates:
        samples, _ = read_eval_samples(cfg.eval.shards, tokenizer, cfg.data.sequence, cfg.eval.max_samples)
    amp = cfg.run.precision == "bf16"

    def evaluate(step: int) -> None:
        if evaluates:
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=amp):
                result = evaluate_samples(model, tokenizer, samples, cfg.eval.batch_size)
            baselines = result.pop("baselines", {})
            record = {"step": step, **result, **{f"baseline_{k}": v for k, v in baselines.items()}}
            logger.log(record, kind="eval")
            logger.print(
                f"eval step {step}: loss {result['loss']:.4f} | grounding accuracy {result['accuracy']:.3f} "
                f"(mean box {baselines.get('mean_box', 0):.3f}, centred box {baselines.get('centred_box', 0):.3f})"
            )
        env.barrier()

    return evaluate


def weight_change_summary(cfg: TrainConfig, model: KosmosModel, out: Path) -> dict[str, Any] | None:
    """``weight_change.json``: what training changed, per module, against the weights the run started from."""
    from kosmos.eval.weight_diff import write_summary

    reference = Path(cfg.model.checkpoint) if cfg.model.init == "checkpoint" else out / INITIAL_WEIGHTS_DIR
    final = latest_checkpoint(out)
    if final is None or not (reference / "model.safetensors").is_file():
        return None
    from kosmos.eval.weight_diff import SUMMARY_DEPTH, module_of

    modules = {True: set(), False: set()}
    for name, p in model.named_parameters():
        modules[p.requires_grad].add(module_of(name, SUMMARY_DEPTH))
    frozen = sorted(modules[False] - modules[True])  # modules none of whose parameters train
    payload = write_summary(reference, final, out / "weight_change.json", frozen)
    for problem in payload["problems"]:
        log.warning("weight change: %s", problem)
    return {"file": str(out / "weight_change.json"), "problems": payload["problems"]}
