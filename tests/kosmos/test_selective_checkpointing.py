"""Selective activation checkpointing: the same loss and gradients as no checkpointing, with less saved."""

from __future__ import annotations

import torch

from benchmarks.kosmos_step import make_batch
from kosmos.model.parallelize import ParallelConfig, parallelize
from kosmos.model.registry import create_model, model_config


def loss_and_grads(model, batch):
    model.zero_grad()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(**batch, return_logits=False, images_in_slot_order=True)
    loss.loss.backward()
    return loss.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved


def test_selective_checkpointing_matches_and_saves_less():
    batch = make_batch(model_config("tiny"), 2, 40, "cpu")
    batch.pop("attention_mask")
    torch.manual_seed(0)
    plain = create_model("tiny").train()
    torch.manual_seed(0)
    selective = create_model("tiny").train()
    parallelize(selective, ParallelConfig(activation_checkpointing=True, checkpoint_policy="selective"))
    torch.manual_seed(1)  # dropout on: checkpointing replays the same masks
    ref_loss, ref_grads, ref_saved = loss_and_grads(plain, batch)
    torch.manual_seed(1)
    loss, grads, saved = loss_and_grads(selective, batch)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
    assert sum(saved) < 0.8 * sum(ref_saved)
    assert set(selective.state_dict()) == set(plain.state_dict())
    # Evaluation runs the block as is (no checkpoint), and gives the same result.
    with torch.no_grad():
        torch.testing.assert_close(selective.eval()(**batch).logits, plain.eval()(**batch).logits)
