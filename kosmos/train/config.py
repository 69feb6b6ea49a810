"""The training config: typed dataclasses loaded from ``configs/train/*.yaml`` with ``--set a.b=c`` overrides
(``grit_core.config.load_config``). The resolved config is saved in the run folder and in every checkpoint.

Sections: ``model`` (size and initialisation), ``tokenizer``, ``data`` (:class:`kosmos.data.loader.DataConfig`),
``optim`` (the paper's AdamW recipe by default), ``parallel`` (:class:`kosmos.model.parallelize.ParallelConfig`),
``run`` (steps, precision, logging, checkpoints), ``eval`` (grounding accuracy on held-out shards during training)
and ``fault`` (test-only fault injection; empty in every shipped config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from grit_core.config import ConfigError, load_config
from kosmos.data.loader import DataConfig
from kosmos.model.parallelize import ParallelConfig

# Keys that older configs put in ``model.overrides`` (fields the model config no longer has) and where they live now.
LEGACY_OVERRIDES = {
    "freeze_vision": "model.freeze_vision",
    "connector_init": "model.connector_init",
    "loc_embed_init": "model.loc_embed_init",
    "gradient_checkpointing": "parallel.activation_checkpointing",
}


@dataclass
class ModelSection:
    """Which model and how its weights start.

    The from-scratch grounding recipe (docs/training.md) is ``connector_init: block_pool``, ``loc_embed_init:
    sincos`` and ``freeze_vision: true``: without it a small model trained from scratch learns to ignore the image.
    These are run settings, applied to the model from outside (``kosmos.model.init``, ``kosmos.model.parallelize``);
    the model's own config, saved with every checkpoint, stays the architecture.
    """

    size: str = "tiny"  # a kosmos.model.registry name: tiny | kosmos2-base | kosmos2-1.6b (not with init: checkpoint)
    init: Literal["scratch", "checkpoint"] = "scratch"  # checkpoint: a kosmos folder (e.g. `kosmos convert` output)
    checkpoint: str = ""  # the folder for init: checkpoint
    clip_vision: str = ""  # a Hugging Face CLIP (vision) folder loaded into the vision tower of a scratch model
    freeze_vision: bool = False  # no gradients into the vision tower (see also optim.vision_lr_scale)
    # Train only the last k vision blocks (and ln_post), the rest frozen; -1: all (unless freeze_vision). Kosmos-1,
    # which Kosmos-2 continued from, kept CLIP frozen except its last layer.
    vision_trainable_blocks: int = -1
    connector_init: Literal["random", "block_pool"] = "random"  # scratch only: "random" is HF's initialisation
    loc_embed_init: Literal["random", "sincos"] = "random"  # scratch only
    # Any other KosmosConfig (architecture) field, e.g. {text: {dropout: 0.0}}. With init: checkpoint only fields
    # that leave the weights' shapes alone (dropout) make sense.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and decay: the paper's recipe (appendix table 7) as defaults."""

    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01  # on weight matrices and embeddings; biases and LayerNorms get none
    warmup_steps: int = 375
    decay: Literal["linear", "constant"] = "linear"  # linear: to 0 at run.max_steps; constant: hold lr after warm-up
    grad_clip: float = 2.0  # global gradient-norm clip; 0 disables clipping (the norm is still logged)
    # Learning rate of a trainable vision tower relative to lr (e.g. 0.1 for a pretrained CLIP tower).
    vision_lr_scale: float = 1.0
    fused: bool = False  # fused AdamW kernel (CUDA); the default foreach implementation runs everywhere


@dataclass
class RunConfig:
    output_dir: str = "runs/kosmos"
    max_steps: int = 60000  # optimizer updates; the schedule decays to 0 here
    stop_at_step: int = 0  # stop early (with a checkpoint) at this step, the schedule unchanged; 0: max_steps
    grad_accum: int = 1  # micro-batches (data.batch_size rows each, per rank) per update
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast to bf16, fp32 master weights and optimizer state
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if CUDA is there, else cpu) | "cpu" | "cuda"
    seed: int = 0
    threads: int = 0  # torch intra-op threads per process; 0: torch's default
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower kernels on GPU)
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # most recent checkpoints kept (the final one always is)
    # "full": model and optimizer gathered on rank 0 into one safetensors file each; "sharded": every rank writes
    # its own shards with torch.distributed.checkpoint (no gathering; loads reshard to another world size).
    checkpoint_format: Literal["full", "sharded"] = "full"
    async_checkpoint: bool = False  # sharded only: write in the background; the checkpoint completes later
    tensorboard: bool = True
    # A step whose loss or gradient norm is not finite is skipped and counted; this many in a row stop the run.
    max_consecutive_nonfinite: int = 5
    # Save the initial weights (scratch init) so that the end-of-run weight-change summary has a reference.
    save_initial_weights: bool = True


@dataclass
class EvalConfig:
    """Grounding accuracy and loss on held-out shards during training (logged as kind "eval")."""

    shards: list[str] = field(default_factory=list)
    every: int = 0  # steps between evaluations; 0: never during training (one at the end when shards are given)
    max_samples: int = 200
    batch_size: int = 32


@dataclass
class FaultConfig:
    """Test-only fault injection, so that the recovery paths can be exercised. Empty in real runs."""

    poison_batches: list[int] = field(default_factory=list)  # 0-based batch draws whose pixels become NaN
    checkpoint_fault_step: int = 0  # the checkpoint write of this step fails part-way
    checkpoint_fault: Literal["raise", "kill"] = "raise"  # raise: an exception; kill: SIGKILL of the process


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    # Tokenizer folder (`kosmos tokenizer train` output or a Hugging Face Kosmos-2 folder). Empty with
    # init: checkpoint: the tokenizer beside the checkpoint's weights.
    tokenizer: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        m, o, r = self.model, self.optim, self.run
        if m.init == "checkpoint" and not m.checkpoint:
            raise ConfigError("model.init is 'checkpoint' but model.checkpoint is empty")
        if m.init == "scratch" and not self.tokenizer:
            raise ConfigError("tokenizer is empty: a model trained from scratch needs a tokenizer folder")
        if m.vision_trainable_blocks >= 0 and m.freeze_vision:
            raise ConfigError("model.vision_trainable_blocks and model.freeze_vision: true contradict each other")
        if len(o.betas) != 2:
            raise ConfigError(f"optim.betas must hold two numbers, got {o.betas}")
        if r.max_steps < 1 or r.grad_accum < 1 or r.log_every < 1 or r.checkpoint_every < 1:
            raise ConfigError("run.max_steps, run.grad_accum, run.log_every and run.checkpoint_every must be >= 1")
        if not 0 <= r.stop_at_step <= r.max_steps:
            raise ConfigError(f"run.stop_at_step must be in [0, run.max_steps], got {r.stop_at_step}")
        if r.max_consecutive_nonfinite < 1:
            raise ConfigError("run.max_consecutive_nonfinite must be >= 1")
        if r.async_checkpoint and r.checkpoint_format != "sharded":
            raise ConfigError("run.async_checkpoint needs run.checkpoint_format: sharded")
        try:
            self.data.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The config at ``path`` (None: defaults) with ``key=value`` overrides, validated."""
    cfg = load_config(TrainConfig, path, overrides)
    migrate_legacy_overrides(cfg)
    cfg.validate()
    return cfg


def migrate_legacy_overrides(cfg: TrainConfig) -> None:
    """Move run flags that older configs set in ``model.overrides`` to their own fields (``LEGACY_OVERRIDES``).

    Raises :class:`ConfigError` when a flag's value is of the wrong kind or contradicts the field it moves to."""
    choices = {"connector_init": ("random", "block_pool"), "loc_embed_init": ("random", "sincos")}
    for key, target in LEGACY_OVERRIDES.items():
        if key not in cfg.model.overrides:
            continue
        value = cfg.model.overrides.pop(key)
        allowed = choices.get(key, (True, False))
        if value not in allowed or (key not in choices and not isinstance(value, bool)):
            raise ConfigError(f"model.overrides.{key}: {value!r} is not one of {allowed} (now the setting {target})")
        section, name = target.split(".")
        holder = getattr(cfg, section)
        current, default = getattr(holder, name), getattr(type(holder)(), name)
        if current not in (default, value):
            raise ConfigError(f"model.overrides.{key}={value!r} contradicts {target}={current!r}")
        setattr(holder, name, value)
