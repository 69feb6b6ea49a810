"""Location-token codec: the documented example, bin edges, round trips, agreement with transformers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kosmos.data.location import (
    NUM_BINS,
    box_to_patch_indices,
    location_tokens,
    patch_index_from_token,
    patch_index_token,
    patch_indices_to_box,
)


def test_documented_example():
    # HF's docstring: "<patch_index_0044><patch_index_0863>" is the snowman's box.
    assert patch_indices_to_box(44, 863) == (0.390625, 0.046875, 0.984375, 0.828125)
    # and it encodes back to the same two bins.
    assert box_to_patch_indices((0.390625, 0.046875, 0.984375, 0.828125)) == (44, 863)


def test_index_layout_is_row_major():
    # bin (x=3, y=6) -> 6 * 32 + 3; bottom-right (x=15, y=19) -> 19 * 32 + 15
    assert box_to_patch_indices((0.1, 0.2, 0.5, 0.6)) == (195, 623)
    assert box_to_patch_indices((0.0, 0.0, 1.0, 1.0)) == (0, 1023)


def test_bin_edges():
    k = 5
    edge = k / NUM_BINS
    # A top-left corner exactly on an edge starts that bin; a bottom-right corner exactly on it ends the bin before.
    ul, lr = box_to_patch_indices((edge, edge, edge + 3 / NUM_BINS, edge + 3 / NUM_BINS))
    assert (ul % NUM_BINS, ul // NUM_BINS) == (k, k)
    assert (lr % NUM_BINS, lr // NUM_BINS) == (k + 2, k + 2)
    # Just past the edge: the next bin.
    eps = 1e-6
    ul, lr = box_to_patch_indices((edge - eps, 0.0, edge + eps, 0.5))
    assert ul % NUM_BINS == k - 1 and lr % NUM_BINS == k
    # A box inside one bin: both corners in it; decodes to the full bin.
    ul, lr = box_to_patch_indices((edge + 0.001, edge + 0.001, edge + 0.02, edge + 0.02))
    assert ul == lr == k * NUM_BINS + k
    assert patch_indices_to_box(ul, lr) == (edge, edge, edge + 1 / NUM_BINS, edge + 1 / NUM_BINS)


def test_same_row_or_column_decodes_to_outer_edges():
    # Same row: y spans the full row, x from the left edge of ul to the right edge of lr.
    assert patch_indices_to_box(2 * 32 + 1, 2 * 32 + 4) == (1 / 32, 2 / 32, 5 / 32, 3 / 32)
    # Different row and column: bin centres.
    assert patch_indices_to_box(0, 33) == (0.5 / 32, 0.5 / 32, 1.5 / 32, 1.5 / 32)


@pytest.mark.parametrize(
    "box", [(0.0, 0.0, 0.0, 0.5), (0.5, 0.1, 0.4, 0.2), (-0.1, 0.0, 0.5, 0.5), (0.0, 0.0, 1.01, 0.5)]
)
def test_invalid_boxes_raise(box):
    with pytest.raises(ValueError):
        box_to_patch_indices(box)


def test_underflow_is_clamped():
    # 32 * 5e-324 - 1 == -1.0 in floating point: HF's ceil(x2 * P - 1) would give bin -1.
    assert box_to_patch_indices((0.0, 0.0, 5e-324, 5e-324)) == (0, 0)


def test_token_strings():
    assert patch_index_token(44) == "<patch_index_0044>"
    assert patch_index_from_token("<patch_index_1023>") == 1023
    tokens = location_tokens()
    assert len(tokens) == 1024 and tokens[0] == "<patch_index_0000>" and tokens[-1] == "<patch_index_1023>"
    with pytest.raises(ValueError):
        patch_index_from_token("<patch_index_44>")


bins = st.integers(0, NUM_BINS - 1)


@given(bins, bins, bins, bins)
@settings(max_examples=300, deadline=None)
def test_decode_then_encode_is_identity(x1, y1, dx, dy):
    x2, y2 = min(NUM_BINS - 1, x1 + dx), min(NUM_BINS - 1, y1 + dy)
    ul, lr = y1 * NUM_BINS + x1, y2 * NUM_BINS + x2
    assert box_to_patch_indices(patch_indices_to_box(ul, lr)) == (ul, lr)


unit = st.floats(0.0, 1.0, allow_nan=False)


@given(unit, unit, unit, unit)
@settings(max_examples=300, deadline=None)
def test_encode_then_decode_stays_within_a_bin(a, b, c, d):
    x1, x2 = sorted((a, c))
    y1, y2 = sorted((b, d))
    if not (x2 > x1 and y2 > y1):
        return
    decoded = patch_indices_to_box(*box_to_patch_indices((x1, y1, x2, y2)))
    for got, want in zip(decoded, (x1, y1, x2, y2)):
        assert abs(got - want) <= 1 / NUM_BINS + 1e-9


@given(unit, unit, unit, unit)
@settings(max_examples=300, deadline=None)
def test_same_as_transformers(a, b, c, d):
    from transformers.models.kosmos2.processing_kosmos2 import coordinate_to_patch_index, patch_index_to_coordinate

    x1, x2 = sorted((a, c))
    y1, y2 = sorted((b, d))
    if not (x2 > x1 and y2 > y1):
        return
    if min(x2, y2) < 1e-12:
        return  # HF's formula underflows to bin -1 there; ours clamps (test_underflow_is_clamped)
    ours = box_to_patch_indices((x1, y1, x2, y2))
    assert ours == coordinate_to_patch_index((x1, y1, x2, y2), NUM_BINS)
    assert patch_indices_to_box(*ours) == patch_index_to_coordinate(*ours, NUM_BINS)
    assert all(0 <= i < NUM_BINS * NUM_BINS for i in ours) and not math.isnan(ours[0])
