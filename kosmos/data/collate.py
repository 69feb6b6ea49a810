"""Samples to batches: one sample per row padded to the longest, or several samples packed into each row.

The batch contract (what the model and the trainer read):

- ``input_ids``, ``attention_mask``, ``image_embeds_position_mask``, ``labels``: ``(B, T)`` int64; right padding
  with the pad id, attention 0, image mask 0 and label -100; ``T`` rounded up to ``pad_to_multiple_of``.
- ``pixel_values``: ``(N, 3, 224, 224)`` float32, one image per block of image slots, in the order the blocks
  appear in ``input_ids`` read row by row. Without packing and with images only, ``N == B`` and this is exactly
  transformers' ``pixel_values``; text-only rows have no entry, so ``N`` can be smaller than ``B`` (even 0), and
  packed rows can hold several images. A model fills ``inputs_embeds[image_embeds_position_mask.bool()]`` with the
  ``N * 64`` image embeddings in that order.
- ``segment_ids``: ``(B, T)`` int64, the sample each position belongs to, numbered 1, 2, ... within its row;
  0 at padding.
- ``num_images``: ``(B,)`` int64, images per row.
- ``keys``, ``sources``: lists of str, one per sample in the batch, in order (for logging).

Packed rows do not leak: given ``segment_ids`` the model (``KosmosModel.forward``) attends within each sample only
(a block-diagonal causal mask) and restarts positions with each sample, so a packed row's loss is the sum of its
samples' losses run alone. Every sample starts with ``<s>``, never a target: a sample's last token predicts nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kosmos.data.sequence import IGNORE_INDEX
from kosmos.data.sources import LoaderSample


def collate_rows(
    rows: Sequence[Sequence[LoaderSample]], pad_id: int, pad_to_multiple_of: int = 1, image_size: int = 224
) -> dict:
    """Pad ``rows`` (each a list of samples laid end to end) into one batch dict (see module doc)."""
    lengths = [sum(len(s.tokens) for s in row) for row in rows]
    width = max(lengths)
    if pad_to_multiple_of > 1:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids, attention, image_mask, labels, segments = [], [], [], [], []
    images, num_images, keys, sources = [], [], [], []
    for row, length in zip(rows, lengths):
        pad = width - length
        ids.append([t for s in row for t in s.tokens.input_ids] + [pad_id] * pad)
        attention.append([1] * length + [0] * pad)
        image_mask.append([m for s in row for m in s.tokens.image_embeds_position_mask] + [0] * pad)
        labels.append([t for s in row for t in s.tokens.labels] + [IGNORE_INDEX] * pad)
        segments.append([i for i, s in enumerate(row, 1) for _ in range(len(s.tokens))] + [0] * pad)
        row_images = [s.pixel_values for s in row if s.pixel_values is not None]
        images.extend(row_images)
        num_images.append(len(row_images))
        keys.extend(s.key for s in row)
        sources.extend(s.source for s in row)
    # numpy's stack: torch.stack runs multi-threaded in the training process and was 10x slower on busy cores.
    if images:
        pixel_values = torch.from_numpy(np.stack(images))
    else:
        pixel_values = torch.zeros((0, 3, image_size, image_size))
    return {
        "pixel_values": pixel_values,
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(attention, dtype=torch.long),
        "image_embeds_position_mask": torch.tensor(image_mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "segment_ids": torch.tensor(segments, dtype=torch.long),
        "num_images": torch.tensor(num_images, dtype=torch.long),
        "keys": keys,
        "sources": sources,
    }


class Batcher:
    """Groups samples into batches of ``batch_size`` rows; with ``pack``, greedily fills each row up to
    ``max_length`` tokens (a sample that does not fit starts the next row; samples are never split).

    :meth:`add` returns the rows of a finished batch, or None. With packing, the sample that closed the batch is
    kept for the next one; so a batch's resume position is that of its own last sample, not of the last sample
    pulled.
    """

    def __init__(self, batch_size: int, max_length: int, pack: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.pack = pack
        self.rows: list[list[LoaderSample]] = []
        self.current: list[LoaderSample] = []
        self.current_len = 0

    def add(self, sample: LoaderSample) -> list[list[LoaderSample]] | None:
        if not self.pack:
            self.rows.append([sample])
            return self._take() if len(self.rows) == self.batch_size else None
        done = None
        if self.current and self.current_len + len(sample.tokens) > self.max_length:
            self.rows.append(self.current)
            self.current, self.current_len = [], 0
            if len(self.rows) == self.batch_size:
                done = self._take()
        self.current.append(sample)
        self.current_len += len(sample.tokens)
        return done

    def _take(self) -> list[list[LoaderSample]]:
        rows, self.rows = self.rows, []
        return rows
