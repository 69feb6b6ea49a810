"""Does the tiny model learn to ground? On the synthetic shapes corpus (tests/kosmos/shapes_corpus.py), where the
caption never says where a shape is, only the image can give the box.

- Wiring: trained on 64 scenes until it fits them, the model grounds their phrases (IoU >= 0.5) at least 80% of
  the time; scored with the images shuffled among the captions it falls to about the mean-box baseline. Boxes,
  location tokens, loss mask, image embeddings and decoding fit together.
- Generalisation: trained on 3,000 scenes (800 steps of 32, about a minute on two cores), it grounds phrases of
  200 held-out scenes at least twice as often as the better of the mean-box and centred-box baselines.

Both use the from-scratch recipe of configs/train/tiny-cpu.yaml (block_pool connector, sin-cos location embeddings,
vision tower frozen at random initialisation). Step counts are fixed, so the results do not depend on the machine.
"""

from __future__ import annotations

import glob
import json
import tarfile

from train_runs import last_json_line, read_metrics, train_args

from kosmos.cli import main
from kosmos.eval.grounding import best_iou


def record_boxes(pattern: str) -> list[list[tuple]]:
    """Each phrase's boxes, read straight from the shards' records (the test's own baseline, not the eval code's)."""
    out = []
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    spans: dict = {}
                    for start, end, *box, _ in record["ref_exps"]:
                        spans.setdefault((start, end), []).append(tuple(box))
                    out.extend(spans.values())
    return out


def baselines(targets: list[list[tuple]]) -> dict[str, float]:
    n = len(targets)
    mean = tuple(sum(t[0][i] for t in targets) / n for i in range(4))
    w = sum(t[0][2] - t[0][0] for t in targets) / n
    h = sum(t[0][3] - t[0][1] for t in targets) / n
    centred = (0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2)
    return {
        name: sum(best_iou(box, t) >= 0.5 for t in targets) / n for name, box in (("mean", mean), ("centred", centred))
    }


def evaluate(capsys, checkpoint, shards: str, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--shards", shards, *extra]) == 0
    return last_json_line(capsys.readouterr().out)


def test_wiring_the_model_fits_a_small_set_and_needs_its_images(shapes, wiring_run, capsys):
    base = baselines(record_boxes(shapes["wiring"]))
    fitted = evaluate(capsys, wiring_run, shapes["wiring"])
    shuffled = evaluate(capsys, wiring_run, shapes["wiring"], "--shuffle-images")
    assert fitted["phrases"] == 64
    assert fitted["baselines"]["mean_box"] == base["mean"]  # the eval's baseline is the one computed here
    assert fitted["accuracy"] >= 0.8, fitted
    assert shuffled["accuracy"] <= base["mean"] + 0.1, (shuffled, base)
    assert shuffled["loss"] > fitted["loss"]


def test_generalisation_to_held_out_scenes(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["run.max_steps=800", f"eval.shards=['{shapes['heldout']}']", "eval.every=200", "run.checkpoint_every=800"]
    assert main(train_args(shapes["tokenizer"], shapes["train"], out, *sets)) == 0
    curve = read_metrics(out, "eval")
    assert [r["step"] for r in curve] == [200, 400, 600, 800]
    base = baselines(record_boxes(shapes["heldout"]))
    best_baseline = max(base.values())
    final = evaluate(capsys, out, shapes["heldout"])
    assert final["accuracy"] == curve[-1]["accuracy"]  # the CLI and the in-training evaluation agree
    assert final["accuracy"] >= 2 * best_baseline, (final, base)
    shuffled = evaluate(capsys, out, shapes["heldout"], "--shuffle-images")
    assert shuffled["accuracy"] < final["accuracy"] / 2, shuffled
    train = read_metrics(out)
    assert train[-1]["loss"] < train[0]["loss"] / 4
