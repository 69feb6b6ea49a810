"""One rank of the sharded-checkpoint tests, started by torchrun (gloo, CPU): the tiny model sharded by FSDP2,
a few AdamW steps on fixed per-rank batches, then a sharded save (``save``) or a sharded load and more steps
(``resume``). Rank 0 also writes the full model and optimizer state it gathers, as the reference the tests compare
with, and each rank writes its losses to ``OUT/MODE_rank<r>.json``.

    torchrun --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT dcp_worker.py MODE OUT STEPS
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from kosmos.model.checkpoint_dcp import load_sharded, save_sharded
from kosmos.model.parallelize import ParallelConfig, parallelize
from kosmos.model.registry import create_model
from kosmos.train.state import optimizer_state_to_files, write_json


def batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    """The same batch for (step, rank) in every run; images in every row, targets after the image slots."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(3, 1000, (2, 24), generator=g)
    ids[:, 0] = 0
    mask = torch.zeros_like(ids)
    mask[:, 1:17] = 1
    labels = ids.masked_fill(mask.bool(), -100)
    labels[:, 0] = -100
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    return {"pixel_values": pixels, "input_ids": ids, "image_embeds_position_mask": mask, "labels": labels}


def main() -> None:
    mode, out, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = create_model("tiny", text={"dropout": 0.0, "attention_dropout": 0.0})
    parallelize(model, ParallelConfig(data_parallel="fsdp"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    start = 0
    if mode == "resume":
        load_sharded(out / "ckpt", model, optimizer)
        start = json.loads((out / "ckpt" / "step.json").read_text())["step"]
    losses = []
    for step in range(start, start + steps):
        loss = model(**batch(step, rank)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    if mode == "save":
        save_sharded(out / "ckpt", model, optimizer, rank=rank, world_size=world)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(model, options=options)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(out / "full_model.safetensors"))
            tensors, meta = optimizer_state_to_files(optim_sd)
            save_file(tensors, str(out / "full_optim.safetensors"))
            write_json(out / "full_optim.json", meta)
            write_json(out / "ckpt" / "step.json", {"step": start + steps})
    dist.barrier()
    write_json(out / f"{mode}_rank{rank}.json", {"rank": rank, "world_size": world, "losses": losses})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # As ``kosmos train`` does: skip interpreter finalization, which can abort while a gloo worker thread still
    # releases the tensors of the last collective.
    sys.stdout.flush()
    os._exit(0)
