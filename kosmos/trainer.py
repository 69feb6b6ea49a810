"""The training loop: one function, :func:`run_training`, from a :class:`~kosmos.train_config.TrainConfig` to a
trained checkpoint, alone or under ``torchrun`` (DDP, or FSDP via :mod:`kosmos.parallelize`).

One update = ``run.grad_accum`` micro-batches per rank. The loss is the mean over every target token of the update
(all micro-batches, all ranks): each micro-batch's summed loss is scaled by ``world_size / targets_in_update``
before ``backward`` (DDP then averages over ranks), so accumulation and data parallelism change nothing but speed.
Then the gradient norm is clipped, and a step whose loss or gradient norm is not finite on any rank is skipped
(gradients dropped, the schedule does not advance) and counted; ``run.max_consecutive_nonfinite`` such steps in a
row stop the run with an error naming the step and the batch's sample keys.

Exact resume: the model, AdamW state, step, the loader's position (per rank) and every RNG state (per rank) are in
the checkpoint; on resume the loader is restarted at its position, and the RNG states are restored *after* the
DataLoader has started (starting it draws a seed from torch's generator), so the resumed run draws the same dropout
masks as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from grit_pipeline.config import ConfigError, dump_config
from kosmos.checkpoint import load_state_dict, save_checkpoint, save_model
from kosmos.model import IGNORE_INDEX, KosmosModel
from kosmos.parallelize import parallelize
from kosmos.tokenizer import KosmosTokenizer
from kosmos.train_config import TrainConfig
from kosmos.train_log import MetricsLogger, format_progress
from kosmos.train_setup import Dist, build_model, load_tokenizer, lr_factor, make_optimizer, setup_distributed
from kosmos.train_state import (
    CONFIG_YAML,
    TOKENIZER_DIR,
    finalize_checkpoint,
    latest_checkpoint,
    read_optimizer_state,
    read_rank_files,
    read_trainer_state,
    remove_incomplete,
    restore_rng_state,
    temporary_dir,
    write_rank_files,
    write_state_files,
)

log = logging.getLogger(__name__)

INITIAL_WEIGHTS_DIR = "initial"


class TrainingError(RuntimeError):
    """A run that cannot go on (repeated non-finite steps, a failed checkpoint write); the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    loss_sum: float
    targets: int
    tokens: int
    samples: int
    grad_norm: float
    finite: bool


class Trainer:
    """Owns the model, optimizer and counters of one run; :meth:`fit` runs updates and checkpoints."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: KosmosModel,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        tokenizer: KosmosTokenizer,
        env: Dist,
        logger: MetricsLogger,
    ) -> None:
        self.cfg, self.model, self.module, self.optimizer = cfg, model, module, optimizer
        self.tokenizer, self.env, self.logger = tokenizer, env, logger
        self.out = Path(cfg.run.output_dir)
        self.step = 0
        self.batches_drawn = 0
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self.tokens_seen = 0
        self.samples_seen = 0
        self.train_seconds = 0.0
        self.last_saved = -1
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        amp = cfg.run.precision == "bf16"
        self.autocast = lambda: torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=amp)
        self.start_step = 0

    # ----- one update -----

    def _micro_batch_sync(self, last: bool):
        kind = self.cfg.parallel.data_parallel
        if kind == "ddp" and not last:
            return self.module.no_sync()
        if kind == "fsdp":
            self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        dev = self.env.device
        pixels = batch["pixel_values"]
        nb = dev.type == "cuda"
        return {
            "pixel_values": pixels.to(dev, non_blocking=nb) if pixels.shape[0] else None,
            "input_ids": batch["input_ids"].to(dev, non_blocking=nb),
            "image_embeds_position_mask": batch["image_embeds_position_mask"].to(dev, non_blocking=nb),
            "labels": batch["labels"].to(dev, non_blocking=nb),
        }

    def train_step(self, micro_batches: list[dict[str, Any]]) -> StepStats:
        """Forward and backward over the micro-batches, clip, and an optimizer step unless something is not
        finite on some rank. Every rank makes the same decision."""
        factor = lr_factor(self.step + 1, self.cfg.optim, self.cfg.run.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr * group["lr_scale"] * factor
        local_targets = sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in micro_batches)
        total = torch.tensor([float(local_targets)], device=self.env.device)
        if self.env.world_size > 1:
            dist.all_reduce(total)
        scale = self.env.world_size / max(float(total.item()), 1.0)
        loss_sum = torch.zeros((), device=self.env.device)
        for i, batch in enumerate(micro_batches):
            inputs = self._to_device(batch)
            with self._micro_batch_sync(i == len(micro_batches) - 1), self.autocast():
                out = self.module(**inputs, reduction="sum", return_logits=False, images_in_slot_order=True)
            (out.loss * scale).backward()
            loss_sum += out.loss.detach().float()
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
            norm = norm.full_tensor()
        ok = (torch.isfinite(loss_sum) & torch.isfinite(norm)).float().reshape(1)
        if self.env.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        finite = bool(ok.item())
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(
            loss_sum=float(loss_sum),
            targets=local_targets,
            tokens=sum(int(b["attention_mask"].sum()) for b in micro_batches),
            samples=sum(len(b["keys"]) for b in micro_batches),
            grad_norm=float(norm),
            finite=finite,
        )

    def _next_batch(self, batches: Iterator[dict[str, Any]]) -> dict[str, Any]:
        batch = next(batches)
        if self.batches_drawn in self.cfg.fault.poison_batches and batch["pixel_values"].shape[0]:
            batch["pixel_values"] = batch["pixel_values"].clone()
            batch["pixel_values"][0] = float("nan")
        self.batches_drawn += 1
        return batch

    # ----- the run -----

    def fit(
        self,
        batches: Iterator[dict[str, Any]],
        loader: Any,
        stop_step: int,
        evaluate: Callable[[int], None] | None = None,
    ) -> None:
        """Updates until ``stop_step``, logging, evaluating and checkpointing on the way, and a final checkpoint."""
        run = self.cfg.run
        window = torch.zeros(4, dtype=torch.float64)  # loss sum, targets, tokens, samples since the last log
        window_norms: list[float] = []
        t_window = time.perf_counter()
        while self.step < stop_step:
            t0 = time.perf_counter()
            micro = [self._next_batch(batches) for _ in range(run.grad_accum)]
            stats = self.train_step(micro)
            self.train_seconds += time.perf_counter() - t0
            if not stats.finite:
                self._handle_nonfinite(stats, micro)
                continue
            self.consecutive_nonfinite = 0
            self.step += 1
            self.tokens_seen += stats.tokens
            self.samples_seen += stats.samples
            window += torch.tensor([stats.loss_sum, stats.targets, stats.tokens, stats.samples], dtype=torch.float64)
            window_norms.append(stats.grad_norm)
            if self.step % run.log_every == 0 or self.step == stop_step:
                self._log_window(window, window_norms, time.perf_counter() - t_window, stop_step)
                window.zero_()
                window_norms.clear()
                t_window = time.perf_counter()
            if evaluate is not None and self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
                evaluate(self.step)
            if self.step % run.checkpoint_every == 0 and self.step != stop_step:
                self.save(loader)
        if self.last_saved != self.step:
            self.save(loader)

    def _handle_nonfinite(self, stats: StepStats, micro: list[dict[str, Any]]) -> None:
        self.nonfinite_skipped += 1
        self.consecutive_nonfinite += 1
        keys = [k for b in micro for k in b["keys"]]
        what = f"loss {stats.loss_sum / max(stats.targets, 1):.4g}, gradient norm {stats.grad_norm:.4g}"
        log.warning(
            "step %d skipped: non-finite %s on some rank (%d in a row, %d in all); rank %d batch keys: %s",
            self.step + 1, what, self.consecutive_nonfinite, self.nonfinite_skipped, self.env.rank, keys,
        )  # fmt: skip
        self.logger.log(
            {"step": self.step + 1, "nonfinite_skipped": self.nonfinite_skipped, "keys": keys[:64]}, kind="skip"
        )
        if self.consecutive_nonfinite >= self.cfg.run.max_consecutive_nonfinite:
            raise TrainingError(
                f"stopping at step {self.step + 1}: {self.consecutive_nonfinite} consecutive steps with a non-finite "
                f"loss or gradient ({what}); last batch on rank {self.env.rank} had sample keys {keys}"
            )

    def _log_window(self, window: torch.Tensor, norms: list[float], seconds: float, stop_step: int) -> None:
        if self.env.world_size > 1:
            summed = window.to(self.env.device)
            dist.all_reduce(summed)
            window = summed.cpu()
        loss_sum, targets, tokens, samples = window.tolist()
        seconds = max(seconds, 1e-9)
        per_step = self.train_seconds / max(1, self.step - self.start_step)
        record = {
            "step": self.step,
            "loss": loss_sum / max(targets, 1.0),
            "lr": self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0]["lr_scale"],
            "grad_norm": sum(norms) / max(1, len(norms)),
            "tokens_per_s": tokens / seconds,
            "samples_per_s": samples / seconds,
            "nonfinite_skipped": self.nonfinite_skipped,
            "batches": self.batches_drawn,
            "elapsed_s": round(self.train_seconds, 3),
            "eta_s": per_step * (stop_step - self.step),
        }
        self.logger.log(record)
        self.logger.print(format_progress(record, self.cfg.run.max_steps))

    # ----- checkpoints -----

    def _state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full model and optimizer state dicts, keyed by parameter name (collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        fsdp = self.cfg.parallel.data_parallel == "fsdp"
        model_sd = get_model_state_dict(self.model, options=options) if fsdp else self.model.state_dict()
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return model_sd, optim_sd

    def _fault(self, stage: str) -> None:
        f = self.cfg.fault
        if f.checkpoint_fault_step != self.step:
            return
        if f.checkpoint_fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(f"injected fault while writing the checkpoint of step {self.step} ({stage})")

    def save(self, loader: Any) -> Path | None:
        """Write the checkpoint of the current step (every rank takes part; rank 0 writes the shared files)."""
        env, step = self.env, self.step
        tmp = temporary_dir(self.out, step)
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        env.barrier()
        model_sd, optim_sd = self._state_dicts()
        final = None
        try:
            if env.is_main:
                save_checkpoint(tmp, model_sd, self.model.config, metadata={"step": str(step)})
                self._fault("model")
                self.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
                dump_config(self.cfg, tmp / CONFIG_YAML)
            write_rank_files(tmp, env.rank, loader.state_dict() if loader is not None else None)
            env.barrier()
            if env.is_main:
                write_state_files(tmp, step=step, state=self.counters(), optimizer=optim_sd, fault=self._fault)
                final = finalize_checkpoint(self.out, step, self.cfg.run.keep_checkpoints)
            env.barrier()
        except OSError as exc:
            if env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            last = latest_checkpoint(self.out)
            raise TrainingError(
                f"writing the checkpoint of step {step} failed ({exc}); the last complete checkpoint is "
                f"{last if last is not None else 'none'}, and --resume continues from it"
            ) from exc
        self.last_saved = step
        if final is not None:
            self.logger.print(f"checkpoint: {final}")
        return final

    def counters(self) -> dict[str, Any]:
        return {
            "batches_drawn": self.batches_drawn,
            "nonfinite_skipped": self.nonfinite_skipped,
            "tokens_seen": self.tokens_seen,
            "samples_seen": self.samples_seen,
            "train_seconds": self.train_seconds,
            "world_size": self.env.world_size,
            "max_steps": self.cfg.run.max_steps,
            "lr_factor": lr_factor(self.step, self.cfg.optim, self.cfg.run.max_steps),
        }

    def load_counters(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.batches_drawn = int(state["batches_drawn"])
        self.nonfinite_skipped = int(state["nonfinite_skipped"])
        self.tokens_seen = int(state["tokens_seen"])
        self.samples_seen = int(state["samples_seen"])
        self.train_seconds = float(state["train_seconds"])
        self.last_saved = self.step


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    from kosmos.data import make_loader

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
    seq = cfg.data.sequence  # sequences must have the model's geometry
    seq.image_size = model.config.vision.image_size
    seq.num_image_tokens = model.config.latent_query_num
    seq.num_bins = model.config.loc_bins
    state = read_trainer_state(resume_from) if resume_from is not None else None
    if state is not None:
        if state["world_size"] != env.world_size:
            raise ConfigError(
                f"{resume_from} was saved by {state['world_size']} ranks, this run has {env.world_size}: resuming "
                "exactly needs the same number (the loader's position is per rank)"
            )
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

        optim_state = read_optimizer_state(resume_from)
        if optim_state is not None:
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
    try:
        trainer.fit(batches, loader, stop, evaluate)
        if evaluate is not None and (not cfg.eval.every or trainer.step % cfg.eval.every):
            evaluate(trainer.step)
    finally:
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
    from kosmos.grounding_eval import evaluate_samples, read_eval_samples

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
    from kosmos.weight_diff import write_summary

    reference = Path(cfg.model.checkpoint) if cfg.model.init == "checkpoint" else out / INITIAL_WEIGHTS_DIR
    final = latest_checkpoint(out)
    if final is None or not (reference / "model.safetensors").is_file():
        return None
    from kosmos.weight_diff import SUMMARY_DEPTH, module_of

    modules = {True: set(), False: set()}
    for name, p in model.named_parameters():
        modules[p.requires_grad].add(module_of(name, SUMMARY_DEPTH))
    frozen = sorted(modules[False] - modules[True])  # modules none of whose parameters train
    payload = write_summary(reference, final, out / "weight_change.json", frozen)
    for problem in payload["problems"]:
        log.warning("weight change: %s", problem)
    return {"file": str(out / "weight_change.json"), "problems": payload["problems"]}
