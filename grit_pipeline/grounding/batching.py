"""Queues of forward-pass items per padded image shape, for full batches across inputs.

Only items of one padded shape share a forward pass (see :mod:`grit_pipeline.grounding.preprocess`), so with web
images' many shapes a call of 128 images gives groups of ~3. Queues held across inputs fill whole batches; the
detector bounds how many images wait in them.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class ShapeQueues:
    """First-in, first-out item queues keyed by padded shape, popped ``batch_size`` items at a time."""

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._queues: dict[tuple[int, int], deque] = {}

    def add(self, shape: tuple[int, int], items: list[Any]) -> None:
        self._queues.setdefault(shape, deque()).extend(items)

    def pop(self, shape: tuple[int, int]) -> list[Any]:
        """Up to ``batch_size`` items from the front of ``shape``'s queue ([] when it is empty)."""
        queue = self._queues.get(shape)
        if not queue:
            return []
        group = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
        if not queue:
            del self._queues[shape]
        return group

    def full(self) -> list[list[Any]]:
        """Every whole batch the queues hold now."""
        out = []
        for shape in list(self._queues):
            while shape in self._queues and len(self._queues[shape]) >= self.batch_size:
                out.append(self.pop(shape))
        return out

    def drain(self) -> list[list[Any]]:
        """Everything left, shape by shape (in shape order), in batches of at most ``batch_size``."""
        out = []
        for shape in sorted(self._queues):
            while shape in self._queues:
                out.append(self.pop(shape))
        return out

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())
