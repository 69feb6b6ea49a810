"""Setting up a training run: processes and devices, tokenizer, model (fresh, from a checkpoint, with CLIP weights),
AdamW parameter groups and the learning-rate schedule. Pure functions of the config, used by :mod:`kosmos.train.loop`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from grit_core.config import ConfigError
from kosmos.data.tokenizer import KosmosTokenizer
from kosmos.model.checkpoint import load_model
from kosmos.model.init import apply_init
from kosmos.model.model import KosmosModel
from kosmos.model.parallelize import freeze_vision
from kosmos.model.registry import create_model
from kosmos.train.config import OptimConfig, TrainConfig
from kosmos.train.state import resolve_tokenizer_dir

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Rank, world size and device from torchrun's environment; the process group when there are several ranks
    (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("run.device asks for CUDA but no GPU is visible")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        owns = True
    return Dist(rank, world, local, dev, owns)


def load_tokenizer(cfg: TrainConfig) -> KosmosTokenizer:
    path = cfg.tokenizer or str(resolve_tokenizer_dir(cfg.model.checkpoint))
    return KosmosTokenizer.from_pretrained(path)


def build_model(cfg: TrainConfig, tokenizer: KosmosTokenizer, device: torch.device) -> KosmosModel:
    """The model of ``cfg.model``, on ``device``: a fresh one sized to the tokenizer, or a checkpoint's; with the
    vision tower frozen in whole or in part as configured."""
    model = _initial_model(cfg, tokenizer, device)
    k = cfg.model.vision_trainable_blocks
    if k > len(model.vision.blocks):
        raise ConfigError(
            f"model.vision_trainable_blocks is {k}; the vision tower has {len(model.vision.blocks)} blocks"
        )
    if cfg.model.freeze_vision or k >= 0:
        freeze_vision(model, trainable_blocks=max(k, 0))
    return model


def _initial_model(cfg: TrainConfig, tokenizer: KosmosTokenizer, device: torch.device) -> KosmosModel:
    m = cfg.model
    overrides = dict(m.overrides)
    if m.init == "checkpoint":
        model = load_model(m.checkpoint, device=device, **overrides)
        c = model.config
        if tokenizer.vocab_size > c.text.vocab_size or tokenizer.loc_token_start != c.loc_token_start:
            raise ConfigError(
                f"tokenizer (vocabulary {tokenizer.vocab_size}, <patch_index_0000> = {tokenizer.loc_token_start}) "
                f"does not fit the checkpoint (vocabulary {c.text.vocab_size}, locations at {c.loc_token_start})"
            )
        return model
    if m.clip_vision and m.connector_init == "block_pool":
        raise ConfigError("model.connector_init: block_pool is for a random vision tower; with clip_vision use random")
    text = {**overrides.pop("text", {}), "vocab_size": tokenizer.vocab_size}
    with torch.device(device):
        model = create_model(m.size, text=text, loc_token_start=tokenizer.loc_token_start, **overrides)
        apply_init(model, connector=m.connector_init, loc_embed=m.loc_embed_init)
    if m.clip_vision:
        from kosmos.model.hf import load_clip_vision

        loaded = load_clip_vision(model, m.clip_vision)
        log.info("vision tower: %d tensors from %s", loaded, m.clip_vision)
    return model


def param_groups(model: KosmosModel, cfg: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and embeddings only; the vision tower at ``vision_lr_scale``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not name.endswith("class_embedding")
        vision = name.startswith("vision.")
        groups.setdefault((vision, decay), []).append(p)
    out = []
    for (vision, decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr_scale": cfg.vision_lr_scale if vision else 1.0,
                "lr": cfg.lr,
            }
        )
    return out


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``lr`` for update number ``step`` (1-based): linear warm-up, then linear decay to 0 at
    ``max_steps`` (or constant)."""
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    return max(0.0, (max_steps - step) / span)


def make_optimizer(model: KosmosModel, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if not groups:
        raise ConfigError("no trainable parameters: everything is frozen")
    kwargs: dict[str, Any] = {"betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)
