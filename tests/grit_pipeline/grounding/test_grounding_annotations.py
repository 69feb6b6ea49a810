"""Boxes that come with the input: threshold, clipping and minimum side apply; NMS and the cap do not."""

from __future__ import annotations

import sys

from grit_pipeline.config import DetectorConfig
from grit_pipeline.grounding import GroundingInput, make_detector


def run(annotations, phrases=("a man", "his shirt"), **cfg):
    det = make_detector(DetectorConfig(kind="annotations", **cfg))
    det.setup()
    (result,) = det([GroundingInput(image=None, phrases=list(phrases), annotations=annotations)])
    return det, result


def test_overlapping_human_boxes_are_all_kept():
    boxes = [
        {"phrase": 0, "box": [0.1, 0.1, 0.6, 0.9]},
        {"phrase": 1, "box": [0.15, 0.3, 0.55, 0.6]},  # inside the man's box: NMS would not matter, overlap does
        {"phrase": 0, "box": [0.1, 0.1, 0.6, 0.85]},  # IoU ~0.94 with the first: kept, no NMS
        *[{"phrase": 1, "box": [0.1 * i, 0.0, 0.1 * i + 0.05, 0.1]} for i in range(6)],  # more than the cap
    ]
    det, result = run(boxes)
    assert det.model_id == "annotations" and det.random_weights is False
    assert result.num_boxes_raw == 9 and len(result.detections) == 9
    assert all(d.score == 1.0 for d in result.detections)
    assert [d.phrase for d in result.detections] == [0, 0] + [1] * 7


def test_threshold_clip_min_side_and_duplicates():
    boxes = [
        {"phrase": 0, "box": [-0.1, 0.2, 0.5, 1.3], "score": 0.9},  # clipped
        {"phrase": 0, "box": [-0.1, 0.2, 0.5, 1.3], "score": 0.9},  # exact repeat
        {"phrase": 1, "box": [0.2, 0.2, 0.205, 0.5]},  # narrower than min side
        {"phrase": 1, "box": [0.2, 0.2, 0.4, 0.5], "score": 0.34},  # under the threshold
        {"phrase": 1, "box": [0.2, 0.2, 0.4, 0.5], "score": 0.35},  # at the threshold
    ]
    _, result = run(boxes, box_threshold=0.35, min_box_side=0.01)
    assert [(d.phrase, d.box, d.score) for d in result.detections] == [
        (0, (0.0, 0.2, 0.5, 1.0), 0.9),
        (1, (0.2, 0.2, 0.4, 0.5), 0.35),
    ]
    assert result.num_boxes_raw == 3


def test_malformed_annotations_are_counted_not_fatal():
    boxes = [
        {"phrase": 2, "box": [0.1, 0.1, 0.5, 0.5]},  # no such phrase
        {"phrase": True, "box": [0.1, 0.1, 0.5, 0.5]},
        {"phrase": 0, "box": [0.1, 0.1, 0.5]},
        {"phrase": 0, "box": [0.1, 0.1, float("nan"), 0.5]},
        {"phrase": 0, "box": "oops"},
        {"phrase": 0, "box": [0.1, 0.1, 0.5, 0.5], "score": "high"},
        "not a dict",
        {"phrase": 1, "box": [0.1, 0.1, 0.5, 0.5]},
    ]
    _, result = run(boxes)
    assert result.invalid_annotations == 7
    assert [d.phrase for d in result.detections] == [1]
    _, empty = run(None)
    assert empty.detections == [] and empty.num_boxes_raw == 0


def test_annotation_detector_imports_no_torch_of_its_own():
    # The grounding package and the annotations path stay light for CPU-only pipelines.
    import subprocess

    code = (
        "import sys; from grit_pipeline.config import DetectorConfig; from grit_pipeline.grounding import "
        "make_detector, GroundingInput; d = make_detector(DetectorConfig(kind='annotations')); "
        "d([GroundingInput(None, ['x'], [{'phrase': 0, 'box': [0, 0, 1, 1]}])]); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_grit_entries_become_annotations():
    from grit_pipeline.grounding.annotations import from_grit_entry

    # GRIT-20M stores offsets as doubles.
    assert from_grit_entry([0.0, 5.0, 0.1, 0.2, 0.5, 0.9, 0.71]) == {
        "start": 0,
        "end": 5,
        "box": [0.1, 0.2, 0.5, 0.9],
        "score": 0.71,
    }
    assert from_grit_entry((2, 9, 0, 0, 1, 1, 1)) == {"start": 2, "end": 9, "box": [0.0, 0.0, 1.0, 1.0], "score": 1.0}
    for bad in (
        [0, 5, 0.1, 0.2, 0.5, 0.9],
        [0.5, 5, 0.1, 0.2, 0.5, 0.9, 0.7],
        [0, "5", 0.1, 0.2, 0.5, 0.9, 0.7],
        [True, 5, 0.1, 0.2, 0.5, 0.9, 0.7],
        [0, float("inf"), 0.1, 0.2, 0.5, 0.9, 0.7],
        "0 5 ...",
        None,
    ):
        assert from_grit_entry(bad) is None, bad


def test_grit_noun_chunks_and_ref_exps_ground_a_caption(spacy_model_name):
    """GRIT's own entries, through the same path as any annotation: spans tied to chunks, then the detector."""
    from grit_pipeline.assemble import build_entries, map_annotations, unique_phrases
    from grit_pipeline.config import TextConfig
    from grit_pipeline.readers.sample import InputSample, apply_metadata
    from grit_pipeline.text import TextStage

    raw = "a man in a blue shirt riding a horse"
    noun_chunks = [[0.0, 5.0, 0.1, 0.1, 0.5, 0.9, 0.8], [29.0, 36.0, 0.5, 0.4, 1.0, 1.0, 0.6]]
    ref_exps = [[0.0, 21.0, 0.1, 0.1, 0.5, 0.9, 0.8], [29.0, 36.0, 0.5, 0.4, 1.0, 1.0, 0.6]]
    malformed = [[0.0, 5.0, 0.1]]
    sample = InputSample(key="k", source="test", caption=raw)
    apply_metadata(sample, {"annotations": noun_chunks + malformed})  # lists are accepted, not a bad_input
    (text,) = TextStage(TextConfig(spacy_model=spacy_model_name))([raw])
    phrases, of_chunk = unique_phrases(text.chunks)
    assert phrases == ["a man", "a blue shirt", "a horse"]
    for entries, invalid in ((sample.annotations, 1), (ref_exps, 0)):
        mapped, counts = map_annotations(raw, text.caption, text.chunks, of_chunk, entries)
        assert counts["annotations_invalid"] == invalid and not counts["annotations_unmatched"]
        assert [(m["phrase"], m["score"]) for m in mapped] == [(0, 0.8), (2, 0.6)]
        _, result = run(mapped, phrases=phrases)
        nc, re_, _ = build_entries(text.chunks, of_chunk, result)
        assert [e[:2] for e in nc] == [[0, 5], [29, 36]]
        # The expressions are the caption's own parse (GRIT_SPEC 3.4), whichever span the entry gave.
        man = text.chunks[0]
        assert [e[:2] for e in re_] == [[man.expr_start, man.expr_end], [29, 36]]
        assert [e[2:] for e in nc] == [[0.1, 0.1, 0.5, 0.9, 0.8], [0.5, 0.4, 1.0, 1.0, 0.6]]
