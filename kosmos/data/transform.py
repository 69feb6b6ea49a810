"""The CLIP image transform of Kosmos-2 training, and the geometry that boxes must follow through it.

Resize the short side to 224 with bicubic filtering, centre-crop 224 x 224, scale to [0, 1], normalise with CLIP's
mean and standard deviation. The rounding follows torchvision's ``Resize(224)`` + ``CenterCrop(224)`` on PIL
images, which the original loader used: the long side is ``int(224 * long / short)`` (truncated) and the crop
offset is ``int(round((side - 224) / 2))`` (Python's round, half to even). transformers' ``CLIPImageProcessor``
floors the offset instead, so the two differ by one pixel when ``side - 224`` is odd.

Only PIL, numpy and torch: torchvision is not needed (it does not import beside every torch build).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224

_SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD, dtype=np.float32))).astype(np.float32)
_SHIFT = (np.asarray(CLIP_MEAN, dtype=np.float32) / np.asarray(CLIP_STD, dtype=np.float32)).astype(np.float32)


def resize_crop_geometry(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """``(resized_width, resized_height, crop_left, crop_top)`` of the resize + centre crop of a ``width x
    height`` image. Pure arithmetic, shared by the pixel transform and the box remapping so the two agree."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return new_w, new_h, left, top


def resize_and_crop(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """RGB image resized (short side ``size``, bicubic) and centre-cropped to ``size x size``."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    new_w, new_h, left, top = resize_crop_geometry(image.width, image.height, size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    return image.crop((left, top, left + size, top + size))


def normalize_to_array(image: Image.Image) -> np.ndarray:
    """``(3, H, W)`` float32 array of an RGB image, CLIP-normalised."""
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    array = array * _SCALE - _SHIFT
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def clip_transform(image: Image.Image, size: int = IMAGE_SIZE):
    """The whole transform: a ``(3, size, size)`` float32 torch tensor."""
    import torch

    return torch.from_numpy(normalize_to_array(resize_and_crop(image, size)))
