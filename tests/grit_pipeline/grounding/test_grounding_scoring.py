"""Span scoring, thresholds, NMS and prompt splitting on hand-made inputs (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grit_pipeline.grounding.scoring import (
    Candidates,
    build_prompt,
    finalize,
    nms,
    phrase_scores,
    plan_prompts,
    prompt_phrase,
    select_candidates,
    token_phrase_index,
)

NEG = -30.0  # a logit whose sigmoid is ~0


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def offsets_of(prompt: str, words: list[str]) -> list[tuple[int, int]]:
    """Character offsets of whitespace-separated tokens, with [CLS]/[SEP] as empty offsets (like a tokenizer)."""
    out, pos = [(0, 0)], 0
    for w in words:
        start = prompt.index(w, pos)
        out.append((start, start + len(w)))
        pos = start + len(w)
    return out + [(0, 0)]


def test_prompt_format_and_spans():
    prompt = build_prompt(["a man", "red hat"], [4, 7])
    assert prompt.text == "a man . red hat ."
    assert [prompt.text[s:e] for s, e in prompt.spans] == ["a man", "red hat"]
    assert prompt.phrase_ids == (4, 7)


def test_prompt_phrase_lowercases_and_removes_delimiters():
    assert prompt_phrase("  St. Louis   Arch? ") == "st louis arch"
    assert prompt_phrase("The DOG") == "the dog"


def test_multi_token_phrase_scores_its_best_token_only_within_its_span():
    prompt = build_prompt(["a red hat", "dog"], [0, 1])
    words = ["a", "red", "hat", ".", "dog", "."]
    index = token_phrase_index(offsets_of(prompt.text, words), prompt.spans)
    assert index.tolist() == [-1, 0, 0, 0, -1, 1, -1, -1]
    logits = torch.full((1, 2, len(index)), NEG)
    logits[0, 0, 2] = logit(0.7)  # "red" of phrase 0
    logits[0, 0, 3] = logit(0.4)  # "hat" of phrase 0
    logits[0, 0, 4] = logit(0.99)  # the "." separator belongs to no phrase
    logits[0, 1, 5] = logit(0.6)  # "dog"
    scores = phrase_scores(logits, torch.as_tensor(index)[None], num_phrases=2)
    assert scores.shape == (1, 2, 2)
    np.testing.assert_allclose(scores[0].numpy(), [[0.7, 0.0], [0.0, 0.6]], atol=1e-6)


def test_mean_phrase_score_averages_the_sigmoids_of_the_phrase_tokens():
    # GLIP's SCORE_AGG="MEAN": every token of the phrase counts, the separator and special tokens do not.
    prompt = build_prompt(["a red hat", "dog"], [0, 1])
    words = ["a", "red", "hat", ".", "dog", "."]
    index = token_phrase_index(offsets_of(prompt.text, words), prompt.spans)
    logits = torch.full((1, 2, len(index)), NEG)
    logits[0, 0, 1] = logit(0.2)  # "a"
    logits[0, 0, 2] = logit(0.7)  # "red"
    logits[0, 0, 3] = logit(0.4)  # "hat"
    logits[0, 0, 4] = logit(0.99)  # "." belongs to no phrase
    logits[0, 1, 5] = logit(0.6)  # "dog"
    scores = phrase_scores(logits, torch.as_tensor(index)[None], num_phrases=2, reduce="mean")
    np.testing.assert_allclose(scores[0].numpy(), [[(0.2 + 0.7 + 0.4) / 3, 0.0], [0.0, 0.6]], atol=1e-6)
    # The same logits under max: the best token alone.
    best = phrase_scores(logits, torch.as_tensor(index)[None], num_phrases=2, reduce="max")
    np.testing.assert_allclose(best[0].numpy(), [[0.7, 0.0], [0.0, 0.6]], atol=1e-6)


def test_mean_phrase_score_batched_rows_padding_and_empty_phrases():
    # Row 0: phrase 0 has one token, phrase 1 one; row 1: phrase 0 has two tokens, phrase 1 none (scores 0).
    index = torch.tensor([[-1, 0, 1, -1, -1], [-1, 0, 0, -1, -1]])
    logits = torch.tensor([[[0.0, 1.0, 2.0, 9.0, 50.0]], [[0.0, 1.0, 2.0, 9.0, 50.0]]])
    scores = phrase_scores(logits, index, num_phrases=2, reduce="mean")
    sig = torch.sigmoid(torch.tensor([1.0, 2.0]))
    expected = torch.tensor([[[sig[0], sig[1]]], [[(sig[0] + sig[1]) / 2, 0.0]]])
    torch.testing.assert_close(scores, expected)
    with pytest.raises(ValueError, match="max' or 'mean"):
        phrase_scores(logits, index, num_phrases=2, reduce="sum")


def test_two_phrases_sharing_a_word_score_separately():
    prompt = build_prompt(["red hat", "red car"], [0, 1])
    words = ["red", "hat", ".", "red", "car", "."]
    index = token_phrase_index(offsets_of(prompt.text, words), prompt.spans)
    assert index.tolist() == [-1, 0, 0, -1, 1, 1, -1, -1]
    logits = torch.full((1, 1, len(index)), NEG)
    logits[0, 0, 4] = logit(0.9)  # the second "red" only
    scores = phrase_scores(logits, torch.as_tensor(index)[None], num_phrases=2)
    np.testing.assert_allclose(scores[0, 0].numpy(), [0.0, 0.9], atol=1e-6)


def test_phrase_at_end_of_prompt_and_padding_tokens():
    prompt = build_prompt(["sky", "a tall tree"], [0, 1])
    words = ["sky", ".", "a", "tall", "tree", "."]
    index = token_phrase_index(offsets_of(prompt.text, words), prompt.spans)
    assert index.tolist() == [-1, 0, -1, 1, 1, 1, -1, -1]
    padded = torch.as_tensor(np.concatenate([index, [-1, -1]]))[None]  # two padding tokens
    logits = torch.full((1, 1, 10), NEG)
    logits[0, 0, 5] = logit(0.8)  # "tree", last token of the last phrase, right before ". [SEP]"
    logits[0, 0, 8:] = 50.0  # padding must never count
    scores = phrase_scores(logits, padded, num_phrases=2)
    np.testing.assert_allclose(scores[0, 0].numpy(), [0.0, 0.8], atol=1e-6)


def test_phrase_scores_batched_rows_are_independent():
    index = torch.tensor([[-1, 0, 1, -1], [-1, 0, 0, -1]])
    logits = torch.tensor([[[0.0, 1.0, 2.0, 9.0]], [[0.0, 1.0, 2.0, 9.0]]])
    scores = phrase_scores(logits, index, num_phrases=2)
    expected = torch.sigmoid(torch.tensor([[[1.0, 2.0]], [[2.0, float("-inf")]]]))
    torch.testing.assert_close(scores, expected)


def test_plan_prompts_packs_greedily_and_splits_at_the_limit():
    phrases = ["aa", "bb", "cc"]
    # each phrase costs its tokens + 1 for "."; a prompt costs 2 more for [CLS] and [SEP]
    prompts, too_long = plan_prompts(phrases, [3, 3, 3], max_tokens=2 + 4 + 4)
    assert too_long == []
    assert [p.phrase_ids for p in prompts] == [(0, 1), (2,)]
    assert [p.text for p in prompts] == ["aa . bb .", "cc ."]
    prompts, _ = plan_prompts(phrases, [3, 3, 3], max_tokens=2 + 4 + 4 + 4)
    assert [p.phrase_ids for p in prompts] == [(0, 1, 2)]


def test_plan_prompts_reports_a_phrase_too_long_alone_and_keeps_the_others():
    prompts, too_long = plan_prompts(["short", "very long", "empty", "end"], [1, 8, 0, 1], max_tokens=9)
    assert too_long == [1]
    assert [p.phrase_ids for p in prompts] == [(0, 3)]
    _, too_long = plan_prompts(["x"], [7], max_tokens=10)  # 2 + 7 + 1 = 10 tokens: fits exactly
    assert too_long == []


def test_prompt_split_in_two_merges_before_nms():
    # Pass 1 grounds phrases 0 and 1, pass 2 phrase 2; the same object is found in both passes.
    boxes = np.array([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])
    pass1 = select_candidates(np.array([[0.6, 0.1], [0.2, 0.7]]), boxes, phrase_ids=[0, 1], threshold=0.5)
    pass2 = select_candidates(np.array([[0.9], [0.1]]), boxes * [1, 1, 1.02, 1.02], phrase_ids=[2], threshold=0.5)
    merged = Candidates.concat([pass1, pass2])
    assert sorted(merged.phrases.tolist()) == [0, 1, 2]
    kept = finalize(merged, nms_iou=0.5, max_per_phrase=4, min_side=0.0)
    # phrase 2 (0.9) suppresses phrase 0 (0.6) on the same object across the two passes
    assert kept.phrases.tolist() == [1, 2]
    np.testing.assert_allclose(kept.scores, [0.7, 0.9])


def test_each_query_goes_to_its_best_phrase_and_ties_to_the_first():
    scores = np.array([[0.2, 0.8, 0.5], [0.6, 0.6, 0.1]])
    boxes = np.array([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    cands = select_candidates(scores, boxes, phrase_ids=[10, 11, 12], threshold=0.0)
    assert cands.phrases.tolist() == [11, 10]
    np.testing.assert_allclose(cands.boxes[0], [0.4, 0.4, 0.6, 0.6])


@pytest.mark.parametrize(
    ("score", "kept"), [(0.35, True), (np.nextafter(0.35, 0), False), (np.nextafter(0.35, 1), True)]
)
def test_threshold_is_inclusive(score, kept):
    cands = select_candidates(np.array([[score]]), np.array([[0.5, 0.5, 0.2, 0.2]]), [0], threshold=0.35)
    assert len(cands) == int(kept)


def test_nms_is_class_agnostic_and_strict_at_the_iou_threshold():
    boxes = np.array([[0.0, 0.0, 0.4, 0.4], [0.0, 0.0, 0.4, 0.2], [0.0, 0.0, 0.4, 0.1]])
    # IoU(box0, box1) = 0.5 exactly, IoU(box0, box2) = 0.25
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), iou_threshold=0.5).tolist() == [0, 1, 2]
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), iou_threshold=0.49).tolist() == [0, 2]
    cands = Candidates(boxes, np.array([0, 1, 2]), np.array([0.9, 0.8, 0.7]))
    kept = finalize(cands, nms_iou=0.2, max_per_phrase=4, min_side=0.0)
    assert kept.phrases.tolist() == [0]  # different phrases still suppress each other


def test_nms_equal_scores_keep_the_earlier_box():
    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5]])
    assert nms(boxes, np.array([0.5, 0.5]), 0.5).tolist() == [0]


def test_cap_per_phrase_keeps_the_best_after_nms():
    boxes = np.array([[0.1 * i, 0.0, 0.1 * i + 0.05, 0.05] for i in range(6)])
    cands = Candidates(boxes, np.array([0, 0, 0, 0, 0, 1]), np.array([0.5, 0.9, 0.6, 0.8, 0.7, 0.4]))
    kept = finalize(cands, nms_iou=0.5, max_per_phrase=2, min_side=0.0)
    assert kept.phrases.tolist() == [0, 0, 1]
    np.testing.assert_allclose(kept.scores, [0.9, 0.8, 0.4])


def test_clip_to_image_then_minimum_side():
    boxes = np.array(
        [
            [-0.2, 0.1, 0.3, 0.5],  # clipped to x1 = 0
            [0.5, 0.5, 0.51, 0.9],  # 0.01 wide: exactly the minimum, kept
            [0.5, 0.5, 0.5099, 0.9],  # narrower than the minimum
            [0.95, 0.2, 1.4, 0.3],  # clipped to 0.05 wide
            [1.2, 0.2, 1.4, 0.3],  # entirely outside: zero width after clipping
        ]
    )
    cands = Candidates(boxes, np.arange(5), np.full(5, 0.9))
    kept = finalize(cands, nms_iou=0.5, max_per_phrase=4, min_side=0.01)
    assert kept.phrases.tolist() == [0, 1, 3]
    np.testing.assert_allclose(kept.boxes[0], [0.0, 0.1, 0.3, 0.5])
    np.testing.assert_allclose(kept.boxes[2], [0.95, 0.2, 1.0, 0.3])


def test_finalize_of_nothing():
    kept = finalize(Candidates.empty(), nms_iou=0.5, max_per_phrase=4, min_side=0.01)
    assert len(kept) == 0 and kept.boxes.shape == (0, 4)
