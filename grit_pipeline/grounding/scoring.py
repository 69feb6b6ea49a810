"""From a detector's raw outputs to phrase boxes: the rules of GRIT_SPEC 3.3 as plain functions.

Prompt building and splitting, the token-to-phrase map (the "positive map" of GLIP / Grounding DINO, built from
each phrase's character span in the prompt), phrase scores, thresholding, clipping, class-agnostic NMS and the
per-phrase cap. No model is needed: every function here is tested on hand-made inputs.

A phrase's score for a query is the mean or the largest sigmoid over the phrase's own tokens
(``detector.phrase_score``). The library's ``text_labels`` are not used: they are assembled from whichever tokens
pass a threshold, so they can merge two phrases or cut one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PHRASE_SEPARATOR = " . "
# Grounding DINO splits its prompt at these tokens; inside a phrase they would cut it in two.
DELIMITER_CHARS = ".?"


@dataclass(frozen=True)
class Prompt:
    """One text pass: ``text`` holds the phrases ``phrase_ids`` at character ``spans`` (end exclusive)."""

    text: str
    phrase_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]


@dataclass
class Candidates:
    """Boxes of one image that passed the threshold: ``boxes`` (N, 4) normalised x1, y1, x2, y2."""

    boxes: np.ndarray
    phrases: np.ndarray  # (N,) int, phrase index
    scores: np.ndarray  # (N,) float

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.zeros((0, 4), np.float64), np.zeros((0,), np.int64), np.zeros((0,), np.float64))

    @classmethod
    def concat(cls, parts: Sequence[Candidates]) -> Candidates:
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.boxes for p in parts]).reshape(-1, 4),
            np.concatenate([p.phrases for p in parts]),
            np.concatenate([p.scores for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.scores)


def prompt_phrase(text: str) -> str:
    """A phrase as it appears in the prompt: lower case, delimiter characters and runs of spaces made one space."""
    cleaned = "".join(" " if c in DELIMITER_CHARS else c for c in text.lower())
    return " ".join(cleaned.split())


def build_prompt(phrases: Sequence[str], phrase_ids: Sequence[int]) -> Prompt:
    """``"chunk one . chunk two ."`` with the character span of every phrase (phrases already cleaned)."""
    parts, spans, pos = [], [], 0
    for phrase in phrases:
        spans.append((pos, pos + len(phrase)))
        parts.append(phrase)
        pos += len(phrase) + len(PHRASE_SEPARATOR)
    text = PHRASE_SEPARATOR.join(parts) + " ." if parts else ""
    return Prompt(text=text, phrase_ids=tuple(phrase_ids), spans=tuple(spans))


def plan_prompts(
    phrases: Sequence[str], token_counts: Sequence[int], max_tokens: int
) -> tuple[list[Prompt], list[int]]:
    """Pack phrases, in order, into as few prompts of at most ``max_tokens`` tokens as a greedy pass allows.

    ``token_counts[i]`` is the number of word-piece tokens of ``phrases[i]`` alone. A prompt costs two tokens
    (``[CLS]``, ``[SEP]``) plus, per phrase, its tokens and one ``.``: WordPiece never joins tokens across spaces
    or punctuation, so the counts add up. Returns the prompts and the indices of phrases too long for any prompt.
    Phrases with no token at all are skipped (nothing to score).
    """
    budget = max_tokens - 2
    prompts, too_long = [], []
    current: list[int] = []
    used = 0
    for i, count in enumerate(token_counts):
        if count <= 0:
            continue
        cost = count + 1
        if cost > budget:
            too_long.append(i)
            continue
        if used + cost > budget:
            prompts.append(build_prompt([phrases[j] for j in current], current))
            current, used = [], 0
        current.append(i)
        used += cost
    if current:
        prompts.append(build_prompt([phrases[j] for j in current], current))
    return prompts, too_long


def token_phrase_index(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """For each token, the position in ``spans`` of the phrase whose characters it covers, or -1.

    ``offsets`` are the tokenizer's character offsets into the prompt; special tokens have empty offsets.
    """
    index = np.full(len(offsets), -1, dtype=np.int64)
    for t, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        for p, (s, e) in enumerate(spans):
            if start >= s and end <= e:
                index[t] = p
                break
    return index


def phrase_scores(
    logits: torch.Tensor, token_phrase: torch.Tensor, num_phrases: int, reduce: str = "max"
) -> torch.Tensor:
    """score[b, q, p] = the mean (``reduce="mean"``) or max (``"max"``) over the tokens t of phrase p of
    sigmoid(logits[b, q, t]) (``detector.phrase_score``, GRIT_SPEC 3.3).

    ``mean`` is GLIP's ``SCORE_AGG="MEAN"`` and Grounding DINO's grounding evaluation (a normalised positive map);
    ``max`` is the Grounding DINO demo's and the Hugging Face post-processor's. ``logits`` (B, Q, T) query-token
    logits; ``token_phrase`` (B, T) phrase index of each token, -1 for tokens of no phrase (special tokens,
    separators, padding). A phrase with no token scores 0. Both are one scatter over the token axis; for max, since
    sigmoid is monotonic, the maximum is taken over logits and then squashed.
    """
    import torch  # here, not at the top: the annotation detector uses this module without torch

    if reduce not in ("max", "mean"):
        raise ValueError(f"phrase score reduce must be 'max' or 'mean', got {reduce!r}")
    logits = torch.as_tensor(logits)
    token_phrase = torch.as_tensor(token_phrase, device=logits.device)
    batch, queries, tokens = logits.shape
    # Tokens of no phrase go to an extra column that is dropped.
    column = torch.where(token_phrase >= 0, token_phrase, torch.full_like(token_phrase, num_phrases))
    if reduce == "mean":
        sums = torch.zeros((batch, queries, num_phrases + 1), dtype=logits.dtype, device=logits.device)
        sums = sums.scatter_add(2, column[:, None, :].expand(batch, queries, tokens), torch.sigmoid(logits))
        counts = torch.zeros((batch, num_phrases + 1), dtype=logits.dtype, device=logits.device)
        counts = counts.scatter_add(1, column, torch.ones_like(column, dtype=logits.dtype))
        return (sums / counts.clamp(min=1)[:, None, :])[:, :, :num_phrases]  # (B, Q, P)
    column = column[:, None, :].expand(batch, queries, tokens)
    out = torch.full((batch, queries, num_phrases + 1), float("-inf"), dtype=logits.dtype, device=logits.device)
    out = out.scatter_reduce(2, column, logits, reduce="amax", include_self=True)
    return torch.sigmoid(out[:, :, :num_phrases])


def select_candidates(
    scores: np.ndarray, boxes_cxcywh: np.ndarray, phrase_ids: Sequence[int], threshold: float
) -> Candidates:
    """Each query to its best phrase; keep it when that score >= ``threshold``.

    ``scores`` (Q, P) from :func:`phrase_scores` for one prompt, ``boxes_cxcywh`` (Q, 4) normalised centre/size
    boxes, ``phrase_ids`` the global index of each of the P phrases. Ties go to the earlier phrase.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return Candidates.empty()
    best = scores.argmax(axis=1)
    best_score = scores[np.arange(len(best)), best]
    keep = np.nonzero(best_score >= threshold)[0]
    boxes = cxcywh_to_xyxy(np.asarray(boxes_cxcywh, dtype=np.float64)[keep])
    return Candidates(boxes, np.asarray(phrase_ids, dtype=np.int64)[best[keep]], best_score[keep])


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).reshape(-1, 4)


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one x1, y1, x2, y2 box with each of ``others`` (N, 4)."""
    ix1 = np.maximum(box[0], others[:, 0])
    iy1 = np.maximum(box[1], others[:, 1])
    ix2 = np.minimum(box[2], others[:, 2])
    iy2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, class-agnostic: indices kept, best first.

    A box is suppressed when its IoU with a kept, better box is > ``iou_threshold``. Equal scores keep the
    earlier box, so the result does not depend on sort stability.
    """
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
    suppressed = np.zeros(len(scores), dtype=bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        rest = rest[~suppressed[rest]]
        if len(rest):
            suppressed[rest[box_iou(boxes[i], boxes[rest]) > iou_threshold]] = True
    return np.asarray(keep, dtype=np.int64)


def clip_and_filter(cands: Candidates, min_side: float) -> Candidates:
    """Clip boxes to the image; drop those narrower or lower than ``min_side`` (a fraction of the side)."""
    boxes = np.clip(cands.boxes, 0.0, 1.0)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    keep = (w >= min_side) & (h >= min_side) & (w > 0) & (h > 0)
    return Candidates(boxes[keep], cands.phrases[keep], cands.scores[keep])


def cap_per_phrase(cands: Candidates, order: np.ndarray, max_per_phrase: int) -> np.ndarray:
    """Of the indices ``order`` (best first), at most ``max_per_phrase`` per phrase, in that order."""
    counts: dict[int, int] = {}
    out = []
    for i in order:
        p = int(cands.phrases[i])
        if counts.get(p, 0) < max_per_phrase:
            counts[p] = counts.get(p, 0) + 1
            out.append(i)
    return np.asarray(out, dtype=np.int64)


def finalize(cands: Candidates, nms_iou: float | None, max_per_phrase: int | None, min_side: float) -> Candidates:
    """Clip and minimum side, then class-agnostic NMS (``nms_iou`` None: none), then the per-phrase cap (None:
    none). The result is sorted by phrase, then by score, best first."""
    cands = clip_and_filter(cands, min_side)
    if nms_iou is not None:
        order = nms(cands.boxes, cands.scores, nms_iou)
    else:
        order = np.lexsort((np.arange(len(cands)), -cands.scores))
    if max_per_phrase is not None:
        order = cap_per_phrase(cands, order, max_per_phrase)
    kept = Candidates(cands.boxes[order], cands.phrases[order], cands.scores[order])
    final = np.lexsort((np.arange(len(kept)), -kept.scores, kept.phrases))
    return Candidates(kept.boxes[final], kept.phrases[final], kept.scores[final])
