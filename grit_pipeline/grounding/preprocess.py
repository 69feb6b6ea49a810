"""CPU-side image preparation for the detector, and the padded shape the detector batches by.

The pipeline runs :func:`prepare_image` on CPU workers, ahead of the GPU stage, so the GPU actor receives ready
``uint8`` arrays at the detector's input size: resizing there would leave the GPU waiting, and ``uint8`` is a
quarter of the bytes of a normalised float image on the way to the GPU. Decoding and EXIF orientation happen
before this, in the pipeline's image module.

The output size follows Grounding DINO's own processor (shorter side to ``image_short_side``, unless the longer
side would exceed ``image_long_side_max``, then the longer side to that bound; bilinear), so our detector sees the
same pixels as the model card's code.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from grit_pipeline.config import DetectorConfig

# Each padded side is a multiple of this many pixels: the detector groups images of equal padded shape into one
# forward pass. 32 is the backbone's total stride; docs/grounding.md has the measurements behind the choice.
DEFAULT_PAD_MULTIPLE = 32


def target_size(height: int, width: int, short_side: int, long_side_max: int) -> tuple[int, int]:
    """The (height, width) the detector sees for an image of ``height`` x ``width``, aspect ratio kept."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    short, long = min(height, width), max(height, width)
    scale_short = float(short_side)
    exact = None
    if long / short * short_side > long_side_max:
        exact = long_side_max * short / long
        scale_short = float(round(exact))
    if short == scale_short:
        return height, width
    # Same integer rounding as the reference processor: the shorter side is rounded, the longer truncated.
    ratio_source = exact if exact is not None else scale_short
    new_short = int(scale_short)
    new_long = int(ratio_source * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def padded_shape(height: int, width: int, multiple: int = DEFAULT_PAD_MULTIPLE, min_side: int = 0) -> tuple[int, int]:
    """The shape an image is zero-padded to in a batch: a function of the image alone, so that what the backbone
    sees (its attention windows include the padding) never depends on the other images of the batch.

    ``min_side`` pads slivers (a 4000x50 original is 1333x17 at the input size) up to a canvas with enough feature
    cells for the detector's queries.
    """
    height, width = max(height, min_side), max(width, min_side)
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB ``uint8`` (H, W, 3) array from a PIL image or an array (gray, RGB or RGBA, ``uint8``)."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    if array.ndim == 3 and array.shape[2] == 4:
        return np.ascontiguousarray(array[:, :, :3])
    if array.ndim == 3 and array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")


def prepare_image(image: Image.Image | np.ndarray, cfg: DetectorConfig) -> np.ndarray:
    """RGB, resized to the detector's input size: a ``uint8`` (H, W, 3) array for :class:`GroundingInput`."""
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    new_h, new_w = target_size(height, width, cfg.image_short_side, cfg.image_long_side_max)
    if (new_h, new_w) == (height, width):
        return np.ascontiguousarray(rgb)
    resized = Image.fromarray(rgb).resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    return np.asarray(resized)
