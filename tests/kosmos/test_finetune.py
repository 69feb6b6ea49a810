"""Fine-tuning a converted Hugging Face Kosmos-2 (docs/fine-tuning.md in miniature): a tiny
``Kosmos2ForConditionalGeneration`` saved with its processor files, ``kosmos convert --from-hf``, then
``kosmos train --config configs/train/finetune-kosmos2.yaml``; the weight-change summary and
``kosmos diff-checkpoints`` show the frozen vision tower unchanged and the rest trained."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_runs import REPO, last_json_line, train_args

from kosmos.cli import main
from kosmos.data.tokenizer import KosmosTokenizer


@pytest.fixture(scope="module")
def converted(hf_folders, tmp_path_factory):
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    root = tmp_path_factory.mktemp("finetune")
    tokenizer = KosmosTokenizer.from_pretrained(hf_folders["kosmos2"])
    text = dict(vocab_size=tokenizer.vocab_size, embed_dim=32, layers=2, ffn_dim=64, attention_heads=4)
    text["max_position_embeddings"] = 128
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    vision.update(image_size=64, patch_size=8)
    config = Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=16)
    torch.manual_seed(0)
    hf_dir = root / "hf"
    Kosmos2ForConditionalGeneration(config).save_pretrained(hf_dir)
    for path in hf_folders["kosmos2"].iterdir():  # the processor and tokenizer files, as a released folder has them
        shutil.copy(path, hf_dir / path.name)
    assert main(["convert", "--from-hf", str(hf_dir), "--out", str(root / "ours")]) == 0
    return root / "ours"


def finetune(shapes, converted, out, capsys, *sets):
    args = train_args("", shapes["train"], out, config=REPO / "configs/train/finetune-kosmos2.yaml")
    args += ["--set", f"model.checkpoint={converted}"]
    for item in ("run.max_steps=4", "run.precision=fp32", "run.device=cpu", "run.threads=1", "data.batch_size=4",
                 "data.num_workers=0", "data.max_length=128", "data.shuffle_buffer=0", *sets):  # fmt: skip
        args += ["--set", item]
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    return last_json_line(capsys.readouterr().out)


def test_finetune_a_converted_checkpoint_with_a_frozen_vision_tower(shapes, converted, tmp_path, capsys):
    out = tmp_path / "run"
    summary = finetune(shapes, converted, out, capsys)
    assert summary["step"] == 4 and summary["weight_change"]["problems"] == []
    change = json.loads((out / "weight_change.json").read_text())
    rows = {r["module"]: r for r in change["modules"]}
    assert change["before"] == str(converted) and change["frozen"][0].startswith("vision")
    assert all(r["changed"] == 0 for m, r in rows.items() if m.startswith("vision"))
    assert all(r["changed"] > 0 for m, r in rows.items() if not m.startswith("vision"))
    final = out / "checkpoints" / "step_00000004"
    assert (final / "tokenizer" / "tokenizer.json").is_file()
    assert (final / "processor_config.json").is_file()  # the processor files go on, for `kosmos convert --to-hf`
    capsys.readouterr()
    check = ["diff-checkpoints", str(converted), str(out), "--expect-frozen", "vision", "--expect-trained", "blocks"]
    assert main(check) == 0
    assert main(["diff-checkpoints", str(converted), str(out), "--expect-frozen", "connector"]) == 1
    assert "PROBLEM: expected frozen, but changed: connector" in capsys.readouterr().out


def test_finetune_the_last_vision_block_only(shapes, converted, tmp_path, capsys):
    out = tmp_path / "run"
    finetune(shapes, converted, out, capsys, "model.freeze_vision=false", "model.vision_trainable_blocks=1")
    rows = {r["module"]: r for r in json.loads((out / "weight_change.json").read_text())["modules"]}
    assert rows["vision.blocks.1"]["changed"] > 0 and rows["vision.ln_post"]["changed"] > 0
    assert rows["vision.blocks.0"]["changed"] == 0 and rows["vision.patch_embed"]["changed"] == 0
