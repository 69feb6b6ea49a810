"""The trainer's CUDA paths, run once on a GPU: ``python -m benchmarks run --only trainer_gpu --device cuda``.

The GPU machine has no shards and no webdataset, so batches are made in memory in the loader's layout (64 image
slots, labels -100 up to ``</image>``) and go through the same :class:`kosmos.train.loop.Trainer` the CLI runs:

- ``tiny``: bf16 autocast, packed rows' document mask (FlexAttention on CUDA), 2 micro-batches per update,
  40 updates on 8 cycled batches (the loss must fall); a
  poisoned batch (NaN pixels) must be skipped without touching the weights; a checkpoint written and read back.
- ``large`` (``kosmos2-base`` by default, ``TRAINER_GPU_SIZE=kosmos2-1.6b`` for the paper's size): FSDP2 on a
  one-rank process group, compiled blocks, activation checkpointing, bf16 parameters, fused AdamW; step time and
  peak memory; a full-state and a sharded (DCP) checkpoint at step 4, then a fresh model resumed from each must
  give step 5's loss again.

``TRAINER_GPU_SMOKE=1`` runs both on the tiny size on whatever device is given (the CPU here, gloo for FSDP), to
check the script. Modules the machine lacks but the trainer only imports for their config types (webdataset,
braceexpand: the shard readers) are replaced by empty modules; nothing here reads shards.
"""

from __future__ import annotations

import gc
import importlib
import os
import socket
import sys
import tempfile
import time
import types
from pathlib import Path


def _stub_shard_readers() -> list[str]:
    stubbed = []
    for name in ("webdataset", "braceexpand"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
            stubbed.append(name)
    return stubbed


def synthetic_batches(tokenizer, n: int, batch: int, text_len: int, image_size: int, slots: int, seed: int = 0):
    """``n`` batches in the loader's layout: ``<s><image>[slots]</image>`` then ``text_len`` text tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prefix = [tokenizer.bos_id, tokenizer.boi_id, *tokenizer.image_slot_ids(slots), tokenizer.eoi_id]
    out = []
    for i in range(n):
        text = torch.randint(4, tokenizer.mask_id, (batch, text_len), generator=g)
        ids = torch.cat([torch.tensor(prefix).expand(batch, -1), text], dim=1)
        labels = ids.clone()
        labels[:, : len(prefix)] = -100
        image_mask = torch.zeros_like(ids)
        image_mask[:, 2 : 2 + slots] = 1
        out.append(
            {
                "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g),
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "image_embeds_position_mask": image_mask,
                "labels": labels,
                "segment_ids": torch.ones_like(ids),  # one sample per row, no padding
                "keys": [f"b{i}r{r}" for r in range(batch)],
            }
        )
    return out


def _make_trainer(overrides: list[str], tokenizer, device, out: Path):
    import torch

    from kosmos.train.config import load_train_config
    from kosmos.train.log import MetricsLogger
    from kosmos.train.loop import Trainer
    from kosmos.train.setup import Dist, build_model, make_optimizer

    base = ["tokenizer=unused", "data.sources=[{shards: [unused.tar]}]", f"run.output_dir={out}"]
    cfg = load_train_config(None, base + overrides)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, device)
    from kosmos.model.parallelize import parallelize

    module = parallelize(model, cfg.parallel, device)
    trainer = Trainer(
        cfg, model, module, make_optimizer(model, cfg.optim), tokenizer, Dist(device=device),
        MetricsLogger(out, enabled=False, tensorboard=False),
    )  # fmt: skip
    return cfg, model, trainer


def check_tiny(tokenizer, device, tmp: Path) -> dict:
    import torch

    from kosmos.model.checkpoint import load_state_dict

    sets = ["model.size=tiny", "run.precision=bf16", "run.grad_accum=2", "optim.lr=2.0e-3", "optim.warmup_steps=5"]
    sets += ["run.max_steps=40", "model.connector_init=block_pool", "model.freeze_vision=true"]
    # Packed rows' document mask; without attention dropout it runs through FlexAttention on CUDA.
    sets += ["data.pack=true", "model.overrides={text: {attention_dropout: 0.0}}"]
    cfg, model, trainer = _make_trainer(sets, tokenizer, device, tmp / "tiny")
    batches = synthetic_batches(tokenizer, 8, 8, 24, model.config.vision.image_size, model.config.latent_query_num)
    losses = []
    for step in range(40):
        micro = [batches[(2 * step) % 8], batches[(2 * step + 1) % 8]]
        stats = trainer.train_step(micro)
        assert stats.finite, f"step {step}: not finite"
        trainer.step += 1
        losses.append(stats.loss_sum / stats.targets)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = dict(batches[0], pixel_values=torch.full_like(batches[0]["pixel_values"], float("nan")))
    skipped = trainer.train_step([poisoned, batches[1]])
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    path = trainer.save(None)
    saved = load_state_dict(path)
    round_trip = all(torch.equal(saved[k], v.cpu()) for k, v in model.state_dict().items())
    return {
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "loss_fell": losses[-1] < 0.8 * losses[0],
        "poisoned_step_skipped": not skipped.finite,
        "weights_unchanged_by_skipped_step": unchanged,
        "checkpoint_round_trip_exact": round_trip,
    }


def check_large(tokenizer, device, tmp: Path, size: str) -> dict:
    import torch
    import torch.distributed as dist

    from kosmos.model.checkpoint import load_state_dict

    cuda = device.type == "cuda"
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    sets = [
        f"model.size={size}",
        "run.precision=bf16",
        "parallel.data_parallel=fsdp",
        "model.overrides={text: {dropout: 0.0, attention_dropout: 0.0}}",
    ]
    sets += ["parallel.activation_checkpointing=true", "optim.warmup_steps=2", "run.max_steps=100"]
    if cuda:
        sets += ["parallel.compile=true", "parallel.fsdp_param_dtype=bfloat16", "optim.fused=true"]
    batch, text_len = (8, 448) if cuda else (2, 16)
    out = tmp / "large"
    cfg, model, trainer = _make_trainer(sets, tokenizer, device, out)
    slots, image = model.config.latent_query_num, model.config.vision.image_size
    batches = synthetic_batches(tokenizer, 5, batch, text_len, image, slots, seed=1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(4):
        t0 = time.perf_counter()
        stats = trainer.train_step([batches[i]])
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        trainer.step += 1
        losses.append(stats.loss_sum / stats.targets)
    t0 = time.perf_counter()
    path = trainer.save(None)
    save_s = time.perf_counter() - t0
    # The same state as a sharded checkpoint (every rank its shards, nothing gathered), in another run folder.
    trainer.cfg.run.checkpoint_format, trainer.out = "sharded", out / "sharded"
    t0 = time.perf_counter()
    sharded_path = trainer.save(None)
    sharded_save_s = time.perf_counter() - t0
    step5 = trainer.train_step([batches[4]])
    tokens = batches[0]["input_ids"].numel()
    result = {
        "size": size,
        "parameters": model.num_parameters(),
        "vocab": model.config.text.vocab_size,
        "batch": list(batches[0]["input_ids"].shape),
        "first_step_s": round(times[0], 2),
        "step_s": [round(t, 4) for t in times[1:]],
        "tokens_per_s": round(tokens / min(times[1:]), 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "losses": [round(v, 4) for v in losses],
        "checkpoint_save_s": round(save_s, 2),
        "sharded_checkpoint_save_s": round(sharded_save_s, 2),
        "step5_loss": step5.loss_sum / step5.targets,
    }
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    # Resume as kosmos.train.run does: weights before wrapping, optimizer state after.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from kosmos.model.parallelize import parallelize
    from kosmos.train.config import load_train_config
    from kosmos.train.log import MetricsLogger
    from kosmos.train.loop import Trainer
    from kosmos.train.setup import Dist, build_model, make_optimizer
    from kosmos.train.state import read_optimizer_state

    cfg = load_train_config(
        None, ["tokenizer=unused", "data.sources=[{shards: [unused.tar]}]", f"run.output_dir={out}b", *sets]
    )
    model = build_model(cfg, tokenizer, device)
    model.load_state_dict(load_state_dict(path, device), strict=True)
    module = parallelize(model, cfg.parallel, device)
    optimizer = make_optimizer(model, cfg.optim)
    set_optimizer_state_dict(
        model, optimizer, read_optimizer_state(path), options=StateDictOptions(full_state_dict=True)
    )
    resumed = Trainer(cfg, model, module, optimizer, tokenizer, Dist(device=device), MetricsLogger(out, False, False))
    resumed.step = 4
    again = resumed.train_step([batches[4]])
    result["resumed_step5_loss"] = again.loss_sum / again.targets
    result["resume_matches"] = abs(result["resumed_step5_loss"] - result["step5_loss"]) <= 1e-3 * abs(
        result["step5_loss"]
    )
    del resumed, model, module, optimizer
    gc.collect()
    # Resume from the sharded checkpoint: load straight into the FSDP shards, after wrapping.
    from kosmos.model.checkpoint_dcp import load_sharded

    model = build_model(cfg, tokenizer, device)
    module = parallelize(model, cfg.parallel, device)
    optimizer = make_optimizer(model, cfg.optim)
    t0 = time.perf_counter()
    load_sharded(sharded_path, model, optimizer)
    result["sharded_load_s"] = round(time.perf_counter() - t0, 2)
    resumed = Trainer(cfg, model, module, optimizer, tokenizer, Dist(device=device), MetricsLogger(out, False, False))
    resumed.step = 4
    again = resumed.train_step([batches[4]])
    result["sharded_resumed_step5_loss"] = again.loss_sum / again.targets
    result["sharded_resume_matches"] = abs(result["sharded_resumed_step5_loss"] - result["step5_loss"]) <= 1e-3 * abs(
        result["step5_loss"]
    )
    dist.destroy_process_group()
    return result


def run(device: str) -> dict:
    stubbed = _stub_shard_readers()
    import torch

    from kosmos.data.tokenizer import KosmosTokenizer

    smoke = os.environ.get("TRAINER_GPU_SMOKE") == "1"
    size = "tiny" if smoke else os.environ.get("TRAINER_GPU_SIZE", "kosmos2-base")
    dev = torch.device("cuda:0" if device.startswith("cuda") else "cpu")
    words = ["a", "red", "circle", "blue", "square", "green", "triangle", "on", "the", "grey", "background", "of"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(200)]
    tokenizer = KosmosTokenizer.train(texts, vocab_size=300)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = check_tiny(tokenizer, dev, Path(tmp))
        large = check_large(tokenizer, dev, Path(tmp), size)
    ok = all(tiny[k] for k in ("loss_fell", "poisoned_step_skipped", "weights_unchanged_by_skipped_step",
                               "checkpoint_round_trip_exact")) and large["resume_matches"] \
        and large["sharded_resume_matches"]  # fmt: skip
    return {"stubbed_modules": stubbed, "smoke": smoke, "tiny": tiny, "large": large, "all_checks_pass": ok}
