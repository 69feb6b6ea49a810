"""``kosmos train`` on the tiny size, CPU: exact resume, non-finite steps, interrupted checkpoint writes.

Every run here is a few steps of batch 8 on the shapes corpus; they check the run's bookkeeping, not learning
(tests/kosmos/test_learning.py does that).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
from train_runs import last_json_line, read_metrics, train_args

from kosmos.cli import main
from kosmos.model.checkpoint import load_model, load_state_dict
from kosmos.train.state import latest_checkpoint, read_trainer_state

SMALL = ("data.batch_size=8", "run.log_every=1", "model.overrides.text.dropout=0.1", "data.shuffle_initial=64")


def run_train(shapes, out: Path, *sets: str, resume: bool = False) -> int:
    args = train_args(shapes["tokenizer"], shapes["train"], out, *SMALL, *sets)
    return main(args + (["--resume"] if resume else []))


def test_a_resumed_run_matches_an_uninterrupted_one(shapes, tmp_path, capsys):
    """Stopped after step 5 and resumed, the run gives the same loss and gradient norm at every step, and the same
    weights at the end, bit for bit: model, AdamW state, schedule, data position and RNG states (dropout is on,
    one DataLoader worker) all continue exactly."""
    common = ("run.max_steps=12", "run.checkpoint_every=4", "data.num_workers=1")
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_train(shapes, full, *common) == 0
    assert run_train(shapes, part, *common, "run.stop_at_step=5") == 0
    assert latest_checkpoint(part).name == "step_00000005"
    assert run_train(shapes, part, *common, resume=True) == 0
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    assert a[-1]["loss"] < a[0]["loss"]
    wa, wb = load_state_dict(latest_checkpoint(full)), load_state_dict(latest_checkpoint(part))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # A used run folder is not trained into again by accident.
    capsys.readouterr()
    assert run_train(shapes, full, *common) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_a_non_finite_step_is_skipped_and_counted(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(shapes, out, "run.max_steps=5", "data.num_workers=0", "fault.poison_batches=[2]") == 0
    summary = last_json_line(capsys.readouterr().out)
    assert summary["step"] == 5 and summary["nonfinite_skipped"] == 1
    skips = read_metrics(out, "skip")
    assert [s["step"] for s in skips] == [3] and len(skips[0]["keys"]) == 8
    train = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert all(r["loss"] == r["loss"] and r["nonfinite_skipped"] == (r["step"] >= 3) for r in train)
    state = read_trainer_state(latest_checkpoint(out))
    assert state["batches_drawn"] == 6 and state["nonfinite_skipped"] == 1
    # The poisoned batch changed nothing: the weights stayed finite.
    assert all(torch.isfinite(t).all() for t in load_state_dict(latest_checkpoint(out)).values())


def test_repeated_non_finite_steps_stop_the_run_naming_step_and_keys(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    sets = (
        "run.max_steps=6",
        "data.num_workers=0",
        "fault.poison_batches=[2, 3, 4]",
        "run.max_consecutive_nonfinite=3",
    )
    assert run_train(shapes, out, *sets) == 1
    err = capsys.readouterr().err
    assert "stopping at step 3: 3 consecutive steps with a non-finite loss or gradient" in err
    keys = read_metrics(out, "skip")[-1]["keys"]
    assert len(keys) == 8 and all(re.fullmatch(r"train\d{6}", k) for k in keys)
    assert f"sample keys {keys}" in err


def test_a_failed_checkpoint_write_keeps_the_last_good_one(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    sets = ("run.max_steps=6", "run.checkpoint_every=2", "data.num_workers=0")
    assert run_train(shapes, out, *sets, "fault.checkpoint_fault_step=4") == 1
    err = capsys.readouterr().err
    assert "writing the checkpoint of step 4 failed" in err and "step_00000002" in err
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    load_model(root / "step_00000002")  # whole and loadable
    assert run_train(shapes, out, *sets, resume=True) == 0
    assert latest_checkpoint(out).name == "step_00000006"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_sigkill_during_a_checkpoint_write_then_resume(shapes, tmp_path):
    """The process is killed after the model file of step 4 is written: ``latest`` still names step 2, whose files
    are intact; the resumed run removes the half-written folder and finishes."""
    out = tmp_path / "run"
    sets = ("run.max_steps=6", "run.checkpoint_every=2", "data.num_workers=1")
    args = train_args(shapes["tokenizer"], shapes["train"], out, *SMALL, *sets)
    args += ["--set", "fault.checkpoint_fault_step=4", "--set", "fault.checkpoint_fault=kill"]
    proc = subprocess.run([sys.executable, "-m", "kosmos", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = out / "checkpoints"
    partial = root / ".tmp-step_00000004"
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert (root / "latest").read_text().strip() == "step_00000002"
    state = read_trainer_state(root / "step_00000002")
    assert state["step"] == 2 and json.loads((root / "step_00000002" / "rank0.json").read_text())["data"]
    assert run_train(shapes, out, *sets, resume=True) == 0
    assert not partial.exists()
    assert latest_checkpoint(out).name == "step_00000006"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_sigterm_finishes_the_step_saves_and_stops(shapes, tmp_path):
    """A pre-emption notice: the run saves a checkpoint at the step it was on, exits 1, and resumes from it."""
    out = tmp_path / "run"
    sets = ("run.max_steps=100000", "run.log_every=5", "data.num_workers=1")
    args = train_args(shapes["tokenizer"], shapes["train"], out, *SMALL, *sets)
    proc = subprocess.Popen([sys.executable, "-m", "kosmos", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("step 10/"):
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-2000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+); checkpoint (step_\d+) is saved", err)
    assert stopped, err[-2000:]
    assert int(stopped.group(1)) >= 10 and latest_checkpoint(out).name == stopped.group(2)
    step = int(stopped.group(1))
    assert run_train(shapes, out, *sets, f"run.stop_at_step={step + 2}", resume=True) == 0
    assert latest_checkpoint(out).name == f"step_{step + 2:08d}"
