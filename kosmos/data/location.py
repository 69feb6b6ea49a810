"""Location tokens: a box in normalised image coordinates as two of 1,024 ``<patch_index_NNNN>`` tokens.

The image is cut into ``P x P`` bins (P = 32 at 224 px, so one bin per 7 x 7 pixels); a bin's index is
``y_bin * P + x_bin``. A box is the bin of its top-left corner and the bin of its bottom-right corner.

The formulas are Hugging Face's (``coordinate_to_patch_index`` / ``patch_index_to_coordinate`` in
``transformers/models/kosmos2/processing_kosmos2.py``), so that our checkpoints and HF's read each other's
outputs:

- encode: top-left bin ``floor(x1 * P)``; bottom-right bin ``ceil(x2 * P - 1)``. A right or bottom edge that
  lies exactly on a bin edge belongs to the bin before it (``x2 = 0.5`` is bin 15 of 32, not 16).
- decode: bin centres; but when the two corners share a row or a column, the full bins' outer edges
  (a box one bin wide must not decode to a zero-width box).

The original training code (``get_box_coords_index`` in unilm's ``obj_utils.py``) uses ``floor(min(x2, 0.99999) *
P)`` for the bottom-right bin instead; the two agree everywhere except on exact bin edges.
"""

from __future__ import annotations

import math
import re

NUM_BINS = 32  # bins per side; the original dataclass default is 16, the released model's train.sh passes 32
NUM_LOCATION_TOKENS = NUM_BINS * NUM_BINS

_TOKEN_RE = re.compile(r"<patch_index_(\d{4})>")

Box = tuple[float, float, float, float]


def box_to_patch_indices(box: Box, num_bins: int = NUM_BINS) -> tuple[int, int]:
    """``(x1, y1, x2, y2)`` in [0, 1] to the indices of its top-left and bottom-right bins.

    Raises ``ValueError`` for a box outside [0, 1] or with ``x2 <= x1`` or ``y2 <= y1``: such a box has no honest
    encoding, and the caller must drop it (and count it) rather than emit tokens for it.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise ValueError(f"box {box!r} must satisfy 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
    ul_x = math.floor(x1 * num_bins)
    ul_y = math.floor(y1 * num_bins)
    # max(): for x2 > x1 the bottom-right bin is never left of the top-left one, except when x2 * P - 1 rounds to
    # -1.0 in floating point (x2 below ~1e-17); HF's formula then gives bin -1.
    lr_x = max(math.ceil(x2 * num_bins - 1), ul_x)
    lr_y = max(math.ceil(y2 * num_bins - 1), ul_y)
    return ul_y * num_bins + ul_x, lr_y * num_bins + lr_x


def patch_indices_to_box(ul_index: int, lr_index: int, num_bins: int = NUM_BINS) -> Box:
    """The box two bin indices stand for (HF's decoding, including its row/column special case).

    Generated tokens can be in the wrong order (bottom-right above or left of top-left); the box is returned as
    decoded, possibly inverted, so that a caller scoring it sees the model's mistake instead of a repaired box.
    """
    n = num_bins * num_bins
    if not (0 <= ul_index < n and 0 <= lr_index < n):
        raise ValueError(f"patch indices ({ul_index}, {lr_index}) outside [0, {n})")
    cell = 1.0 / num_bins
    ul_x, ul_y = ul_index % num_bins, ul_index // num_bins
    lr_x, lr_y = lr_index % num_bins, lr_index // num_bins
    if ul_x == lr_x or ul_y == lr_y:
        # Same bin, row or column: outer edges of the bins.
        return ul_x * cell, ul_y * cell, (lr_x + 1) * cell, (lr_y + 1) * cell
    half = cell / 2
    return ul_x * cell + half, ul_y * cell + half, lr_x * cell + half, lr_y * cell + half


def patch_index_token(index: int) -> str:
    """The token string of bin ``index``: ``<patch_index_0044>``."""
    if not 0 <= index <= 9999:
        raise ValueError(f"patch index {index} does not fit the 4-digit token format")
    return f"<patch_index_{index:04d}>"


def patch_index_from_token(token: str) -> int:
    """Inverse of :func:`patch_index_token`; ``ValueError`` for any other string."""
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        raise ValueError(f"{token!r} is not a location token")
    return int(match.group(1))


def location_tokens(num_bins: int = NUM_BINS) -> list[str]:
    """All location token strings in id order."""
    return [patch_index_token(i) for i in range(num_bins * num_bins)]
