"""The CLIP image transform of Kosmos-2, and the geometry that boxes must follow through it.

Two frames, the ``image_frame`` setting:

- ``center_crop`` (the original training loader): resize the short side to 224 with bicubic filtering and
  centre-crop 224 x 224. The rounding follows torchvision's ``Resize(224)`` + ``CenterCrop(224)`` on PIL images:
  the long side is ``int(224 * long / short)`` (truncated) and the crop offset is ``int(round((side - 224) / 2))``
  (Python's round, half to even). The sides of a non-square image are cut off, and boxes with them.
- ``square`` (the released checkpoint's processor, ``use_square_size`` in its ``preprocessor_config.json``): resize
  the whole image to 224 x 224, bicubic, aspect ratio not kept. Nothing is cut: a box normalised to the image is
  the same box in the model's frame. transformers' ``Kosmos2Processor`` gives the same pixels (tested).
- ``auto``: ``square`` for a model converted from a Hugging Face checkpoint (its folder holds that
  ``preprocessor_config.json``), else ``center_crop`` (:func:`resolve_image_frame`).

Then scale to [0, 1] and normalise with CLIP's mean and standard deviation.

Only PIL, numpy and torch: torchvision is not needed (it does not import beside every torch build).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224
ImageFrame = Literal["auto", "center_crop", "square"]
# What a converted Hugging Face folder holds beside the weights, and what our training checkpoints hold.
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"  # transformers 5 saves the image processor's settings inside it
RUN_CONFIG = "train_config.yaml"

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


def frame_geometry(
    width: int, height: int, size: int = IMAGE_SIZE, frame: ImageFrame = "center_crop"
) -> tuple[int, int, int, int]:
    """``(resized_width, resized_height, crop_left, crop_top)`` of ``frame``: the resize + centre crop, or for
    ``square`` the whole image resized to ``size x size`` (no crop). ``auto`` unresolved means ``center_crop``."""
    if frame == "square":
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width}x{height} must be positive")
        return size, size, 0, 0
    if frame not in ("center_crop", "auto"):
        raise ValueError(f"image_frame must be auto, center_crop or square, got {frame!r}")
    return resize_crop_geometry(width, height, size)


def resize_and_crop(image: Image.Image, size: int = IMAGE_SIZE, frame: ImageFrame = "center_crop") -> Image.Image:
    """RGB image in the model's ``size x size`` frame: resized (short side ``size``, bicubic) and centre-cropped, or
    for ``square`` resized whole to ``size x size``."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    new_w, new_h, left, top = frame_geometry(image.width, image.height, size, frame)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if (new_w, new_h) == (size, size):
        return image
    return image.crop((left, top, left + size, top + size))


def normalize_to_array(image: Image.Image) -> np.ndarray:
    """``(3, H, W)`` float32 array of an RGB image, CLIP-normalised."""
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    array = array * _SCALE - _SHIFT
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def clip_transform(image: Image.Image, size: int = IMAGE_SIZE, frame: ImageFrame = "center_crop"):
    """The whole transform: a ``(3, size, size)`` float32 torch tensor."""
    import torch

    return torch.from_numpy(normalize_to_array(resize_and_crop(image, size, frame)))


def resolve_image_frame(frame: ImageFrame, model_dir: str | Path | None = None) -> Literal["center_crop", "square"]:
    """The frame ``auto`` stands for with the model in ``model_dir`` (explicit frames pass through).

    The Hugging Face processor settings beside the weights decide first (``preprocessor_config.json``, or the
    ``image_processor`` of transformers 5's ``processor_config.json``; a converted release has them, and the trainer
    copies them into checkpoints fine-tuned from one): ``use_square_size``, or a ``size`` of height and width,
    means ``square``; a ``shortest_edge`` size means ``center_crop``. Without them, the frame the run that wrote the
    checkpoint trained with (``data.sequence.image_frame`` in its ``train_config.yaml``); else ``center_crop``.
    """
    if frame in ("center_crop", "square"):
        return frame
    if frame != "auto":
        raise ValueError(f"image_frame must be auto, center_crop or square, got {frame!r}")
    if model_dir is None:
        return "center_crop"
    folder = Path(model_dir)
    settings = _processor_settings(folder)
    if settings is not None:
        size = settings.get("size")
        square = isinstance(size, dict) and {"height", "width"} <= set(size) and "shortest_edge" not in size
        return "square" if settings.get("use_square_size") or square else "center_crop"
    run_config = folder / RUN_CONFIG
    if run_config.is_file():
        import yaml

        try:
            trained = yaml.safe_load(run_config.read_text(encoding="utf-8"))["data"]["sequence"]["image_frame"]
        except (yaml.YAMLError, UnicodeDecodeError, TypeError, KeyError):
            trained = None
        if trained in ("center_crop", "square"):
            return trained
    return "center_crop"


def _processor_settings(folder: Path) -> dict | None:
    """The image processor settings saved beside a model, or None when there are none."""
    for name, section in ((PREPROCESSOR_CONFIG, None), (PROCESSOR_CONFIG, "image_processor")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not readable JSON: {exc}") from exc
        if section is not None:
            data = data.get(section) if isinstance(data, dict) else None
        if isinstance(data, dict):
            return data
    return None
