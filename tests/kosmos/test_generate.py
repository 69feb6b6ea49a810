"""``kosmos generate`` on the tiny model fitted to the wiring scenes: grounded captions, parsed and drawn."""

from __future__ import annotations

import random

from PIL import Image, ImageChops
from shapes_corpus import draw_scene, scenes
from train_runs import last_json_line

from kosmos.cli import main
from kosmos.eval.grounding import best_iou


def generate(capsys, checkpoint, image, out, prompt="<grounding>") -> dict:
    capsys.readouterr()
    args = ["generate", "--checkpoint", str(checkpoint), "--image", str(image), "--prompt", prompt, "--out", str(out)]
    assert main(args) == 0
    return last_json_line(capsys.readouterr().out)


def test_generate_describes_and_grounds_a_fitted_scene(shapes, wiring_run, tmp_path, capsys):
    """The model has fitted these scenes: it writes their caption with the shape's phrase and box."""
    hits = 0
    for i, (image, caption, spans) in enumerate(scenes(64, seed=3, max_shapes=1, templates=("{}",))[:6]):
        path = tmp_path / f"scene{i}.png"
        image.resize((160, 160)).save(path)  # any size: the model sees the 64 px centre crop
        result = generate(capsys, wiring_run, path, tmp_path / f"boxes{i}.png")
        assert result["prompt"] == "<grounding>" and result["text"]
        (start, end, box), entity = spans[0], result["entities"][0]
        assert entity["span"] == [entity["span"][0], entity["span"][0] + len(entity["phrase"])]
        assert all(0.0 <= v <= 1.0 for b in entity["boxes"] for v in b)
        assert entity["boxes_px"] == [[v * 160 for v in b] for b in entity["boxes"]]
        hits += entity["phrase"] == caption[start:end] and best_iou(box, entity["boxes"]) >= 0.5
    assert hits >= 4
    drawn, original = Image.open(tmp_path / "boxes0.png"), Image.open(tmp_path / "scene0.png").convert("RGB")
    assert drawn.size == original.size and ImageChops.difference(drawn, original).getbbox() is not None


def test_generate_with_a_phrase_prompt_and_an_unseen_non_square_image(shapes, wiring_run, tmp_path, capsys):
    image, caption, spans = draw_scene(random.Random(77), size=64, max_shapes=1)
    wide = Image.new("RGB", (128, 64), (128, 128, 128))
    wide.paste(image, (32, 0))  # centred: the crop the model sees is the scene itself
    wide.save(tmp_path / "wide.jpg", quality=95)
    phrase = caption[spans[0][0] : spans[0][1]]
    result = generate(
        capsys, wiring_run, tmp_path / "wide.jpg", tmp_path / "out.png", f"<grounding><phrase> {phrase}</phrase>"
    )
    assert result["image_out"] == str(tmp_path / "out.png") and (tmp_path / "out.png").is_file()
    if result["entities"]:  # pixel boxes are in the wide image: the crop starts 32 px in
        x1, y1, x2, y2 = result["entities"][0]["boxes"][0]
        assert result["entities"][0]["boxes_px"][0] == [x1 * 64 + 32, y1 * 64, x2 * 64 + 32, y2 * 64]


def test_generate_reports_a_missing_checkpoint(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(image)
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--image", str(image)]) == 2
    assert "no model" in capsys.readouterr().err
