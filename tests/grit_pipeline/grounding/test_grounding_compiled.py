"""The compiled forward: one graph per key with transformers' checks off, bounded, the same boxes as eager."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from grit_pipeline.config import DetectorConfig
from grit_pipeline.grounding import GroundingInput, make_detector, prepare_image
from grit_pipeline.grounding.compiled import CompiledForward, text_bucket


def _image(seed, h, w):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def test_text_buckets_are_powers_of_two_within_the_limit():
    assert [text_bucket(n, 256) for n in (1, 16, 17, 33, 200, 256)] == [16, 16, 32, 64, 256, 256]
    assert text_bucket(40, 32) == 32


def test_compiled_forward_is_one_graph_per_key_bounded_and_equal_to_eager(tiny_grounding_dino_path, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    cfg = DetectorConfig(
        model=str(tiny_grounding_dino_path), device="cpu", image_short_side=224, image_long_side_max=320,
        box_threshold=0.75, compile="off",
    )  # fmt: skip
    det = make_detector(cfg)
    det.setup()
    inputs = [
        GroundingInput(prepare_image(_image(1, 300, 400), cfg), ["a man", "the red hat"]),
        GroundingInput(prepare_image(_image(2, 400, 300), cfg), ["a dog"]),
    ]
    eager = det(inputs)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    det.compiled = CompiledForward(det.model, max_graphs=1, backend=counting_backend)
    compiled = det(inputs)
    assert len(graphs) == 1, "the first key compiles to one graph, without breaks"
    assert not counters["graph_break"]
    assert det.compiled.keys and det.compiled.eager_calls == 1  # the second shape ran eager: the bound held
    for a, b in zip(eager, compiled):
        assert [d.phrase for d in a.detections] == [d.phrase for d in b.detections]
        for x, y in zip(a.detections, b.detections):
            assert x.score == pytest.approx(y.score, abs=1e-4)
            np.testing.assert_allclose(x.box, y.box, atol=1e-4)
    assert sum(len(r.detections) for r in eager) > 0
    torch._dynamo.reset()
