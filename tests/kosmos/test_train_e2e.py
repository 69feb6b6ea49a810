"""End to end, as a user runs it: a corpus made by ``grit build`` (the shapes fixture: generated input through the
``annotations`` source), then ``kosmos tokenizer train``, ``kosmos train`` (tiny, CPU, a few dozen steps),
``kosmos generate`` and ``kosmos eval`` on its checkpoint; every output parses."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from shapes_corpus import scenes
from train_runs import last_json_line, read_metrics, train_args

from kosmos.cli import main


def test_corpus_to_grounded_model(shapes, tmp_path, capsys):
    manifest = json.loads((Path(shapes["corpus"]) / "manifest.json").read_text())
    assert manifest["detector"]["kind"] == "annotations"

    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--shards", shapes["wiring"], "--vocab-size", "280", "--out", str(tok)]) == 0
    assert last_json_line(capsys.readouterr().out)["texts"] == 64

    out = tmp_path / "run"
    sets = (
        "run.max_steps=40",
        "run.log_every=5",
        "run.checkpoint_every=20",
        "data.batch_size=16",
        "run.tensorboard=true",
    )
    assert main(train_args(str(tok), shapes["wiring"], out, *sets)) == 0
    summary = last_json_line(capsys.readouterr().out)
    assert summary["step"] == 40 and summary["checkpoint"].endswith("step_00000040")
    assert summary["data_counts"]["kept"] == summary["samples_seen"] == 640
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000020", "step_00000040"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "weight_change.json").read_text())["problems"] == []

    image, _, _ = scenes(1, seed=123)[0]
    image.save(tmp_path / "scene.png")
    args = [
        "generate",
        "--checkpoint",
        str(out),
        "--image",
        str(tmp_path / "scene.png"),
        "--out",
        str(tmp_path / "b.png"),
    ]
    assert main(args) == 0
    generated = last_json_line(capsys.readouterr().out)
    assert {"text", "generated", "entities", "image_out"} <= set(generated)
    assert Image.open(tmp_path / "b.png").size == image.size

    assert main(["eval", "--checkpoint", str(out), "--shards", shapes["heldout"], "--max-samples", "20"]) == 0
    result = last_json_line(capsys.readouterr().out)
    assert result["samples"] == 20 and result["loss"] > 0 and 0 <= result["accuracy"] <= 1
