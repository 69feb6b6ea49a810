"""Selection and NMS on the device against the host functions of scoring.py, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grit_pipeline.grounding.batching import ShapeQueues
from grit_pipeline.grounding.device_nms import finish_sorted, greedy_nms, queue_selection
from grit_pipeline.grounding.scoring import finalize, nms, select_candidates


def tied_outputs(seed: int, batch: int, queries: int, phrases: int):
    """Phrase scores on a coarse grid (many exact ties, also across phrases of one query) and boxes with exact
    duplicates, boxes past the image and slivers."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 9, (batch, queries, phrases)).astype(np.float32) / 8
    centre = rng.integers(0, 11, (batch, queries, 2)) / 10
    size = rng.integers(0, 7, (batch, queries, 2)) / 10
    boxes = np.concatenate([centre, size], axis=-1).astype(np.float32)
    boxes[:, 1::3] = boxes[:, 0:-1:3][:, : boxes[:, 1::3].shape[1]]  # duplicated boxes
    return scores, boxes


def host_reference(scores, boxes, phrase_ids, threshold, nms_iou, cap, min_side):
    cands = select_candidates(scores, boxes, phrase_ids, threshold)
    return len(cands), finalize(cands, nms_iou, cap, min_side)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("nms_iou", [0.5, 0.0, None])
def test_device_selection_and_nms_equal_the_host_functions(seed, nms_iou):
    batch, queries, phrases = 3, 60, 4
    scores, boxes = tied_outputs(seed, batch, queries, phrases)
    threshold, min_side, cap = 0.375, 0.05, 2
    sel = queue_selection(torch.from_numpy(scores), torch.from_numpy(boxes), threshold, min_side, nms_iou, cap=16)
    parts = sel.fetch()
    for k in range(batch):
        phrase_ids = np.arange(phrases) * 10 + k
        raw, expected = host_reference(scores[k], boxes[k], phrase_ids, threshold, nms_iou, cap, min_side)
        got_boxes, got_phrases, got_scores = finish_sorted(parts[k], phrase_ids, cap)
        assert parts[k].num_raw == raw
        np.testing.assert_array_equal(got_phrases, expected.phrases)
        np.testing.assert_array_equal(got_scores, expected.scores)
        np.testing.assert_array_equal(got_boxes, expected.boxes)


def test_items_over_the_cap_take_the_full_list_and_still_match():
    scores, boxes = tied_outputs(7, 2, 80, 3)
    sel = queue_selection(torch.from_numpy(scores), torch.from_numpy(boxes), 0.1, 0.0, 0.5, cap=4)
    parts = sel.fetch()
    assert all(len(p.scores) > 4 for p in parts)  # the cap was passed, the whole lists came back
    for k in range(2):
        _, expected = host_reference(scores[k], boxes[k], np.arange(3), 0.1, 0.5, None, 0.0)
        got_boxes, got_phrases, got_scores = finish_sorted(parts[k], np.arange(3), None)
        np.testing.assert_array_equal(got_boxes, expected.boxes)
        np.testing.assert_array_equal(got_scores, expected.scores)
        np.testing.assert_array_equal(got_phrases, expected.phrases)


def test_greedy_scan_equals_scoring_nms_on_sorted_input():
    rng = np.random.default_rng(3)
    xy = rng.integers(0, 6, (40, 2)) / 10
    boxes = np.concatenate([xy, xy + rng.integers(1, 5, (40, 2)) / 10], axis=1)
    scores = np.sort(rng.integers(0, 4, 40) / 4)[::-1].copy()  # sorted, with ties
    from grit_pipeline.grounding.device_nms import pairwise_overlaps

    np.testing.assert_array_equal(greedy_nms(pairwise_overlaps(boxes, 0.3)), nms(boxes, scores, 0.3))


def test_shape_queues_pop_whole_batches_first_in_first_out():
    q = ShapeQueues(3)
    q.add((32, 32), [1, 2])
    q.add((32, 64), [10])
    assert q.full() == []
    q.add((32, 32), [3, 4])
    assert q.full() == [[1, 2, 3]]
    assert q.pop((32, 64)) == [10] and q.pop((32, 64)) == []
    q.add((64, 32), [20, 21, 22, 23])
    assert q.drain() == [[4], [20, 21, 22], [23]]
    assert len(q) == 0
