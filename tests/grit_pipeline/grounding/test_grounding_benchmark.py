"""The grounding benchmark's CUDA code path, run at toy size on CPU (the real run needs a GPU)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np


def test_cuda_benchmark_path_at_toy_size_on_cpu():
    from benchmarks.grounding import run_gpu_benchmark

    result = run_gpu_benchmark("cpu", smoke=True)
    assert result["smoke"] is True
    assert result["naive"]["images_per_s"] > 0
    assert [(s["call_size"], s["batch_size"]) for s in result["ours"]] == [(3, 1), ("stream", 3)]
    for s in result["ours"]:
        assert s["images_per_s"] > 0 and set(s["host_ms_per_image"]) == {"host_inputs", "device_wait", "select", "nms"}
        assert s["candidates_per_image"]["mean"] > 0
    assert result["best"]["overlapped_images_per_s"] > 0
    assert set(result["bucketing"]) == {"32", "64", "128"}
    assert result["syncs_per_forward"]["item_reads"] == 0  # transformers' checks are off
    top = ("device", "images_per_s_realistic", "speedup_vs_naive", "gpu_utilisation", "box_max_abs_diff_vs_fp32")
    assert all(k in result for k in (*top, "date"))
    assert 0 <= result["box_max_abs_diff_vs_fp32"] <= 1


def test_web_sizes_are_a_mix_of_many_shapes():
    from benchmarks.grounding import web_sizes
    from grit_pipeline.grounding.preprocess import padded_shape, target_size

    sizes = web_sizes(512, seed=0)
    assert sizes == web_sizes(512, seed=0)  # deterministic
    shapes = {padded_shape(*target_size(h, w, 800, 1333)) for w, h in sizes}
    assert len(shapes) > 30
    ratios = np.array([w / h for w, h in sizes])
    assert 0.5 < np.mean(ratios > 1) < 0.85  # mostly landscape, not only


def test_damping_brings_random_weights_to_tens_of_candidates(tiny_grounding_dino_path):
    from transformers import AutoModelForZeroShotObjectDetection, AutoTokenizer

    from benchmarks.grounding import TARGET_CANDIDATES, damped_detector, make_images, make_phrases
    from grit_pipeline.config import DetectorConfig
    from grit_pipeline.grounding import GroundingInput, prepare_image
    from grit_pipeline.grounding.grounding_dino import GroundingDinoDetector

    model = AutoModelForZeroShotObjectDetection.from_pretrained(tiny_grounding_dino_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_grounding_dino_path)
    cfg = DetectorConfig(device="cpu", image_short_side=224, image_long_side_max=320, box_threshold=0.35)
    arrays = [prepare_image(im, cfg) for im in make_images(6, seed=0, scale=0.3)]
    phrases = make_phrases(6, seed=1)
    det = GroundingDinoDetector.from_model(model, tokenizer, cfg, "tiny")
    before = np.mean([r.num_boxes_raw for r in det([GroundingInput(a, p) for a, p in zip(arrays, phrases)])])
    damped_detector(model, tokenizer, cfg, arrays, phrases, "tiny", calib=3)
    after = [r.num_boxes_raw for r in det([GroundingInput(a, p) for a, p in zip(arrays, phrases)])]
    # The tiny model has 50 queries, nearly all over the threshold undamped; damped, about the target pass.
    assert before > 45 and abs(np.median(after) - TARGET_CANDIDATES) <= 15


def test_benchmark_imports_no_ray_spacy_or_webdataset():
    code = (
        "import sys, benchmarks.grounding, grit_pipeline.grounding.grounding_dino; "
        "print(sorted(m for m in ('ray', 'spacy', 'webdataset', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
