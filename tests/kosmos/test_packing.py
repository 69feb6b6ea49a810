"""Packed rows do not leak: the loss of a packed row is the sum of the losses of its samples run alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kosmos.data.collate import collate_rows
from kosmos.data.sequence import SequenceConfig, build_image_text_sample, build_text_sample
from kosmos.data.sources import LoaderSample
from kosmos.model.model import document_mask, segment_positions
from kosmos.model.registry import create_model

CAPTIONS = ["a red circle on a grey background", "two dogs run on the beach", "a small blue square"]


@pytest.fixture
def samples(tokenizer):
    cfg = SequenceConfig(image_size=64, num_image_tokens=16)
    rng = np.random.default_rng(0)
    out = []
    for i, caption in enumerate(CAPTIONS):
        tokens = build_image_text_sample(tokenizer, caption, None, cfg)
        pixels = rng.standard_normal((3, 64, 64)).astype(np.float32)
        out.append(LoaderSample(tokens, pixels, key=f"img{i}", source="test"))
    text = build_text_sample(tokenizer, "a text only sample between two images")
    out.insert(1, LoaderSample(text, None, key="text", source="test"))
    return out


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(0)
    m = create_model(
        "tiny", text={"vocab_size": tokenizer.vocab_size, "dropout": 0.0, "attention_dropout": 0.0},
        loc_token_start=tokenizer.loc_token_start,
    )  # fmt: skip
    return m.eval()


def loss_of(model, batch, packed: bool = True, **kwargs) -> torch.Tensor:
    pixels = batch["pixel_values"]
    return model(
        pixel_values=pixels if pixels.shape[0] else None,
        input_ids=batch["input_ids"],
        image_embeds_position_mask=batch["image_embeds_position_mask"],
        labels=batch["labels"],
        segment_ids=batch["segment_ids"] if packed else None,
        reduction="sum",
        return_logits=False,
        images_in_slot_order=True,
        **kwargs,
    ).loss


def test_packed_row_loss_is_the_sum_of_its_samples_alone(model, samples, tokenizer):
    pad = tokenizer.pad_id
    # Two packed rows of different lengths (the second padded), against every sample in a batch of its own.
    packed = collate_rows([samples[:3], samples[3:]], pad, pad_to_multiple_of=8, image_size=64)
    assert packed["segment_ids"][0].max() == 3 and (packed["segment_ids"][1] == 0).any()
    alone = [loss_of(model, collate_rows([[s]], pad, image_size=64)) for s in samples]
    together = loss_of(model, packed)
    assert together.item() == pytest.approx(sum(a.item() for a in alone), rel=1e-5)
    # The gradients too: one sample's loss does not depend on its neighbours.
    model.zero_grad()
    loss_of(model, packed).backward()
    packed_grad = model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    for s in samples:
        loss_of(model, collate_rows([[s]], pad, image_size=64)).backward()
    assert torch.allclose(packed_grad, model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-6)
    # Without the document mask the samples see each other (the old behaviour): the identity fails.
    leaky = loss_of(model, packed, packed=False)
    assert abs(leaky.item() - together.item()) > 1e-3 * together.item()


def test_flex_attention_gives_the_same_loss(model, samples, tokenizer):
    packed = collate_rows([samples[:3], samples[3:]], tokenizer.pad_id, pad_to_multiple_of=8, image_size=64)
    with torch.no_grad():  # FlexAttention has no backward on CPU; on CUDA the training step uses it
        sdpa = loss_of(model, packed, flex_attention=False)
        try:
            flex = loss_of(model, packed, flex_attention=True)
        except Exception as exc:  # noqa: BLE001 - eager FlexAttention is not built for every CPU torch
            pytest.skip(f"FlexAttention unavailable here: {type(exc).__name__}: {exc}")
    assert flex.item() == pytest.approx(sdpa.item(), rel=1e-5)


def test_flex_attention_refuses_attention_dropout(tokenizer, samples):
    m = create_model("tiny", text={"vocab_size": tokenizer.vocab_size}, loc_token_start=tokenizer.loc_token_start)
    packed = collate_rows([samples[:2]], tokenizer.pad_id, image_size=64)
    with pytest.raises(ValueError, match="attention dropout"):
        loss_of(m.train(), packed, flex_attention=True)


def test_positions_restart_and_mask_is_block_diagonal():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(seg, 1).tolist() == [[2, 3, 4, 2, 3, 1, 1], [2, 3, 4, 5, 6, 7, 8]]
    mask = document_mask(seg)[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ]


def test_target_index_without_host_sync_gives_the_same_loss(model, samples, tokenizer):
    batch = collate_rows([samples[:3], samples[3:]], tokenizer.pad_id, image_size=64)
    reference = loss_of(model, batch)
    labels = batch["labels"]
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    index = shifted.ne(-100).nonzero().squeeze(1)
    padded = torch.cat([index, torch.full((5,), -1)])  # padding entries are ignored
    assert loss_of(model, batch, target_index=padded, check_slots=False).item() == pytest.approx(reference.item())
