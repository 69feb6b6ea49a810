"""The LM head and its cross-entropy in chunks, so that the ``N x vocab`` logits are never held whole.

At 1.6B one 8 x 2,048-token micro-batch has 16k target positions and a 65k vocabulary: its fp32 logits alone are
4.3 GB, and their gradient as much again. :func:`chunked_linear_cross_entropy` computes ``linear + cross_entropy``
over ``chunk_size`` rows at a time, each chunk under activation checkpointing: the forward keeps only the chunk's
inputs, the backward recomputes that chunk's logits, so peak memory is one chunk's logits (``chunk_size x vocab``,
in fp32 for the log-softmax) whatever ``N`` is. Up to ``chunk_size`` rows there is one chunk, computed plainly (no
recompute: it would save nothing). The result, and the gradients of the hidden states and of the
weight, are those of ``F.cross_entropy(F.linear(hidden, weight).float(), targets)`` up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK = 4096


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight)  # (n, V) in the compute dtype (bf16 under autocast)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    reduction: str = "sum",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` (-100 ignored), ``chunk_size`` rows at a time.

    hidden (N, D), weight (V, D), targets (N,). ``reduction``: "sum" or "mean" (over the targets that are not
    ignored; 0 when there are none, rather than NaN, so an all-ignored micro-batch adds nothing). fp32 result.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden (N, D) and targets (N,) expected, got {tuple(hidden.shape)}, {tuple(targets.shape)}")
    total = hidden.new_zeros((), dtype=torch.float32)
    # One chunk holds all the logits anyway: recomputing it in backward would save no memory, only add work.
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad) and hidden.shape[0] > chunk_size
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if grad:
            total = total + checkpoint(_chunk_loss, h, weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, t)
    if reduction == "mean":
        return total / targets.ne(IGNORE_INDEX).sum().clamp(min=1)
    return total
