"""Candidate selection and NMS for a forward group on the device, with the results of the host functions.

:func:`queue_selection` runs right after a forward pass, in the same stream, and starts the copy of its (small)
results to pinned host memory; nothing waits for the device until :meth:`DeviceSelection.fetch`, which the
detector calls one group later. Per item it gives the candidates over the threshold, clipped to the image and
filtered by the minimum side, sorted best first (ties: the earlier query) and capped at ``cap`` of them, with the
matrix of which candidate pairs overlap by more than the NMS threshold. The greedy scan over that matrix
(:func:`greedy_nms`) and the per-phrase cap (:func:`finish_sorted`) then run on the host, over 10-50 candidates.

Equal to :func:`~grit_pipeline.grounding.scoring.select_candidates` followed by
:func:`~grit_pipeline.grounding.scoring.finalize`, ties included: scores, boxes and IoUs are computed in float64
with the same operations in the same order as the numpy code (IEEE float64 ``+ - * /``, ``min``, ``max`` round the
same everywhere), the sort is stable on ``(-score, query)`` as ``np.lexsort`` is, and ``torch.max`` returns the first
of equal phrase scores as ``np.argmax`` does. An item with more than ``cap`` candidates (random weights; trained ones
give 10-50) has its full candidate list copied instead, and the host functions run on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grit_pipeline.grounding.scoring import cap_per_phrase

DEFAULT_CAP = 128


@dataclass
class ItemCandidates:
    """Candidates of one item (image, prompt), best first."""

    boxes: np.ndarray  # (n, 4) float64 x1, y1, x2, y2, clipped
    phrases: np.ndarray  # (n,) int64, position in the item's prompt
    scores: np.ndarray  # (n,) float64
    queries: np.ndarray  # (n,) int64, query index (the host code's candidate order)
    num_raw: int  # queries over the threshold, before the clip and minimum-side filter
    overlaps: np.ndarray | None  # (n, n) bool, IoU > nms_iou; None without NMS


class DeviceSelection:
    """Results of :func:`queue_selection` for one forward group, on their way to the host."""

    def __init__(self, device_tensors: dict[str, torch.Tensor], full: dict[str, torch.Tensor], cap: int):
        self._full = full  # per-query tensors, kept on the device for items over the cap
        self.cap = cap
        cuda = next(iter(device_tensors.values())).device.type == "cuda"
        self._host = {}
        for name, t in device_tensors.items():
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
            host.copy_(t, non_blocking=cuda)
            self._host[name] = host
        self._event = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def fetch(self) -> list[ItemCandidates]:
        """Wait for the copies (the only wait on the device) and split them per item."""
        if self._event is not None:
            self._event.synchronize()
        h = {name: t.numpy() for name, t in self._host.items()}
        out = []
        for k, count in enumerate(h["counts"].tolist()):
            if count <= self.cap:
                n = count
                boxes, phrases = h["boxes"][k, :n], h["phrases"][k, :n]
                scores, queries = h["scores"][k, :n], h["queries"][k, :n]
                overlaps = h["overlaps"][k, :n, :n] if "overlaps" in h else None
            else:  # over the cap: this item's whole candidate list, one blocking copy
                order = self._full["order"][k, :count]
                boxes = self._full["boxes"][k][order].cpu().numpy()
                phrases = self._full["phrases"][k][order].cpu().numpy()
                scores = self._full["scores"][k][order].cpu().numpy()
                queries = order.cpu().numpy()
                overlaps = None if "overlaps" not in h else pairwise_overlaps(boxes, self._full["nms_iou"])
            out.append(ItemCandidates(boxes, phrases, scores, queries, int(h["raw"][k]), overlaps))
        return out


def queue_selection(
    scores: torch.Tensor,
    boxes_cxcywh: torch.Tensor,
    threshold: float,
    min_side: float,
    nms_iou: float | None,
    cap: int = DEFAULT_CAP,
) -> DeviceSelection:
    """Queue selection, filtering, sorting and the overlap matrices of a group; see the module docstring.

    ``scores`` (B, Q, P) phrase scores (phrases past an item's own count score 0), ``boxes_cxcywh`` (B, Q, 4).
    """
    s = scores.double()
    best_score, best = s.max(dim=-1)  # (B, Q): the first phrase of equal scores, as np.argmax
    passed = best_score >= threshold
    b = boxes_cxcywh.double()
    cx, cy, w, h = b.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).clamp(0.0, 1.0)
    bw, bh = xyxy[..., 2] - xyxy[..., 0], xyxy[..., 3] - xyxy[..., 1]
    valid = passed & (bw >= min_side) & (bh >= min_side) & (bw > 0) & (bh > 0)
    key = torch.where(valid, best_score, torch.full_like(best_score, -1.0))  # scores are >= 0
    _, order = torch.sort(key, dim=1, descending=True, stable=True)  # (B, Q): ties keep the query order
    counts = valid.sum(dim=1)
    k = min(cap, order.shape[1])
    top = order[:, :k]
    top_boxes = torch.gather(xyxy, 1, top[..., None].expand(-1, -1, 4))
    tensors = {
        "counts": counts,
        "raw": passed.sum(dim=1),
        "boxes": top_boxes,
        "phrases": torch.gather(best, 1, top),
        "scores": torch.gather(best_score, 1, top),
        "queries": top,
    }
    full = {"order": order, "boxes": xyxy, "phrases": best, "scores": best_score}
    if nms_iou is not None:
        tensors["overlaps"] = pairwise_iou(top_boxes) > nms_iou
        full["nms_iou"] = nms_iou
    return DeviceSelection(tensors, full, k)


def pairwise_iou(boxes: torch.Tensor) -> torch.Tensor:
    """(..., N, N) IoU of (..., N, 4) boxes, row i computed as :func:`scoring.box_iou` computes box i's."""
    a, o = boxes[..., :, None, :], boxes[..., None, :, :]
    ix1 = torch.maximum(a[..., 0], o[..., 0])
    iy1 = torch.maximum(a[..., 1], o[..., 1])
    ix2 = torch.minimum(a[..., 2], o[..., 2])
    iy2 = torch.minimum(a[..., 3], o[..., 3])
    inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
    area = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    areas = (o[..., 2] - o[..., 0]) * (o[..., 3] - o[..., 1])
    union = area + areas - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)), 0.0)


def pairwise_overlaps(boxes: np.ndarray, nms_iou: float) -> np.ndarray:
    return (pairwise_iou(torch.from_numpy(np.asarray(boxes, dtype=np.float64))) > nms_iou).numpy()


def greedy_nms(overlaps: np.ndarray) -> np.ndarray:
    """Greedy NMS over candidates already sorted best first: positions kept, in order."""
    n = len(overlaps)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return np.asarray(keep, dtype=np.int64)


def finish_sorted(
    cands: ItemCandidates, phrase_ids: np.ndarray, max_per_phrase: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NMS, per-phrase cap and the final order of :func:`scoring.finalize` for an image with one item:
    (boxes, global phrase ids, scores), sorted by phrase, then score, best first."""
    from grit_pipeline.grounding.scoring import Candidates

    order = greedy_nms(cands.overlaps) if cands.overlaps is not None else np.arange(len(cands.scores))
    phrases = np.asarray(phrase_ids, dtype=np.int64)[cands.phrases]
    sorted_cands = Candidates(cands.boxes, phrases, cands.scores)
    if max_per_phrase is not None:
        order = cap_per_phrase(sorted_cands, order, max_per_phrase)
    boxes, phrases, scores = cands.boxes[order], phrases[order], cands.scores[order]
    final = np.lexsort((np.arange(len(scores)), -scores, phrases))
    return boxes[final], phrases[final], scores[final]
