"""Held-out evaluation: the loss, and phrase-grounding accuracy (given a phrase, is the predicted box right?).

Phrase grounding, as Kosmos-2 is prompted for it (and as transformers' model card does): the input is
``<s><image>[slots]</image><grounding><phrase> text</phrase>``; the model's answer is
``<object><patch_index_ul><patch_index_lr></object>``. We feed ``<object>`` and read the two location tokens:
the most likely upper-left bin among the 1,024, then the most likely lower-right bin among those not above or left
of it. That is the box greedy generation yields whenever it emits a well-formed one, and it always yields one;
``object_token_rate`` reports how often ``<object>`` was also the model's own first choice. A prediction is correct
when its IoU with one of the phrase's boxes (in the coordinates of the centre crop the model sees) is >= 0.5.

Two baselines that never look at the image, computed on the same phrases: the mean box of the evaluated set, and
a box of the mean width and height centred in the image. ``shuffle_images`` scores every caption with another
sample's image (each image moves one place): a model that uses the image falls to about the baselines.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from kosmos.data.location import Box, patch_indices_to_box
from kosmos.data.sequence import SequenceConfig, TokenizedSample, image_prefix
from kosmos.data.tokenizer import KosmosTokenizer
from kosmos.model.generation import KVCache
from kosmos.model.model import KosmosModel

IOU_THRESHOLD = 0.5


@dataclass
class EvalSample:
    key: str
    pixel_values: np.ndarray  # (3, H, W), CLIP-normalised
    tokens: TokenizedSample  # shown grounded (every phrase with its boxes), for the loss
    phrases: list[tuple[str, list[Box]]]  # phrase text and its boxes in crop coordinates


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def best_iou(box: Sequence[float], targets: Sequence[Sequence[float]]) -> float:
    return max((box_iou(box, t) for t in targets), default=0.0)


def read_eval_samples(
    shards: Sequence[str],
    tokenizer: KosmosTokenizer,
    seq: SequenceConfig,
    max_samples: int = 0,
    max_length: int = 2048,
) -> tuple[list[EvalSample], Counter]:
    """The grounded samples of GRIT shards, in file order, decoded like the training loader does (same transform,
    box remapping, score threshold and containment filter) but always shown grounded. Bad samples are counted."""
    import webdataset as wds

    from kosmos.data.shards import complete_shards, expand_shard_patterns
    from kosmos.data.sources import LogAndContinue, SourceConfig, decode_or_count

    urls, _ = complete_shards(expand_shard_patterns(list(shards)))
    if not urls:
        raise FileNotFoundError(f"no complete shard in {list(shards)}")
    source = SourceConfig(name="eval", kind="grit", shards=list(urls))
    grounded = replace(seq, use_grounding_prob=1.0)
    counts: Counter = Counter()
    logged: Counter = Counter()
    out: list[EvalSample] = []
    stream = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=LogAndContinue(counts)))
    for raw in stream:
        sample = decode_or_count(raw, source, tokenizer, grounded, max_length, 0, counts, logged)
        if sample is None:
            continue
        caption = json.loads(raw["json"])["caption"] if raw.get("json") else ""
        phrases = [(caption[p.start : p.end], [tuple(b) for b in p.boxes]) for p in sample.tokens.phrases]
        out.append(EvalSample(sample.key, sample.pixel_values, sample.tokens, phrases))
        if max_samples and len(out) >= max_samples:
            break
    return out, counts


def phrase_prompt(tokenizer: KosmosTokenizer, phrase: str, num_image_tokens: int) -> tuple[list[int], list[int]]:
    """``<s><image>[slots]</image><grounding><phrase> text</phrase><object>`` and its image-slot mask. The phrase
    is encoded alone, as it is in a training caption (a word-initial space before it)."""
    ids, mask = image_prefix(tokenizer, num_image_tokens)
    tail = [tokenizer.grounding_id, tokenizer.phrase_id, *tokenizer.encode(phrase.strip())]
    tail += [tokenizer.phrase_end_id, tokenizer.object_id]
    return ids + tail, mask + [0] * len(tail)


@torch.no_grad()
def predict_boxes(
    model: KosmosModel, tokenizer: KosmosTokenizer, pixel_values: torch.Tensor, phrases: Sequence[str]
) -> tuple[list[Box], list[bool]]:
    """One box per (image, phrase) pair, and whether ``<object>`` was the model's own choice after ``</phrase>``.

    Prompts are left-padded into one batch; the two location tokens come from a KV-cached pass each.
    """
    cfg = model.config
    device = next(model.parameters()).device
    prompts = [phrase_prompt(tokenizer, p, cfg.latent_query_num) for p in phrases]
    width = max(len(ids) for ids, _ in prompts)
    pad = cfg.text.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    slots = torch.zeros_like(ids)
    attention = torch.zeros_like(ids)
    for i, (row, mask) in enumerate(prompts):
        ids[i, width - len(row) :] = torch.tensor(row)
        slots[i, width - len(row) :] = torch.tensor(mask)
        attention[i, width - len(row) :] = 1
    ids, slots, attention = ids.to(device), slots.to(device), attention.to(device)
    embeds = model.encode_image(pixel_values.to(device))
    cache = KVCache(len(model.blocks), width + 1)
    logits = model(
        input_ids=ids, image_embeds=embeds, image_embeds_position_mask=slots, attention_mask=attention, cache=cache
    ).logits  # (B, T, V)
    chose_object = (logits[:, -2].argmax(-1) == tokenizer.object_id).tolist()
    start, n, bins = cfg.loc_token_start, cfg.loc_bins**2, cfg.loc_bins
    ul = logits[:, -1, start : start + n].float().argmax(-1)  # (B,)
    # The next position, numbered after the real tokens as in training (left padding must not shift it).
    positions = attention.sum(dim=1, keepdim=True) + pad + 1
    attention = torch.cat([attention, attention.new_ones(len(prompts), 1)], dim=1)
    step = model(input_ids=(ul + start)[:, None], attention_mask=attention, position_ids=positions, cache=cache)
    scores = step.logits[:, -1, start : start + n].float()  # (B, n)
    grid = torch.arange(n, device=device)
    below_right = (grid[None] // bins >= (ul // bins)[:, None]) & (grid[None] % bins >= (ul % bins)[:, None])
    lr = scores.masked_fill(~below_right, -math.inf).argmax(-1)
    boxes = [patch_indices_to_box(int(a), int(b), bins) for a, b in zip(ul.tolist(), lr.tolist())]
    return boxes, chose_object


def baseline_boxes(targets: Sequence[Sequence[Box]]) -> dict[str, Box]:
    """The mean box of the phrases' first boxes, and the box of their mean size centred in the image."""
    first = np.asarray([t[0] for t in targets], dtype=np.float64).reshape(-1, 4)
    mean = tuple(float(v) for v in first.mean(axis=0))
    w, h = float((first[:, 2] - first[:, 0]).mean()), float((first[:, 3] - first[:, 1]).mean())
    return {"mean_box": mean, "centred_box": (0.5 - w / 2, 0.5 - h / 2, 0.5 + w / 2, 0.5 + h / 2)}


@torch.no_grad()
def evaluate_samples(
    model: KosmosModel,
    tokenizer: KosmosTokenizer,
    samples: Sequence[EvalSample],
    batch_size: int = 32,
    shuffle_images: bool = False,
) -> dict[str, Any]:
    """Loss (mean over target tokens) and grounding accuracy of ``model`` on ``samples``; see the module doc."""
    from kosmos.data.collate import collate_rows
    from kosmos.data.sources import LoaderSample

    if not samples:
        raise ValueError("no samples to evaluate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = [s.pixel_values for s in samples]
    if shuffle_images and len(images) > 1:
        images = images[1:] + images[:1]
    loss_sum, targets = 0.0, 0
    for i in range(0, len(samples), batch_size):
        chunk = range(i, min(i + batch_size, len(samples)))
        rows = [[LoaderSample(samples[j].tokens, images[j], samples[j].key, "eval")] for j in chunk]
        batch = collate_rows(rows, tokenizer.pad_id, 8, model.config.vision.image_size)
        out = model(
            batch["pixel_values"].to(device),
            batch["input_ids"].to(device),
            batch["image_embeds_position_mask"].to(device),
            labels=batch["labels"].to(device),
            reduction="sum",
            return_logits=False,
        )
        loss_sum += float(out.loss)
        targets += int(batch["labels"][:, 1:].ne(-100).sum())
    pairs = [(j, text, boxes) for j, s in enumerate(samples) for text, boxes in s.phrases]
    ious, objects = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        pixels = torch.from_numpy(np.stack([images[j] for j, _, _ in chunk]))
        boxes, chose = predict_boxes(model, tokenizer, pixels, [text for _, text, _ in chunk])
        ious += [best_iou(box, target) for box, (_, _, target) in zip(boxes, chunk)]
        objects += chose
    model.train(was_training)
    result: dict[str, Any] = {
        "samples": len(samples),
        "phrases": len(pairs),
        "loss": loss_sum / max(targets, 1),
        "targets": targets,
        "accuracy": sum(v >= IOU_THRESHOLD for v in ious) / max(len(ious), 1),
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
        "object_token_rate": sum(objects) / max(len(objects), 1),
        "shuffled_images": shuffle_images,
    }
    if pairs:
        result["baselines"] = {
            name: sum(best_iou(box, target) >= IOU_THRESHOLD for _, _, target in pairs) / len(pairs)
            for name, box in baseline_boxes([target for _, _, target in pairs]).items()
        }
    return result
