"""Grounded captions as token sequences, and generated tokens back as text plus entities.

Training sequence of an image-caption sample (the released model's layout)::

    <s> <image> [64 image slots] </image> [<grounding>] caption </s>

A grounded caption wraps each phrase: ``<phrase>`` before its first token, and after its last token
``</phrase><object><patch_index_ul><patch_index_lr>[</delimiter_of_multi_objects/><ul><lr>...]</object>``.
The caption is tokenised once, whole, and the tags are inserted between its tokens (as the original loader
does), so a grounded caption and the same caption used plain have the same text tokens.

Labels follow the Hugging Face convention: ``labels`` is aligned with ``input_ids`` and the model shifts it
(``logits[:, t]`` is scored against ``labels[:, t + 1]``). ``labels`` is -100 on ``<s>``, ``<image>``, the 64
slots and ``</image>``; so the first supervised target is the first token after ``</image>`` (``<grounding>``, or
the caption's first token), predicted from the ``</image>`` position. That is the original loader's
``gpt_loss_mask`` (0 on the ``<s>``, ``<image>`` and slot positions, 1 from ``</image>`` on, over the shifted
targets). ``</s>`` is supervised; padding gets -100 when batches are made.

Everything here is pure Python over a :class:`~kosmos.data.tokenizer.KosmosTokenizer`; no torch.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from grit_core.record import GritRecord, containment_filter, group_phrases
from kosmos.data.location import NUM_BINS, Box, box_to_patch_indices, patch_indices_to_box
from kosmos.data.tokenizer import KosmosTokenizer
from kosmos.data.transform import IMAGE_SIZE, ImageFrame, frame_geometry

IGNORE_INDEX = -100
PhraseMode = Literal["expression", "chunk"]


@dataclass
class SequenceConfig:
    """How a GRIT record becomes a token sequence (the original loader's settings as defaults)."""

    # "expression": ref_exps after the containment filter (phrase_mode "expression"); "chunk": noun_chunks.
    phrase_mode: PhraseMode = "expression"
    # Re-applied at training time whatever threshold the corpus was built with (0.65 for the released model).
    box_score_threshold: float = 0.65
    # A box keeps its place only if at least this share of its area survives the centre crop.
    min_box_area_kept: float = 0.2
    # How the image becomes the model's square (kosmos/data/transform.py): "center_crop" (the original loader),
    # "square" (the released checkpoint's processor: the whole image, boxes unchanged), or "auto": square for a
    # model converted from Hugging Face, else center_crop.
    image_frame: ImageFrame = "auto"
    # use_object_bbox_prob: the share of grounded samples that are shown with their boxes; the others are
    # used as plain captions (no <grounding>, no boxes).
    use_grounding_prob: float = 0.5
    # Put <grounding> before a grounded caption (locate_special_token=1 in the original train.sh).
    grounding_token: bool = True
    image_size: int = IMAGE_SIZE
    num_image_tokens: int = 64
    num_bins: int = NUM_BINS


@dataclass(frozen=True)
class Phrase:
    """A caption span and its boxes, normalised to the cropped 224 x 224 image."""

    start: int
    end: int
    boxes: tuple[Box, ...]


@dataclass
class TokenizedSample:
    """One sample ready for batching. ``image_embeds_position_mask`` is 1 on the image slots."""

    input_ids: list[int]
    image_embeds_position_mask: list[int]
    labels: list[int]
    num_images: int
    grounded: bool = False
    phrases: list[Phrase] = field(default_factory=list)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


class ReservedTokenInText(ValueError):
    """Caption text that the tokenizer reads as a tag, location or ``<mask>`` token (``"<phrase>"`` written in a
    web caption, say): such a sample would teach the model fake structure, so the loader drops and counts it."""


# ---------------------------------------------------------------------------------------------------------------
# Boxes and phrases
# ---------------------------------------------------------------------------------------------------------------


def remap_box_to_crop(
    box: Sequence[float],
    width: int,
    height: int,
    size: int = IMAGE_SIZE,
    min_area_kept: float = 0.2,
    frame: ImageFrame = "center_crop",
) -> Box | None:
    """A box normalised to a ``width x height`` image, normalised to the model's frame of it instead: the resized
    centre crop, or for ``square`` the whole image (the box unchanged).

    ``None`` when less than ``min_area_kept`` of its area lies inside the crop, or nothing of it does. The crop
    offsets are the integer ones the pixels go through (:func:`~kosmos.data.transform.frame_geometry`); the
    original loader used the unrounded ``(side - 224) / 2``, half a pixel away at most.
    """
    new_w, new_h, left, top = frame_geometry(width, height, size, frame)
    x1, y1, x2, y2 = box[0] * new_w, box[1] * new_h, box[2] * new_w, box[3] * new_h
    area = (x2 - x1) * (y2 - y1)
    if not area > 0:
        return None
    cx1, cx2 = (min(max(v - left, 0.0), size) for v in (x1, x2))
    cy1, cy2 = (min(max(v - top, 0.0), size) for v in (y1, y2))
    if not (cx2 > cx1 and cy2 > cy1):
        return None
    if (cx2 - cx1) * (cy2 - cy1) / area < min_area_kept:
        return None
    return cx1 / size, cy1 / size, cx2 / size, cy2 / size


def _valid_entry(entry: Any, caption_len: int) -> bool:
    try:
        if len(entry) != 7:
            return False
        start, end = int(entry[0]), int(entry[1])
        x1, y1, x2, y2, score = (float(v) for v in entry[2:7])
    except (TypeError, ValueError):
        return False
    if start != entry[0] or end != entry[1] or not (0 <= start < end <= caption_len):
        return False
    return all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2, score)) and x1 < x2 and y1 < y2


def select_phrases(
    record: GritRecord,
    cfg: SequenceConfig,
    image_width: int | None = None,
    image_height: int | None = None,
    counts: Counter | None = None,
) -> list[Phrase]:
    """The phrases of ``record`` to ground, in caption order, with their boxes in crop coordinates.

    In order: drop malformed entries; keep boxes with score >= the threshold; remap each through the resize and
    centre crop of an ``image_width x image_height`` image (the decoded image; the record's own size by default:
    boxes are normalised, so they survive any resizing of the stored image), dropping those that mostly fall
    outside; then, in expression mode, the containment filter over what is left (the original loader filters
    after thresholding too); entries of one span become one phrase. A span overlapping an earlier kept span is
    dropped. Every drop is counted in ``counts``.
    """
    counts = counts if counts is not None else Counter()
    width = image_width or record.width
    height = image_height or record.height
    entries = record.ref_exps if cfg.phrase_mode == "expression" else record.noun_chunks
    kept = []
    for entry in entries or []:
        if not _valid_entry(entry, len(record.caption)):
            counts["boxes_malformed"] += 1
            continue
        start, end, *box, score = entry
        if float(score) < cfg.box_score_threshold:
            counts["boxes_below_score"] += 1
            continue
        crop_box = remap_box_to_crop(box, width, height, cfg.image_size, cfg.min_box_area_kept, cfg.image_frame)
        if crop_box is None:
            counts["boxes_cropped_out"] += 1
            continue
        kept.append([int(start), int(end), *crop_box, float(score)])
    if cfg.phrase_mode == "expression":
        filtered = containment_filter(kept)
        counts["boxes_contained"] += len(kept) - len(filtered)
        kept = filtered
    phrases: list[Phrase] = []
    for start, end, boxes in sorted(group_phrases(kept), key=lambda g: (g[0], g[1])):
        if phrases and start < phrases[-1].end:
            counts["phrases_overlapping"] += 1
            continue
        phrases.append(Phrase(start, end, tuple(tuple(b[:4]) for b in boxes)))
    return phrases


# ---------------------------------------------------------------------------------------------------------------
# Token sequences
# ---------------------------------------------------------------------------------------------------------------


def _check_text_ids(tokenizer: KosmosTokenizer, ids: Sequence[int]) -> None:
    reserved = tokenizer.reserved_ids
    bad = [i for i in ids if i in reserved]
    if bad:
        raise ReservedTokenInText(f"text contains {tokenizer.id_to_token(bad[0])!r} written out")


def phrase_token_ranges(
    caption: str, offsets: Sequence[tuple[int, int]], phrases: Sequence[Phrase]
) -> list[tuple[int, int] | None]:
    """For each phrase, the token range ``[first, last + 1)`` covering its characters, or None if no token does.

    A token belongs to a phrase when it covers a non-space character of the span; a token that straddles the
    span's edge (``dogs`` for the phrase ``dog``) is included whole, as in the original loader.
    """
    ranges: list[tuple[int, int] | None] = []
    for p in phrases:
        first = last = None
        for i, (a, b) in enumerate(offsets):
            lo, hi = max(a, p.start), min(b, p.end)
            if lo < hi and not caption[lo:hi].isspace():
                if first is None:
                    first = i
                last = i
        ranges.append(None if first is None else (first, last + 1))
    return ranges


def object_ids(tokenizer: KosmosTokenizer, boxes: Sequence[Box], num_bins: int = NUM_BINS) -> list[int]:
    """``</phrase>`` excluded: ``<object> ul lr [<delimiter> ul lr ...] </object>``."""
    out = [tokenizer.object_id]
    for k, box in enumerate(boxes):
        if k:
            out.append(tokenizer.delimiter_id)
        ul, lr = box_to_patch_indices(box, num_bins)
        out += [tokenizer.loc_token_id(ul), tokenizer.loc_token_id(lr)]
    out.append(tokenizer.object_end_id)
    return out


def caption_ids(
    tokenizer: KosmosTokenizer,
    caption: str,
    phrases: Sequence[Phrase] = (),
    num_bins: int = NUM_BINS,
    counts: Counter | None = None,
) -> tuple[list[int], list[Phrase]]:
    """The caption's ids with ``<phrase>..</phrase><object>..</object>`` inserted; and the phrases placed.

    A phrase that maps to no token, or to tokens already taken by an earlier phrase, is dropped and counted.
    """
    counts = counts if counts is not None else Counter()
    ids, offsets = tokenizer.encode_with_offsets(caption)
    _check_text_ids(tokenizer, ids)
    if not phrases:
        return ids, []
    opens: dict[int, int] = {}
    closes: dict[int, list[int]] = {}
    placed: list[Phrase] = []
    taken_until = 0
    for phrase, token_range in zip(phrases, phrase_token_ranges(caption, offsets, phrases)):
        if token_range is None:
            counts["phrases_without_tokens"] += 1
            continue
        first, stop = token_range
        if first < taken_until:
            counts["phrases_sharing_tokens"] += 1
            continue
        opens[first] = tokenizer.phrase_id
        closes[stop - 1] = [tokenizer.phrase_end_id, *object_ids(tokenizer, phrase.boxes, num_bins)]
        placed.append(phrase)
        taken_until = stop
    out: list[int] = []
    for i, token_id in enumerate(ids):
        if i in opens:
            out.append(opens[i])
        out.append(token_id)
        out.extend(closes.get(i, ()))
    return out, placed


def image_prefix(tokenizer: KosmosTokenizer, num_image_tokens: int = 64) -> tuple[list[int], list[int]]:
    """``<s> <image> slots </image>`` and its image-slot mask."""
    ids = [tokenizer.bos_id, tokenizer.boi_id, *tokenizer.image_slot_ids(num_image_tokens), tokenizer.eoi_id]
    mask = [0, 0] + [1] * num_image_tokens + [0]
    return ids, mask


def labels_for(input_ids: Sequence[int], num_unsupervised: int) -> list[int]:
    """``input_ids`` with the first ``num_unsupervised`` positions set to -100 (HF alignment; see module doc)."""
    return [IGNORE_INDEX] * num_unsupervised + list(input_ids[num_unsupervised:])


def build_image_text_sample(
    tokenizer: KosmosTokenizer,
    caption: str,
    phrases: Sequence[Phrase] | None,
    cfg: SequenceConfig,
    counts: Counter | None = None,
) -> TokenizedSample:
    """``<s> <image> slots </image> [<grounding>] caption </s>``; grounded when ``phrases`` places any box."""
    counts = counts if counts is not None else Counter()
    prefix, mask = image_prefix(tokenizer, cfg.num_image_tokens)
    body, placed = caption_ids(tokenizer, caption, phrases or (), cfg.num_bins, counts)
    grounded = bool(placed)
    if phrases and not grounded:
        counts["plain_no_phrase"] += 1
    lead = [tokenizer.grounding_id] if grounded and cfg.grounding_token else []
    ids = prefix + lead + body + [tokenizer.eos_id]
    return TokenizedSample(
        input_ids=ids,
        image_embeds_position_mask=mask + [0] * (len(ids) - len(mask)),
        labels=labels_for(ids, len(prefix)),
        num_images=1,
        grounded=grounded,
        phrases=placed,
    )


def build_grounded_sample(
    record: GritRecord,
    tokenizer: KosmosTokenizer,
    cfg: SequenceConfig,
    rng: random.Random,
    image_width: int | None = None,
    image_height: int | None = None,
    counts: Counter | None = None,
) -> TokenizedSample:
    """A GRIT record as a training sequence: grounded with probability ``cfg.use_grounding_prob`` (one draw from
    ``rng``, always made, so the random stream does not depend on the record), else a plain caption. A sample
    whose boxes are all filtered out is a plain caption too (counted ``plain_no_phrase``)."""
    counts = counts if counts is not None else Counter()
    use_boxes = rng.random() < cfg.use_grounding_prob
    if not use_boxes:
        counts["plain_by_choice"] += 1
        return build_image_text_sample(tokenizer, record.caption, None, cfg, counts)
    phrases = select_phrases(record, cfg, image_width, image_height, counts)
    if not phrases:
        counts["plain_no_phrase"] += 1
        return build_image_text_sample(tokenizer, record.caption, None, cfg, counts)
    sample = build_image_text_sample(tokenizer, record.caption, phrases, cfg, counts)
    if sample.grounded:
        counts["grounded"] += 1
    return sample


def build_text_sample(tokenizer: KosmosTokenizer, text: str, max_length: int | None = None) -> TokenizedSample:
    """A text-only sample ``<s> text </s>``; longer than ``max_length``: cut (no ``</s>``: the text goes on)."""
    body = tokenizer.encode(text)
    _check_text_ids(tokenizer, body)
    ids = [tokenizer.bos_id, *body, tokenizer.eos_id]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids = ids[:max_length]
    return TokenizedSample(ids, [0] * len(ids), labels_for(ids, 1), num_images=0, truncated=truncated)


def build_prompt(tokenizer: KosmosTokenizer, text: str = "<grounding>", num_image_tokens: int = 64):
    """Generation input: ``<s> <image> slots </image>`` then ``text`` (tags in it are recognised).

    Returns ``(input_ids, image_embeds_position_mask)``, as transformers' processor gives them for an image and
    ``text`` without ``</s>``.
    """
    ids, mask = image_prefix(tokenizer, num_image_tokens)
    body = tokenizer.encode(text)
    return ids + body, mask + [0] * len(body)


# ---------------------------------------------------------------------------------------------------------------
# Parsing generated text (the inverse), with the output of transformers' ``post_process_generation``
# ---------------------------------------------------------------------------------------------------------------

_TAG_RE = re.compile(r"<.*?>")
_ENTITY_RE = re.compile(
    r"(?:(<phrase>([^<]+)</phrase>))?"
    r"<object>((?:<patch_index_\d+><patch_index_\d+></delimiter_of_multi_objects/>)*<patch_index_\d+><patch_index_\d+>)"
    r"</object>"
)
_PAIR_RE = re.compile(r"<patch_index_(\d+)><patch_index_(\d+)>")

Entity = tuple[str, tuple[int, int], list[Box]]


def _clean_len(text: str) -> int:
    return len(_TAG_RE.sub("", text))


def parse_grounded_text(text: str, num_bins: int = NUM_BINS) -> tuple[str, list[Entity]]:
    """``(clean text, [(phrase, (start, end), [boxes])])`` from text with Kosmos-2 tags.

    Tags (anything in ``<...>``) are removed and the text stripped; each ``<phrase>p</phrase><object>...</object>``
    gives the phrase, stripped, its character span in the clean text, and its boxes decoded from bin centres
    (:func:`~kosmos.data.location.patch_indices_to_box`). An ``<object>`` without a phrase gives one entity per box,
    named after its two indices and with an empty span at its position. Same output as transformers'
    ``clean_text_and_extract_entities_with_bboxes`` (tests compare the two).
    """
    clean = _TAG_RE.sub("", text)
    lead = len(clean) - len(clean.lstrip())
    entities: list[Entity] = []
    for match in _ENTITY_RE.finditer(text):
        pairs = [(int(a), int(b)) for a, b in _PAIR_RE.findall(match.group(3))]
        if match.group(1):
            name = match.group(2)
            start, end = _clean_len(text[: match.start(2)]), _clean_len(text[: match.end(2)])
            pad_left = len(name) - len(name.lstrip())
            pad_right = len(name) - len(name.rstrip())
            boxes = [patch_indices_to_box(a, b, num_bins) for a, b in pairs]
            entities.append((name.strip(), (start - lead + pad_left, end - lead - pad_right), boxes))
        else:
            at = _clean_len(text[: match.start(0)]) - lead
            for a, b in pairs:
                name = f"<patch_index_{a}><patch_index_{b}>"
                entities.append((name, (at, at), [patch_indices_to_box(a, b, num_bins)]))
    return clean.strip(), entities


def post_process_generation(text: str, num_bins: int = NUM_BINS) -> tuple[str, list[Entity]]:
    """:func:`parse_grounded_text` on what follows the last ``</image>`` (the prompt's image part is dropped)."""
    return parse_grounded_text(text.split("</image>")[-1], num_bins)


def parse_generated_ids(
    ids: Sequence[int], tokenizer: KosmosTokenizer, num_bins: int = NUM_BINS
) -> tuple[str, list[Entity]]:
    """Generated ids (prompt included or not) to ``(clean text, entities)``: decode what follows the last
    ``</image>``, keeping tags, then :func:`parse_grounded_text`."""
    ids = [int(i) for i in ids]
    if tokenizer.eoi_id in ids:
        ids = ids[len(ids) - ids[::-1].index(tokenizer.eoi_id) :]
    return parse_grounded_text(tokenizer.decode(ids, skip_special_tokens=True), num_bins)
