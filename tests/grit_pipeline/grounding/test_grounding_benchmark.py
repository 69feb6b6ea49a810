"""The grounding benchmark's CUDA code path, run at toy size on CPU (the real run needs a GPU)."""

from __future__ import annotations

import subprocess
import sys


def test_cuda_benchmark_path_at_toy_size_on_cpu():
    from benchmarks.grounding import run_gpu_benchmark

    result = run_gpu_benchmark("cpu", smoke=True)
    assert result["smoke"] is True
    assert result["naive"]["images_per_s"] > 0
    assert [s["batch_size"] for s in result["ours"]] == [1, 3]
    assert all(s["stage_images_per_s"] > 0 for s in result["ours"])
    assert result["best"]["overlapped_images_per_s"] > 0
    assert set(result["bucketing"]) == {"32", "64", "128"}


def test_benchmark_imports_no_ray_spacy_or_webdataset():
    code = (
        "import sys, benchmarks.grounding, grit_pipeline.grounding.grounding_dino; "
        "print(sorted(m for m in ('ray', 'spacy', 'webdataset', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
