"""The chunked LM head + cross-entropy: the plain path's loss and gradients, without keeping N x vocab logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kosmos.model.lm_loss import IGNORE_INDEX, chunked_linear_cross_entropy


def inputs(n: int = 37, d: int = 16, v: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_same_loss_and_gradients_as_the_plain_path(reduction, chunk):
    hidden, weight, targets = inputs()
    plain = F.cross_entropy(F.linear(hidden, weight), targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    grads = torch.autograd.grad(plain, (hidden, weight))
    hidden2, weight2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    chunked = chunked_linear_cross_entropy(hidden2, weight2, targets, chunk_size=chunk, reduction=reduction)
    chunked.backward()
    # The log-softmax runs in fp32 (as the model's plain path does), hence float32 tolerances.
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.allclose(hidden2.grad, grads[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(weight2.grad, grads[1], rtol=1e-5, atol=1e-6)


def test_no_saved_tensor_holds_all_logits():
    hidden, weight, targets = inputs(n=64, v=50)
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    loss.backward()
    assert saved, "the hook saw nothing: the test would prove nothing"
    assert max(s.numel() for s in saved) < 64 * 50  # at most one chunk of logits, never N x V
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        F.cross_entropy(F.linear(hidden, weight), targets).backward()
    assert max(s.numel() for s in saved) == 64 * 50  # the plain path does hold them


def test_all_ignored_gives_zero_not_nan():
    hidden, weight, targets = inputs(n=6)
    targets[:] = IGNORE_INDEX
    assert chunked_linear_cross_entropy(hidden, weight, targets, reduction="mean").item() == 0.0


def test_bad_shapes_are_refused():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="targets"):
        chunked_linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="reduction"):
        chunked_linear_cross_entropy(hidden, weight, targets, reduction="none")
