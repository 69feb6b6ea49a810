"""Sharded (DCP) checkpoints: exact round trips, resharding from two FSDP ranks to one process, exact resume, and a
metadata file that names foreign code refused."""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kosmos.model.checkpoint_dcp import (
    DCP_DIR,
    DcpCheckpointError,
    is_sharded_checkpoint,
    load_full_model_state,
    load_sharded,
    save_sharded,
)
from kosmos.model.registry import create_model
from kosmos.train.state import read_optimizer_state

WORKER = Path(__file__).with_name("dcp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(mode: str, out: Path, steps: int, nproc: int = 2) -> list[float]:
    """Run the worker on ``nproc`` ranks with a c10d rendezvous on loopback; return the losses (equal on every
    rank, as they are all-reduced)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        str(WORKER), mode, str(out), str(steps),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((out / f"{mode}_rank{r}.json").read_text()) for r in range(nproc)]
    assert sorted(r["rank"] for r in ranks) == list(range(nproc))
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks)
    return ranks[0]["losses"]


def trained_tiny(steps: int = 2):
    torch.manual_seed(0)
    model = create_model("tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(3, 1000, (2, 30), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()  # text only: the vision tower gets no gradient
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key, fields in a["state"].items():
        assert fields.keys() == b["state"][key].keys()
        for name, value in fields.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][key][name])), (key, name)
    assert a["param_groups"] == b["param_groups"]


def test_single_process_round_trip_is_exact(tmp_path):
    model, optimizer = trained_tiny()
    save_sharded(tmp_path, model, optimizer)
    assert is_sharded_checkpoint(tmp_path)
    torch.manual_seed(1)
    fresh = create_model("tiny")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5.0)  # hyper-parameters come from the checkpoint
    load_sharded(tmp_path, fresh, fresh_opt)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert_same_optimizer(optimizer.state_dict(), fresh_opt.state_dict())
    # Parameters without a gradient so far (the vision tower) have no AdamW state, before and after.
    assert len(fresh_opt.state) == len(optimizer.state) < len(list(model.parameters()))
    full = load_full_model_state(tmp_path)
    assert full.keys() == model.state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in model.state_dict().items())


def test_metadata_naming_foreign_code_is_refused(tmp_path):
    model, optimizer = trained_tiny(1)
    save_sharded(tmp_path, model, optimizer)

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / DCP_DIR / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(DcpCheckpointError, match="posix.system|os.system|refused"):
        load_full_model_state(tmp_path)
    with pytest.raises(DcpCheckpointError):
        load_sharded(tmp_path, create_model("tiny"))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / DCP_DIR / ".metadata").write_bytes(b"\x80\x05truncated")
    with pytest.raises(DcpCheckpointError, match="unreadable"):
        load_full_model_state(tmp_path)


def test_model_of_another_shape_is_refused(tmp_path):
    model, optimizer = trained_tiny(1)
    save_sharded(tmp_path, model, optimizer)
    other = create_model("tiny", text={"ffn_dim": 128})
    with pytest.raises(DcpCheckpointError, match="does not fit"):
        load_sharded(tmp_path, other)


def test_two_fsdp_ranks_reshard_to_one_process_and_resume_exactly(tmp_path):
    # Uninterrupted: 4 steps on 2 ranks. Interrupted: 2 steps, a sharded save, a new pair of processes that loads it
    # and runs 2 more. Same losses.
    whole = torchrun("save", tmp_path / "whole", 4)
    first = torchrun("save", tmp_path / "cut", 2)
    second = torchrun("resume", tmp_path / "cut", 2)
    assert first + second == pytest.approx(whole, rel=1e-6, abs=1e-7)
    assert len(set(whole)) == 4  # the loss moves: the resumed steps are real updates

    # World size 1 reads the world-size-2 checkpoint: the full model, and model + optimizer resharded into one
    # plain process, equal to what the two ranks gathered.
    ckpt = tmp_path / "cut" / "ckpt"
    assert sorted(p.name for p in (ckpt / DCP_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    reference = load_file(str(tmp_path / "cut" / "full_model.safetensors"))
    full = load_full_model_state(ckpt)
    assert full.keys() == reference.keys()
    assert all(torch.equal(full[k], reference[k]) for k in reference)

    model = create_model("tiny", text={"dropout": 0.0, "attention_dropout": 0.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    load_sharded(ckpt, model, optimizer)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full_optim = read_optimizer_state_from(tmp_path / "cut")
    assert_same_optimizer(get_optimizer_state_dict(model, optimizer), full_optim)


def read_optimizer_state_from(folder: Path) -> dict:
    # The worker wrote the gathered optimizer state in the single-file checkpoint's layout.
    (folder / "optimizer.safetensors").write_bytes((folder / "full_optim.safetensors").read_bytes())
    (folder / "optimizer.json").write_text((folder / "full_optim.json").read_text())
    return read_optimizer_state(folder)
