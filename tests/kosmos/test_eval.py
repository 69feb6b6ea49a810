"""``kosmos eval`` on held-out shards: its JSON, sample limits, bad samples counted, and clear errors."""

from __future__ import annotations

import io
import json
import tarfile

from shapes_corpus import scenes, write_shards
from train_runs import last_json_line

from kosmos.cli import main


def run_eval(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["eval", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_reports_loss_accuracy_and_baselines(shapes, wiring_run, tmp_path, capsys):
    out_file = tmp_path / "eval.json"
    code, out, _ = run_eval(capsys, "--checkpoint", str(wiring_run), "--shards", shapes["heldout"], "--max-samples",
                            "40", "--out", str(out_file))  # fmt: skip
    assert code == 0
    result = last_json_line(out)
    assert json.loads(out_file.read_text()) == result
    assert result["samples"] == 40 and 40 <= result["phrases"] <= 80
    assert result["loss"] > 0 and result["targets"] > 0 and 0 <= result["accuracy"] <= 1
    assert set(result["baselines"]) == {"mean_box", "centred_box"} and result["object_token_rate"] > 0.5
    assert result["checkpoint"].endswith("step_00000600") and result["counts"]["kept"] == 40


def test_eval_counts_bad_samples_and_goes_on(shapes, wiring_run, tmp_path, capsys):
    folder = tmp_path / "shards"
    (path,) = write_shards(folder, scenes(5, seed=9), per_shard=10, prefix="b")
    with tarfile.open(path, "a") as tar:  # one more sample whose image is not an image
        for name, data in (("bad.png", b"not a png"), ("bad.json", json.dumps({"caption": "a red circle"}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    code, out, _ = run_eval(capsys, "--checkpoint", str(wiring_run), "--shards", str(folder / "*.tar"))
    assert code == 0
    result = last_json_line(out)
    assert result["samples"] == 5 and result["counts"]["dropped_bad_image"] == 1


def test_eval_errors_are_clear(shapes, wiring_run, tmp_path, capsys):
    code, _, err = run_eval(capsys, "--checkpoint", str(wiring_run), "--shards", str(tmp_path / "none-*.tar"))
    assert code == 2 and "matches no file" in err
    code, _, err = run_eval(capsys, "--checkpoint", str(tmp_path), "--shards", shapes["heldout"])
    assert code == 2 and "no model" in err
