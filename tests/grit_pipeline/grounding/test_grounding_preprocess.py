"""CPU-side preparation: the detector's input size, RGB conversion, and the padded shape batches group by."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from grit_pipeline.config import DetectorConfig
from grit_pipeline.grounding.preprocess import padded_shape, prepare_image, target_size, to_rgb_array

SIZES = [(480, 640), (640, 480), (800, 800), (1000, 3000), (3000, 1000), (333, 500), (799, 1201), (50, 4000), (1, 1)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_target_size_matches_the_reference_processor(height, width):
    from transformers.image_transforms import get_size_with_aspect_ratio

    assert target_size(height, width, 800, 1333) == get_size_with_aspect_ratio((height, width), 800, 1333)


def test_prepare_image_gives_the_reference_processors_pixels():
    from transformers import GroundingDinoImageProcessorPil

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    cfg = DetectorConfig(image_short_side=96, image_long_side_max=150)
    ours = prepare_image(image, cfg)
    assert ours.dtype == np.uint8 and ours.shape == (90, 150, 3)  # the long side bound decides here
    processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 96, "longest_edge": 150})
    theirs = processor(images=image, return_tensors="np")["pixel_values"][0]  # (3, H, W), normalised
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    normalised = (ours.transpose(2, 0, 1) / 255.0 - mean) / std
    np.testing.assert_allclose(normalised, theirs, atol=1e-5)


def test_rgb_conversion_of_modes_and_arrays():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb_array(gray).shape == (3, 4, 3)
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    assert to_rgb_array(rgba)[0, 0].tolist() == [10, 20, 30]
    assert to_rgb_array(np.zeros((3, 4, 4), np.uint8)).shape == (3, 4, 3)
    assert to_rgb_array(Image.new("L", (4, 3))).shape == (3, 4, 3)
    with pytest.raises(ValueError, match="uint8"):
        to_rgb_array(np.zeros((3, 4, 3), np.float32))
    with pytest.raises(ValueError, match="must be"):
        to_rgb_array(np.zeros((3, 4, 2), np.uint8))


def test_image_already_at_size_is_not_resampled():
    image = np.random.default_rng(1).integers(0, 256, (800, 1066, 3), dtype=np.uint8)
    assert np.array_equal(prepare_image(image, DetectorConfig()), image)


def test_padded_shape_depends_on_the_image_alone():
    assert padded_shape(800, 1066) == (800, 1088)
    assert padded_shape(800, 1088) == (800, 1088)
    assert padded_shape(750, 1333, multiple=64) == (768, 1344)
