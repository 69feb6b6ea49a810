"""The training loop: :class:`Trainer` runs updates, logs, evaluates and checkpoints one run.
:func:`kosmos.train.run.run_training` builds it from a config.

One update = ``run.grad_accum`` micro-batches per rank. The loss is the mean over every target token of the update
(all micro-batches, all ranks): each micro-batch's summed loss is scaled by ``world_size / targets_in_update``
before ``backward`` (DDP then averages over ranks), so accumulation and data parallelism change nothing but speed.
Then the gradient norm is clipped, and a step whose loss or gradient norm is not finite on any rank is skipped
(gradients dropped, the schedule does not advance) and counted; ``run.max_consecutive_nonfinite`` such steps in a
row stop the run with an error naming the step and the batch's sample keys. SIGTERM/SIGINT (``request_stop``)
finish the step, save a checkpoint and stop; every rank decides together, in the same all-reduce.

The step has no host syncs between the batch's transfer and the gradient norm: the target positions and the
image-slot check are computed on the host copy of the batch, and packed rows pass their ``segment_ids`` (each sample
attends only to itself). Checkpoints are "full" (gathered on rank 0) or "sharded" (``kosmos.model.checkpoint_dcp``:
every rank writes its shards, optionally in the background; the checkpoint is named in ``latest`` only once every
shard is on disk).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from grit_core.config import dump_config
from kosmos.data.tokenizer import KosmosTokenizer
from kosmos.model.checkpoint import save_checkpoint, save_config
from kosmos.model.checkpoint_dcp import save_sharded
from kosmos.model.hf import SIDE_FILES
from kosmos.model.model import IGNORE_INDEX, KosmosModel
from kosmos.train.config import TrainConfig
from kosmos.train.log import MetricsLogger, format_progress
from kosmos.train.setup import Dist, lr_factor
from kosmos.train.state import (
    CONFIG_YAML,
    TOKENIZER_DIR,
    finalize_checkpoint,
    latest_checkpoint,
    step_dir_name,
    temporary_dir,
    write_rank_files,
    write_state_files,
)

log = logging.getLogger(__name__)


def target_positions(labels: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """Flat ``b * T + t`` positions whose next token is a target, computed on the host, padded with -1 to a multiple
    of ``multiple`` (fewer distinct shapes for a compiled step)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    index = shifted.ne(IGNORE_INDEX).nonzero().squeeze(1)
    pad = -index.numel() % multiple
    return torch.cat([index, index.new_full((pad,), -1)]) if pad else index


class TrainingError(RuntimeError):
    """A run that cannot go on (repeated non-finite steps, a failed checkpoint write); the message says why."""


class TrainingStopped(TrainingError):
    """SIGTERM or SIGINT: the run finished its step, saved a checkpoint and stopped; ``--resume`` continues."""


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
    stop: bool = False  # a rank received SIGTERM/SIGINT


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
        self.stop_signal: int | None = None
        self.pending: tuple[Any, int, dict[str, Any]] | None = None  # an asynchronous save: (future, step, counters)
        self.forward_loss = self._forward_loss
        if cfg.parallel.compile and cfg.parallel.compile_scope == "model":
            self.forward_loss = torch.compile(self._forward_loss)

    def _forward_loss(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The summed loss of one micro-batch: the whole forward and loss, free of host syncs (compilable)."""
        out = self.module(**inputs, reduction="sum", return_logits=False, images_in_slot_order=True, check_slots=False)
        return out.loss

    # ----- one update -----

    def _micro_batch_sync(self, last: bool):
        kind = self.cfg.parallel.data_parallel
        if kind == "ddp" and not last:
            return self.module.no_sync()
        if kind == "fsdp":
            self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's inputs on the device; what needs a look at the values is done here, on the host copy."""
        dev = self.env.device
        pixels = batch["pixel_values"]
        nb = dev.type == "cuda"
        self.model.check_image_slots(batch["image_embeds_position_mask"], pixels.shape[0], in_slot_order=True)
        inputs = {
            "pixel_values": pixels.to(dev, non_blocking=nb) if pixels.shape[0] else None,
            "input_ids": batch["input_ids"].to(dev, non_blocking=nb),
            "image_embeds_position_mask": batch["image_embeds_position_mask"].to(dev, non_blocking=nb),
            "labels": batch["labels"].to(dev, non_blocking=nb),
            "target_index": target_positions(batch["labels"]).to(dev, non_blocking=nb),
        }
        if self.cfg.data.pack:
            inputs["segment_ids"] = batch["segment_ids"].to(dev, non_blocking=nb)
        return inputs

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
                loss = self.forward_loss(inputs)
            (loss * scale).backward()
            loss_sum += loss.detach().float()
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
            norm = norm.full_tensor()
        # One all-reduce decides for every rank: skip if any rank is not finite, stop if any rank was signalled.
        finite = torch.isfinite(loss_sum) & torch.isfinite(norm.to(loss_sum.device))
        ok = torch.stack([finite, torch.tensor(self.stop_signal is None, device=finite.device)]).float()
        if self.env.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        finite, go_on = (bool(v) for v in ok.tolist())
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
            stop=not go_on,
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
                if stats.stop:
                    self._stop(loader)
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
            if stats.stop:
                self._stop(loader)
            if self.step % run.checkpoint_every == 0 and self.step != stop_step:
                self.save(loader)
        if self.last_saved != self.step:
            self.save(loader)
        self.finish_pending()

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """Signal handler: finish the current step, save, stop. A second signal gets the default behaviour."""
        self.stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)

    def _stop(self, loader: Any) -> None:
        if self.last_saved != self.step:
            self.save(loader)
        self.finish_pending()
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal on another rank"
        raise TrainingStopped(
            f"stopped by {name} at step {self.step}; checkpoint {step_dir_name(self.step)} is saved, "
            "and --resume continues from it"
        )

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
        """Full model and optimizer state dicts, keyed by parameter name, on rank 0 (collective under FSDP; the
        other ranks get empty dicts)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        fsdp = self.cfg.parallel.data_parallel == "fsdp"
        if not fsdp and not self.env.is_main:  # replicated: rank 0's copy is the one written
            return {}, {}
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
        """Write the checkpoint of the current step (every rank takes part; rank 0 writes the shared files).

        Asynchronous sharded saves return None: the checkpoint completes (and is named in ``latest``) at the next
        save or at the end of the run, once every rank's shards are on disk (:meth:`finish_pending`).
        """
        self.finish_pending()
        env, step = self.env, self.step
        run = self.cfg.run
        sharded = run.checkpoint_format == "sharded"
        tmp = temporary_dir(self.out, step)
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        env.barrier()
        final = None
        try:
            future = None
            if sharded:
                future = save_sharded(
                    tmp, self.model, self.optimizer, rank=env.rank, world_size=env.world_size,
                    asynchronous=run.async_checkpoint,
                )  # fmt: skip
                if env.is_main:
                    save_config(tmp, self.model.config)
                    self._fault("model")
            else:
                model_sd, optim_sd = self._state_dicts()
                if env.is_main:
                    save_checkpoint(tmp, model_sd, self.model.config, metadata={"step": str(step)})
                    self._fault("model")
            if env.is_main:
                self.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
                if self.cfg.model.init == "checkpoint":  # processor files travel on (`kosmos convert --to-hf`)
                    for name in SIDE_FILES:
                        if (Path(self.cfg.model.checkpoint) / name).is_file():
                            shutil.copy2(Path(self.cfg.model.checkpoint) / name, tmp / name)
                dump_config(self.cfg, tmp / CONFIG_YAML)
            write_rank_files(tmp, env.rank, loader.state_dict() if loader is not None else None)
            self.last_saved = step
            if future is not None:
                self.pending = (future, step, self.counters())
                return None
            final = self._complete(step, self.counters(), None if sharded else optim_sd)
        except OSError as exc:
            self._failed(step, tmp, exc)
        if final is not None:
            self.logger.print(f"checkpoint: {final}")
        return final

    def finish_pending(self) -> Path | None:
        """Wait for an asynchronous save to reach the disk on every rank, then complete it."""
        if self.pending is None:
            return None
        future, step, counters = self.pending
        self.pending = None
        final = None
        try:
            future.result()
            final = self._complete(step, counters, None)
        except OSError as exc:
            self._failed(step, temporary_dir(self.out, step), exc)
        if final is not None:
            self.logger.print(f"checkpoint: {final}")
        return final

    def _complete(self, step: int, counters: dict[str, Any], optim_sd: dict[str, Any] | None) -> Path | None:
        """After every rank has written its part: rank 0 writes the state file and makes the checkpoint final."""
        env = self.env
        env.barrier()
        final = None
        if env.is_main:
            write_state_files(
                temporary_dir(self.out, step), step=step, state=counters, optimizer=optim_sd, fault=self._fault
            )
            final = finalize_checkpoint(self.out, step, self.cfg.run.keep_checkpoints)
        env.barrier()
        return final

    def _failed(self, step: int, tmp: Path, exc: OSError) -> None:
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(self.out)
        raise TrainingError(
            f"writing the checkpoint of step {step} failed ({exc}); the last complete checkpoint is "
            f"{last if last is not None else 'none'}, and --resume continues from it"
        ) from exc

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
