"""Training-time switches applied from outside the model: a frozen vision tower (whole or all but its last blocks),
activation checkpointing (whole blocks, or selective: matmul and attention outputs kept), per-block
``torch.compile``, and data parallelism (DDP, or FSDP2 ``fully_shard`` per
block). The model and its config know nothing of them: a saved ``config.json`` stays the architecture.

Order matters and follows torchtitan: checkpointing lives inside each block, compilation replaces each block's
``forward`` (module hooks, FSDP's included, stay eager around it), and FSDP shards every block and then the root,
which keeps the embeddings, tied to the LM head, in one unit. Parameter names are unchanged by all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from kosmos.model.model import KosmosModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ParallelConfig:
    data_parallel: Literal["none", "ddp", "fsdp"] = "none"  # ddp and fsdp need an initialised process group
    activation_checkpointing: bool = False  # recompute each vision and decoder block in backward
    # "full": keep only each block's input; "selective": keep the outputs of matmuls and attention (the costly
    # ops) and recompute the LayerNorms, activations and dropouts: most of the memory saving, little recompute.
    checkpoint_policy: Literal["full", "selective"] = "full"
    compile: bool = False  # torch.compile each block; identical blocks share one compiled graph
    # "blocks": each block compiled (the generation path stays usable); "model": the trainer compiles its whole
    # training forward + loss as one graph (no host syncs inside), leaving the blocks eager here.
    compile_scope: Literal["blocks", "model"] = "blocks"
    # e.g. "bfloat16": gather and compute in bf16, keep fp32 master weights
    fsdp_param_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    fsdp_reduce_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # gradient reduce-scatter precision
    fsdp_reshard_after_forward: bool = True  # False trades memory for one all-gather less per block
    ddp_find_unused_parameters: bool = False  # True when some batches leave parameters unused (text-only batches)


def parallelize(model: KosmosModel, cfg: ParallelConfig, device: torch.device | str | None = None) -> nn.Module:
    """Apply ``cfg`` to ``model`` (on its final device) and return the module to train.

    DDP returns a wrapper (the model is ``wrapper.module``); FSDP and the rest modify ``model`` in place and return it.
    """
    if cfg.activation_checkpointing and cfg.checkpoint_policy == "selective":
        apply_selective_checkpointing(model)
    elif cfg.activation_checkpointing:
        set_activation_checkpointing(model, True)
    if cfg.compile and cfg.compile_scope == "blocks":
        compile_blocks(model)
    if cfg.data_parallel == "fsdp":
        apply_fsdp(model, cfg)
    elif cfg.data_parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = torch.device(device) if device is not None else next(model.parameters()).device
        ids = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else None
        )
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=cfg.ddp_find_unused_parameters)
    return model


def _blocks(model: KosmosModel) -> list[nn.Module]:
    return [*model.vision.blocks, *model.blocks]


def freeze_vision(model: KosmosModel, trainable_blocks: int = 0) -> None:
    """No gradients into the vision tower except its last ``trainable_blocks`` blocks (and ``ln_post`` when that is
    at least one); ``-1`` trains the whole tower again. A fully frozen tower records no autograd graph."""
    blocks = list(model.vision.blocks)
    if trainable_blocks < 0:
        model.vision.requires_grad_(True)
        return
    if trainable_blocks > len(blocks):
        raise ValueError(f"{trainable_blocks} trainable vision blocks asked, the vision tower has {len(blocks)}")
    model.vision.requires_grad_(False)
    for block in blocks[len(blocks) - trainable_blocks :]:
        block.requires_grad_(True)
    model.vision.ln_post.requires_grad_(trainable_blocks > 0)


def set_activation_checkpointing(model: KosmosModel, enabled: bool = True) -> None:
    """Recompute every vision and decoder block in backward (inside the block, so FSDP units stay outside)."""
    for block in _blocks(model):
        block.checkpointing = enabled


def _selective_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    saved = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution.default}
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        if hasattr(aten, name):
            saved.add(getattr(aten, name).default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_selective_checkpointing(model: KosmosModel) -> None:
    """Recompute each block's cheap ops in backward, keeping its matmul and attention outputs (op-level selective
    activation checkpointing). Wraps each block's ``forward`` (parameter names unchanged); decoding with a KV
    cache and evaluation run the block as is."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    context_fn = partial(create_selective_checkpoint_contexts, _selective_policy())
    for block in _blocks(model):
        inner = block.forward

        def forward(*args, _inner=inner, _block=block, **kwargs):
            cache = kwargs.get("cache", args[4] if len(args) > 4 else None)
            if not (_block.training and torch.is_grad_enabled()) or cache is not None:
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        block.forward = forward


def compile_blocks(model: KosmosModel) -> None:
    """Compile every block's forward. Blocks are compiled rather than the whole model so that compile time does not
    grow with depth and the KV-cache/generation path, which runs the same blocks, stays usable."""
    for block in _blocks(model):
        block.forward = torch.compile(block.forward)


def apply_fsdp(model: KosmosModel, cfg: ParallelConfig) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(
        param_dtype=_DTYPES[cfg.fsdp_param_dtype] if cfg.fsdp_param_dtype else None,
        reduce_dtype=_DTYPES[cfg.fsdp_reduce_dtype],
    )
    for block in _blocks(model):
        fully_shard(block, mp_policy=mp, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=cfg.fsdp_reshard_after_forward)
