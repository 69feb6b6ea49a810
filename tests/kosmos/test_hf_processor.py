"""Our image frames and sequences against transformers' Kosmos2Processor configured as the released checkpoint is
(the whole image resized to 224 x 224), on non-square images."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from grit_core.record import GritRecord
from kosmos.data.sequence import SequenceConfig, build_grounded_sample
from kosmos.data.transform import clip_transform, resolve_image_frame
from kosmos.eval.generate import crop_box_to_pixels

CAPTION = "An image of a dog and a cat on a sofa"
DOG, CAT = (12, 17), (22, 27)  # "a dog", "a cat"
# On a 320 x 180 image the dog sits at the left edge, outside the centre crop; the cat is half inside it.
DOG_BOX, CAT_BOX = (0.02, 0.3, 0.15, 0.9), (0.6, 0.2, 0.9, 0.7)


@pytest.fixture(scope="module")
def processor(hf_folders):
    from transformers.models.kosmos2.processing_kosmos2 import Kosmos2Processor

    return Kosmos2Processor.from_pretrained(str(hf_folders["kosmos2"]))


@pytest.fixture(scope="module")
def tok(hf_folders):
    from kosmos.data.tokenizer import KosmosTokenizer

    return KosmosTokenizer.from_pretrained(hf_folders["kosmos2"])


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: every column differs, so a crop and a squeeze give different pixels."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    base = np.stack([x * 255, y * 255, (1 - x) * y * 255], axis=-1)
    noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB")


def marked_up(caption: str, spans: list[tuple[int, int]]) -> str:
    """The caption as transformers' processor takes it: `<phrase> text</phrase>` around each span."""
    out, pos = ["<grounding>"], 0
    for start, end in spans:
        assert caption[start - 1] == " "
        out += [caption[pos : start - 1], "<phrase> ", caption[start:end], "</phrase>"]
        pos = end
    return "".join([*out, caption[pos:]])


def ours(tok, caption, entries, frame, width, height):
    record = GritRecord(key="k", caption=caption, width=width, height=height, noun_chunks=[], ref_exps=entries)
    cfg = SequenceConfig(use_grounding_prob=1.0, image_frame=frame)
    return build_grounded_sample(record, tok, cfg, random.Random(0), width, height)


@pytest.mark.parametrize("size", [(320, 180), (200, 317)])
def test_square_frame_gives_the_released_processors_pixels(processor, size):
    image = photo_like(*size)
    theirs = np.asarray(processor.image_processor(image, return_tensors="np")["pixel_values"][0])
    square = clip_transform(image, 224, "square").numpy()
    assert theirs.shape == square.shape == (3, 224, 224)
    np.testing.assert_allclose(square, theirs, atol=1e-4, rtol=0)
    cropped = clip_transform(image, 224, "center_crop").numpy()
    assert np.abs(cropped - theirs).mean() > 0.1  # the test can fail: the crop is another frame


def test_square_frame_gives_the_released_processors_location_tokens(processor, tok):
    image = photo_like(320, 180)
    entries = [[*DOG, *DOG_BOX, 0.9], [*CAT, *CAT_BOX, 0.8]]
    theirs = processor(
        images=image,
        text=marked_up(CAPTION, [DOG, CAT]),
        bboxes=[[DOG_BOX], [CAT_BOX]],
        add_eos_token=True,
        return_tensors=None,
    )
    square = ours(tok, CAPTION, entries, "square", *image.size)
    assert square.input_ids == theirs["input_ids"]
    assert square.image_embeds_position_mask == theirs["image_embeds_position_mask"]
    # The centre crop loses the dog's box and moves the cat's: not the released model's frame.
    cropped = ours(tok, CAPTION, entries, "center_crop", *image.size)
    assert cropped.input_ids != theirs["input_ids"]
    object_id = processor.tokenizer.convert_tokens_to_ids("<object>")
    assert square.input_ids.count(object_id) == 2 and cropped.input_ids.count(object_id) == 1


def test_the_only_difference_is_the_lone_piece_the_processor_puts_before_punctuation(processor, tok):
    """After `</object>` the processor tokenises the rest of the text anew, so a following "." becomes "▁" "."; we
    tokenise the caption once, whole, so "dog." stays "▁dog" "." as in the same caption without boxes."""
    caption = "An image of a dog. It sits on a sofa"
    image = photo_like(224, 224)
    theirs = processor(
        images=image, text=marked_up(caption, [DOG]), bboxes=[[DOG_BOX]], add_eos_token=True, return_tensors=None
    )["input_ids"]
    mine = ours(tok, caption, [[*DOG, *DOG_BOX, 0.9]], "square", 224, 224).input_ids
    lone = processor.tokenizer.convert_tokens_to_ids("▁")
    end_object = processor.tokenizer.convert_tokens_to_ids("</object>")
    assert len(theirs) == len(mine) + 1
    at = theirs.index(end_object) + 1
    assert theirs[at] == lone and processor.tokenizer.convert_ids_to_tokens(theirs[at + 1]) == "."
    assert theirs[:at] + theirs[at + 1 :] == mine


def test_auto_frame_follows_the_checkpoint(hf_folders, tmp_path):
    assert resolve_image_frame("auto", hf_folders["kosmos2"]) == "square"  # transformers 5's processor_config.json
    released = tmp_path / "released"
    released.mkdir()
    (released / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 224}, "use_square_size": 1})
    )
    assert resolve_image_frame("auto", released) == "square"
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 224}, "do_center_crop": 1}))
    assert resolve_image_frame("auto", clip) == "center_crop"
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "train_config.yaml").write_text("data:\n  sequence:\n    image_frame: square\n")
    assert resolve_image_frame("auto", trained) == "square"
    assert resolve_image_frame("auto", tmp_path) == resolve_image_frame("auto") == "center_crop"
    assert resolve_image_frame("center_crop", released) == "center_crop"
    (clip / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        resolve_image_frame("auto", clip)
    with pytest.raises(ValueError, match="image_frame must be"):
        resolve_image_frame("letterbox")


def test_generated_boxes_map_back_to_the_image_in_either_frame():
    assert crop_box_to_pixels((0.1, 0.2, 0.5, 0.6), 300, 200, 224, "square") == pytest.approx([30, 40, 150, 120])
    # Centre crop of 300 x 200: resized to 336 x 224, crop offset 56: x = (0.1 * 224 + 56) * 300 / 336.
    x1, y1, _, _ = crop_box_to_pixels((0.1, 0.2, 0.5, 0.6), 300, 200, 224, "center_crop")
    assert x1 == pytest.approx((0.1 * 224 + 56) * 300 / 336) and y1 == pytest.approx(0.2 * 224 * 200 / 224)
