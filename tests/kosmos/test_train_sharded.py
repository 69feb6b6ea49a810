"""Sharded checkpoints in ``kosmos train``: two CPU ranks (gloo) under torchrun with a c10d rendezvous on loopback,
FSDP, ``run.checkpoint_format: sharded``. A SIGKILL during a save, then ``--resume``, gives the losses of the
uninterrupted run; one process (world size 1) reads the two-rank checkpoint for eval, generation and conversion."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_runs import read_metrics, train_args

from kosmos.model.checkpoint import load_model
from kosmos.model.checkpoint_dcp import is_sharded_checkpoint
from kosmos.train.state import latest_checkpoint, read_trainer_state

COMMON = (
    "run.max_steps=6", "run.log_every=1", "run.checkpoint_every=2", "data.batch_size=4", "data.num_workers=0",
    "run.threads=1", "parallel.data_parallel=fsdp", "run.checkpoint_format=sharded", "data.shuffle_initial=32",
    "model.overrides.text.dropout=0.1", "run.save_initial_weights=false",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(shapes, out: Path, *sets: str, resume: bool = False) -> subprocess.CompletedProcess:
    """Two ranks on one machine, launched as on several nodes: c10d rendezvous at a free loopback port."""
    args = train_args(shapes["tokenizer"], shapes["train"], out, *COMMON, *sets) + (["--resume"] if resume else [])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0",
        "-m", "kosmos",
    ]  # fmt: skip
    return subprocess.run(command + args, capture_output=True, text=True, timeout=400)


def summaries(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    found = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"step"')]
    return sorted(found, key=lambda s: s["rank"])


def test_kill_during_a_sharded_save_then_resume_matches_and_one_process_reads_it(shapes, tmp_path):
    whole = tmp_path / "whole"
    ranks = summaries(torchrun(shapes, whole))
    assert ranks[0]["param_checksum"] == pytest.approx(ranks[1]["param_checksum"], rel=1e-12)
    final = latest_checkpoint(whole)
    assert final.name == "step_00000006" and is_sharded_checkpoint(final)
    assert not (final / "model.safetensors").exists()  # nothing gathered
    assert sorted(p.name for p in (final / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    # Killed (SIGKILL, rank 0) in the save of step 4, after its shards were written: latest stays on step 2.
    cut = tmp_path / "cut"
    proc = torchrun(shapes, cut, "fault.checkpoint_fault_step=4", "fault.checkpoint_fault=kill")
    assert proc.returncode != 0
    root = cut / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert (root / ".tmp-step_00000004" / "dcp").is_dir()
    assert not (root / ".tmp-step_00000004" / "trainer_state.json").exists()
    assert read_trainer_state(root / "step_00000002")["step"] == 2
    summaries(torchrun(shapes, cut, resume=True))
    assert not (root / ".tmp-step_00000004").exists()
    expected, resumed = read_metrics(whole), read_metrics(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in expected], rel=1e-6)
    assert [r["grad_norm"] for r in resumed] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-5)

    # World size 1: the two-rank checkpoint loads whole into one process, with the weights the ranks trained.
    model = load_model(final)
    total = sum(float(p.detach().double().sum()) for p in model.parameters())
    assert total == pytest.approx(ranks[0]["param_checksum"], rel=1e-12)
    from kosmos.cli import main

    assert main(["eval", "--checkpoint", str(whole), "--shards", shapes["heldout"], "--max-samples", "8"]) == 0
    from safetensors.torch import load_file

    from kosmos.model.hf import convert_to_hf

    convert_to_hf(final, tmp_path / "hf")
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(hf["text_model.model.embed_tokens.weight"], model.embed_tokens.weight)


def test_one_process_asynchronous_sharded_checkpoints_resume_exactly(shapes, tmp_path):
    """World size 1 with asynchronous sharded saves: every checkpoint completes (named in ``latest`` once written),
    and a run stopped at step 3 and resumed matches the uninterrupted one bit for bit."""
    from kosmos.cli import main

    sets = (
        "run.max_steps=6", "run.checkpoint_every=2", "data.num_workers=1", "data.batch_size=8", "run.log_every=1",
        "run.checkpoint_format=sharded", "run.async_checkpoint=true", "model.overrides.text.dropout=0.1",
        "run.keep_checkpoints=3",
    )  # fmt: skip

    def run(out: Path, *more: str, resume: bool = False) -> int:
        args = train_args(shapes["tokenizer"], shapes["train"], out, *sets, *more)
        return main(args + (["--resume"] if resume else []))

    full, part = tmp_path / "full", tmp_path / "part"
    assert run(full) == 0
    names = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert names == ["latest", "step_00000002", "step_00000004", "step_00000006"]
    assert all(is_sharded_checkpoint(full / "checkpoints" / n) for n in names[1:])
    assert run(part, "run.stop_at_step=3") == 0
    assert latest_checkpoint(part).name == "step_00000003"
    assert run(part, resume=True) == 0
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = load_model(latest_checkpoint(full)).state_dict(), load_model(latest_checkpoint(part)).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow  # the CPU inductor build of the whole training graph takes about a minute on two cores
def test_whole_forward_and_loss_compiled_gives_the_eager_losses(shapes, tmp_path):
    from kosmos.cli import main

    sets = ("run.max_steps=3", "data.num_workers=0", "data.batch_size=4", "run.log_every=1", "data.pack=true")
    sets += ("model.overrides.text.dropout=0.0", "model.overrides.text.attention_dropout=0.0")
    runs = {}
    for name, more in {"eager": (), "compiled": ("parallel.compile=true", "parallel.compile_scope=model")}.items():
        out = tmp_path / name
        assert main(train_args(shapes["tokenizer"], shapes["train"], out, *sets, *more)) == 0
        runs[name] = [r["loss"] for r in read_metrics(out)]
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
