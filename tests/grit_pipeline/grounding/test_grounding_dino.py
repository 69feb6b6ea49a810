"""Grounding DINO detector on the tiny model: loading, scores against an independent computation, batching."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from grit_pipeline.config import DetectorConfig
from grit_pipeline.grounding import GroundingInput, make_detector, prepare_image
from grit_pipeline.grounding.grounding_dino import (
    RANDOM_TINY_MODEL_ID,
    DetectorUnavailable,
    GroundingDinoDetector,
)


def small_cfg(path, **overrides) -> DetectorConfig:
    base = dict(model=str(path), device="cpu", image_short_side=224, image_long_side_max=320, batch_size=8)
    return DetectorConfig(**{**base, **overrides})


def noise_image(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth random blobs (not white noise), so the backbone sees some structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def detector(tiny_grounding_dino_path):
    det = make_detector(small_cfg(tiny_grounding_dino_path, box_threshold=0.8))
    det.setup()
    return det


def independent_detections(model, tokenizer, image, phrases, threshold, min_side, phrase_score="max"):
    """Scores and boxes computed here from the model's raw outputs, without the detector's code."""
    text = " . ".join(p.lower() for p in phrases) + " ."
    enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    pixels = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(pixel_values=(pixels - mean) / std, **enc)
    probs = out.logits[0].sigmoid()  # (Q, 32)
    columns, start = [], 0
    for p in phrases:
        s = text.index(p.lower(), start)
        e = s + len(p)
        start = e
        tokens = [t for t, (a, b) in enumerate(offsets) if b > a and a >= s and b <= e]
        columns.append(probs[:, tokens].max(dim=1).values if phrase_score == "max" else probs[:, tokens].mean(dim=1))
    per_phrase = torch.stack(columns, dim=1)  # (Q, P)
    best_score, best = per_phrase.max(dim=1)
    found = []
    for q in range(per_phrase.shape[0]):
        if best_score[q] < threshold:
            continue
        cx, cy, w, h = out.pred_boxes[0, q].tolist()
        box = [min(max(v, 0.0), 1.0) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)]
        if box[2] - box[0] >= min_side and box[3] - box[1] >= min_side:
            found.append((int(best[q]), box, float(best_score[q])))
    return sorted(found, key=lambda d: (d[0], -d[2]))


@pytest.mark.parametrize("phrase_score, threshold", [("max", 0.75), ("mean", 0.6)])
def test_scores_equal_an_independent_computation_from_raw_outputs(tiny_grounding_dino_path, phrase_score, threshold):
    from transformers import AutoModelForZeroShotObjectDetection, AutoTokenizer

    # NMS and the cap are switched off here (they have their own tests), so every kept query must match.
    cfg = small_cfg(
        tiny_grounding_dino_path,
        box_threshold=threshold,
        nms_iou=1.0,
        max_boxes_per_phrase=1000,
        phrase_score=phrase_score,
    )
    det = make_detector(cfg)
    det.setup()
    model = AutoModelForZeroShotObjectDetection.from_pretrained(tiny_grounding_dino_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_grounding_dino_path)
    # Sizes already at the input size and multiples of 32: the detector adds no padding.
    cases = [
        ((224, 320), ["A man", "red hat", "the dog"]),
        ((320, 224), ["red hat", "red car"]),
        ((224, 224), ["a small child playing with a ball"]),
    ]
    inputs = [GroundingInput(noise_image(k, *size), phrases) for k, (size, phrases) in enumerate(cases)]
    results = det(inputs)
    total = 0
    for inp, res in zip(inputs, results):
        expected = independent_detections(
            model, tokenizer, inp.image, inp.phrases, threshold, cfg.min_box_side, phrase_score
        )
        got = [(d.phrase, list(d.box), d.score) for d in res.detections]
        assert [g[0] for g in got] == [e[0] for e in expected]
        for (_, gb, gs), (_, eb, es) in zip(got, expected):
            assert gs == pytest.approx(es, abs=1e-5)
            np.testing.assert_allclose(gb, eb, atol=1e-5)
        total += len(got)
    assert total > 5  # the threshold keeps some boxes and drops others
    assert total < sum(50 for _ in cases)


def test_batched_and_one_by_one_agree(detector):
    # Different sizes (two share a padded shape, one is padded), prompts of different lengths, one split in two.
    cases = [
        ((300, 400), ["a man", "a red hat", "the dog"]),
        ((400, 300), ["a cat"]),
        ((224, 224), [f"thing number {i}" for i in range(9)]),
        ((250, 400), ["sky", "two people on a beach"]),
        ((300, 401), ["the man", "a man"]),
    ]
    inputs = [
        GroundingInput(prepare_image(noise_image(10 + k, *size), detector.cfg), phrases)
        for k, (size, phrases) in enumerate(cases)
    ]
    batched = detector(inputs)
    for inp, together in zip(inputs, batched):
        (alone,) = detector([inp])
        assert together.num_boxes_raw == alone.num_boxes_raw
        assert [d.phrase for d in together.detections] == [d.phrase for d in alone.detections]
        for a, b in zip(together.detections, alone.detections):
            assert a.score == pytest.approx(b.score, abs=1e-4)
            np.testing.assert_allclose(a.box, b.box, atol=1e-4)
    assert sum(len(r.detections) for r in batched) > 0


def test_end_to_end_through_the_real_loading_path(tiny_grounding_dino_path):
    cfg = small_cfg(tiny_grounding_dino_path, kind="grounding_dino", box_threshold=0.6, max_boxes_per_phrase=2)
    det = make_detector(cfg)
    assert isinstance(det, GroundingDinoDetector)
    det.setup()
    assert det.model_id == str(tiny_grounding_dino_path) and det.random_weights is False
    pil = Image.fromarray(noise_image(3, 480, 640))
    long_phrase = " ".join(["word"] * 40)  # 40 tokens: over the tiny model's 32-token limit on its own
    phrases = ["a dog", "A Dog", long_phrase, "the green grass"]
    inp = GroundingInput(prepare_image(pil, cfg), phrases)
    assert inp.image.shape == (224, 298, 3)
    result, missing = det([inp, GroundingInput(None, ["a dog"])])
    assert result.too_long_phrases == [2]
    assert result.error == "" and missing.error == "no_image" and missing.detections == []
    by_phrase = {}
    for d in result.detections:
        assert 0.0 <= d.box[0] < d.box[2] <= 1.0 and 0.0 <= d.box[1] < d.box[3] <= 1.0
        assert d.score >= 0.6
        by_phrase.setdefault(d.phrase, []).append(d)
    assert set(by_phrase) <= {0, 1, 3}
    assert all(len(v) <= 2 for v in by_phrase.values())
    # the repeated text is grounded once and both occurrences get its boxes
    assert [d.box for d in by_phrase.get(0, [])] == [d.box for d in by_phrase.get(1, [])]
    assert result.num_boxes_raw >= len(result.detections)


def test_image_not_prepared_is_resized_by_the_detector(detector):
    image = noise_image(5, 480, 640)
    (direct,) = detector([GroundingInput(image, ["a dog"])])
    (prepared,) = detector([GroundingInput(prepare_image(image, detector.cfg), ["a dog"])])
    assert [d.box for d in direct.detections] == [d.box for d in prepared.detections]
    (bad,) = detector([GroundingInput(np.zeros((10, 10), np.float32), ["a dog"])])
    assert bad.error.startswith("bad_image")
    (odd,) = detector([GroundingInput(image, [None, "", "  .  ", "a dog"])])  # nothing to ground but the dog
    assert {d.phrase for d in odd.detections} <= {3} and odd.too_long_phrases == []


def test_sliver_image_gets_a_canvas_large_enough_for_the_queries(detector):
    from transformers import GroundingDinoForObjectDetection

    from grit_pipeline.grounding.tiny import build_processor, tiny_config

    config = tiny_config(vocab_size=1100)
    config.num_queries = 400  # more proposals than a 3 x 320 px image has feature cells, even padded to 32 x 320
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config)
    det = GroundingDinoDetector.from_model(model, build_processor().tokenizer, detector.cfg, "tiny-400-queries")
    sliver = prepare_image(noise_image(6, 40, 4000), detector.cfg)
    assert sliver.shape == (3, 320, 3)
    assert det._padded_shape(sliver) == (160, 320)
    (result,) = det([GroundingInput(sliver, ["a long fence"])])
    assert result.error == ""
    assert all(d.box[3] - d.box[1] >= detector.cfg.min_box_side for d in result.detections)


def test_missing_weights_raise_a_clear_one_line_error(tmp_path):
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    det = make_detector(small_cfg(empty))
    with pytest.raises(DetectorUnavailable) as info:
        det.setup()
    message = str(info.value)
    assert "\n" not in message
    assert str(empty) in message and "detector.model" in message


def test_random_weights_only_when_allowed_and_loudly(tmp_path, caplog):
    cfg = small_cfg(tmp_path / "absent", allow_random_weights=True, box_threshold=0.0)
    det = make_detector(cfg)
    with caplog.at_level(logging.WARNING):
        det.setup()
    assert det.random_weights is True and det.model_id == RANDOM_TINY_MODEL_ID
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)
    (result,) = det([GroundingInput(noise_image(0, 224, 224), ["a dog"])])
    assert result.detections


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="detector.kind"):
        make_detector(DetectorConfig(kind="yolo"))


def test_bf16_autocast_with_fp32_weights(tiny_grounding_dino_path):
    cfg = small_cfg(tiny_grounding_dino_path, box_threshold=0.0, nms_iou=1.0, max_boxes_per_phrase=100)
    full = make_detector(cfg)
    low = make_detector(dataclasses.replace(cfg, dtype="bf16"))
    full.setup()
    low.setup()
    assert low.half_weights is False  # CPU keeps fp32 weights (see precision.py)
    assert all(p.dtype == torch.float32 for p in low.model.parameters())
    phrases = ["a man", "a red hat", "the dog"]
    inputs = [GroundingInput(noise_image(20 + k, 224, 320), phrases) for k in range(3)]
    # The random tiny model's query selection is too flat for query-by-query agreement under bf16 rounding;
    # each phrase's best score is stable, and a broken half-precision path (NaN, garbage) fails this.
    for lo, hi in zip(low(inputs), full(inputs)):
        assert all(np.isfinite(d.score) and np.isfinite(d.box).all() for d in lo.detections)
        for p in range(len(phrases)):
            best_lo = max(d.score for d in lo.detections if d.phrase == p)
            best_hi = max(d.score for d in hi.detections if d.phrase == p)
            assert best_lo == pytest.approx(best_hi, abs=0.08)


def test_half_weights_fall_back_to_autocast_when_the_probe_fails(tiny_grounding_dino_path, monkeypatch):
    """A release without the half-precision fix raises in grid_sample; the detector must keep working."""
    cfg = small_cfg(tiny_grounding_dino_path, dtype="bf16", box_threshold=0.8)
    det = GroundingDinoDetector(cfg, half_weights=True)
    det.setup()  # load first, then make half weights fail the way old releases do
    det.model.float()
    det.half_weights = False
    real_forward = det.model.forward

    def old_release_forward(*args, **kwargs):
        if next(det.model.parameters()).dtype != torch.float32:
            raise RuntimeError("grid_sampler(): expected input and grid to have same dtype")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(det.model, "forward", old_release_forward)
    det._try_half_weights()
    assert det.half_weights is False
    assert all(p.dtype == torch.float32 for p in det.model.parameters())
    assert any("fp32 weights under autocast" in n for n in det.notes)
    (result,) = det([GroundingInput(noise_image(1, 224, 224), ["a dog"])])
    assert all(np.isfinite(d.score) for d in result.detections)


def test_half_weights_on_cpu_are_probed(tiny_grounding_dino_path):
    """Forced bf16 weights on CPU: kept only if the probe pass is finite (PyTorch's CPU bf16 grid_sample is not)."""
    cfg = small_cfg(tiny_grounding_dino_path, dtype="bf16", box_threshold=0.8)
    det = GroundingDinoDetector(cfg, half_weights=True)
    det.setup()
    weights = {p.dtype for p in det.model.parameters()}
    assert weights == ({torch.bfloat16} if det.half_weights else {torch.float32})
    (result,) = det([GroundingInput(noise_image(2, 224, 224), ["a dog"])])
    assert all(np.isfinite(d.score) and np.isfinite(d.box).all() for d in result.detections)


def test_mm_grounding_dino_checkpoint_loads_through_the_same_path(tmp_path):
    from transformers import AutoModelForZeroShotObjectDetection, AutoTokenizer

    from grit_pipeline.grounding.tiny import save_tiny_grounding_dino

    folder = save_tiny_grounding_dino(tmp_path / "mm", mm=True)
    det = make_detector(small_cfg(folder, box_threshold=0.0, nms_iou=1.0, max_boxes_per_phrase=1000))
    det.setup()
    assert type(det.model).__name__ == "MMGroundingDinoForObjectDetection"
    inp = GroundingInput(noise_image(4, 224, 320), ["a man", "a red hat"])
    (result,) = det([inp])
    model = AutoModelForZeroShotObjectDetection.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = independent_detections(model, tokenizer, inp.image, inp.phrases, 0.0, det.cfg.min_box_side)
    assert len(result.detections) == len(expected) > 0
    for d, (phrase, box, score) in zip(result.detections, expected):
        assert d.phrase == phrase and d.score == pytest.approx(score, abs=1e-5)
        np.testing.assert_allclose(d.box, box, atol=1e-5)


def test_precision_policy():
    from grit_pipeline.grounding import precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision.release_has_half_fix()  # the installed release's source has the fix
    assert precision.half_weights_wanted(cuda, torch.bfloat16)
    assert not precision.half_weights_wanted(cpu, torch.bfloat16)
    assert not precision.half_weights_wanted(cuda, torch.float16)
    assert not precision.half_weights_wanted(cuda, None)

    class OldModel:  # the shape of releases before the fix: no dtype parameter
        def get_valid_ratio(self, mask):
            return mask

        def forward(self):
            return None

    assert not precision.release_has_half_fix(OldModel)
    assert not precision.half_weights_wanted(cuda, torch.bfloat16, OldModel)
    with pytest.raises(ValueError, match="detector.dtype"):
        precision.autocast_dtype("int8")
    assert precision.resolve_device("cpu") == cpu


def test_release_without_the_fix_keeps_fp32_weights_under_autocast(tiny_grounding_dino_path, monkeypatch):
    from grit_pipeline.grounding import grounding_dino

    seen = []
    monkeypatch.setattr(grounding_dino, "half_weights_wanted", lambda *a: seen.append(a) or False)
    det = make_detector(small_cfg(tiny_grounding_dino_path, dtype="bf16"))
    det.setup()
    assert seen and seen[0][1] is torch.bfloat16
    assert det.half_weights is False and det.amp_dtype is torch.bfloat16
    assert {p.dtype for p in det.model.parameters()} == {torch.float32}


def _mixed_inputs(cfg):
    cases = [
        ((300, 400), ["a man", "a red hat", "the dog"]),
        ((224, 224), [f"thing number {i}" for i in range(9)]),  # two prompts at the 32-token limit
        ((400, 300), ["a cat"]),
        ((300, 401), ["the man", "a man"]),
        ((301, 400), ["sky", "two people on a beach"]),
        ((224, 224), ["a ball"]),
    ]
    return [GroundingInput(prepare_image(noise_image(20 + k, *s), cfg), p) for k, (s, p) in enumerate(cases)]


def _same(a, b, atol=1e-4):
    assert a.num_boxes_raw == b.num_boxes_raw and a.too_long_phrases == b.too_long_phrases
    assert [d.phrase for d in a.detections] == [d.phrase for d in b.detections]
    for x, y in zip(a.detections, b.detections):
        assert x.score == pytest.approx(y.score, abs=atol)
        np.testing.assert_allclose(x.box, y.box, atol=atol)


def test_stream_with_a_small_window_gives_each_image_its_own_results(tiny_grounding_dino_path):
    det = make_detector(small_cfg(tiny_grounding_dino_path, box_threshold=0.8, batch_size=2))
    det.setup()
    inputs = _mixed_inputs(det.cfg) + [GroundingInput(None, ["a dog"])]
    streamed = list(det.stream(iter(inputs), window=2))
    assert len(streamed) == len(inputs) and streamed[-1].error == "no_image"
    for inp, got in zip(inputs[:-1], streamed):
        (alone,) = det([inp])
        _same(got, alone)
    assert sum(len(r.detections) for r in streamed) > 0


def test_device_postprocessing_equals_the_host_functions_on_the_model(tiny_grounding_dino_path):
    fast = make_detector(small_cfg(tiny_grounding_dino_path, box_threshold=0.75))
    host = make_detector(small_cfg(tiny_grounding_dino_path, box_threshold=0.75, device_postprocess=False))
    inputs = _mixed_inputs(fast.cfg)
    got, want = fast(inputs), host(inputs)
    for a, b in zip(got, want):
        _same(a, b, atol=0.0)
    assert sum(len(r.detections) for r in got) > 0
