"""parallelize(): activation checkpointing, DDP and FSDP2 (one-process gloo group on CPU), and compile."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from grit_core.config import ConfigError, load_config
from kosmos.model.parallelize import ParallelConfig, freeze_vision, parallelize
from kosmos.model.registry import create_model


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (2, 30), generator=g)
    image_mask = torch.zeros(2, 30, dtype=torch.bool)
    image_mask[:, 2:18] = True
    return torch.randn(2, 3, 64, 64, generator=g), ids, image_mask


def twin_models(frozen_vision: bool = False):
    torch.manual_seed(0)
    a = create_model("tiny", text={"dropout": 0.0, "attention_dropout": 0.0})
    b = create_model("tiny", text={"dropout": 0.0, "attention_dropout": 0.0})
    b.load_state_dict(a.state_dict())
    if frozen_vision:
        freeze_vision(a)
        freeze_vision(b)
    return a, b


def step(module, model):
    pixels, ids, image_mask = inputs()
    out = module(pixels, ids, image_mask, labels=ids)
    out.loss.backward()
    grad = model.get_parameter("blocks.0.ffn.fc1.weight").grad
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad  # FSDP2 keeps DTensor grads
    return out.logits.detach(), grad


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bad_mode_is_refused():
    with pytest.raises(ConfigError, match="data_parallel' must be one of none, ddp, fsdp"):
        load_config(ParallelConfig, None, ["data_parallel=tp"])


def test_activation_checkpointing_is_switched_on_and_matches():
    model, reference = twin_models()
    wrapped = parallelize(model, ParallelConfig(activation_checkpointing=True))
    assert wrapped is model and all(b.checkpointing for b in [*model.vision.blocks, *model.blocks])
    logits, grad = step(wrapped, model)
    ref_logits, ref_grad = step(reference, reference)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_single_process_matches_plain(process_group, mode):
    model, reference = twin_models(frozen_vision=True)
    wrapped = parallelize(model, ParallelConfig(data_parallel=mode, activation_checkpointing=True), device="cpu")
    logits, grad = step(wrapped, model)
    ref_logits, ref_grad = step(reference, reference)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    names = {n.removeprefix("module.") for n, _ in wrapped.named_parameters()}
    assert names == {n for n, _ in reference.named_parameters()}  # checkpoints keep our names


@pytest.mark.slow  # the CPU inductor build of the two block graphs takes ~40 s on two cores
def test_compiled_blocks_match_eager():
    model, reference = twin_models()
    parallelize(model, ParallelConfig(compile=True))
    logits, grad = step(model, model)
    ref_logits, ref_grad = step(reference, reference)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
    assert set(model.state_dict()) == set(reference.state_dict())
