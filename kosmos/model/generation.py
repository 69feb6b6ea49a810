"""Incremental decoding for :class:`~kosmos.model.model.KosmosModel`: the KV cache and greedy/sampled ``generate``.

``KosmosModel.generate`` calls :func:`generate`; the result is token-identical to Hugging Face's ``generate`` with the
same settings (greedy, ``no_repeat_ngram_size``, left-padded prompts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kosmos.model.model import KosmosModel


class KVCache:
    """Keys and values of every decoder layer for incremental decoding, preallocated to ``max_len`` positions."""

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # positions filled; the model advances it after all layers have written

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, {end} requested")
        if self.keys[layer] is None:
            b, h, _, d = k.shape
            self.keys[layer] = k.new_empty(b, h, self.max_len, d)
            self.values[layer] = v.new_empty(b, h, self.max_len, d)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@torch.no_grad()
def generate(
    model: KosmosModel,
    pixel_values: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    image_embeds_position_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_embeds: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    no_repeat_ngram_size: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` (B, T) by up to ``max_new_tokens``; returns (B, T + n) like HF's ``generate``.

    Prompts are left-padded (pad id, attention_mask 0). Rows that produce EOS continue with pad; decoding stops
    early once every row has. ``no_repeat_ngram_size`` bans n-grams already in the sequence, prompt included.
    """
    if input_ids is None:
        raise ValueError("input_ids is required")
    t = model.config.text
    eos = t.eos_token_id if eos_token_id is None else eos_token_id
    pad = t.pad_token_id if pad_token_id is None else pad_token_id
    if attention_mask is None:  # HF infers the mask the same way
        attention_mask = input_ids.ne(pad).long() if bool((input_ids == pad).any()) else torch.ones_like(input_ids)
    if image_embeds is None and pixel_values is not None:
        image_embeds = model.encode_image(pixel_values)
    B, T = input_ids.shape
    ids, mask = input_ids, attention_mask.long()
    full_image_mask = image_embeds_position_mask
    cache = KVCache(len(model.blocks), T + max_new_tokens) if use_cache else None
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    logits = model(
        input_ids=ids, image_embeds=image_embeds, image_embeds_position_mask=full_image_mask,
        attention_mask=mask, cache=cache,
    ).logits[:, -1]  # fmt: skip
    for step in range(max_new_tokens):
        logits = logits.float()
        if no_repeat_ngram_size > 0:
            logits = _ban_repeated_ngrams(logits, ids, no_repeat_ngram_size)
        if do_sample:
            scores = logits / max(temperature, 1e-5)
            if top_k is not None:
                kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            next_token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_token = logits.argmax(dim=-1)
        next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        finished |= next_token == eos
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if cache is not None:
            logits = model(input_ids=ids[:, -1:], attention_mask=mask, cache=cache).logits[:, -1]
        else:
            if full_image_mask is not None:
                full_image_mask = F.pad(full_image_mask, (0, ids.shape[1] - full_image_mask.shape[1]))
            logits = model(
                input_ids=ids, image_embeds=image_embeds, image_embeds_position_mask=full_image_mask,
                attention_mask=mask,
            ).logits[:, -1]  # fmt: skip
    return ids


def _ban_repeated_ngrams(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf every token that would complete an n-gram already present in the row (HF's rule)."""
    if ids.shape[1] + 1 < n:
        return logits
    logits = logits.clone()
    for b, row in enumerate(ids.tolist()):
        prefix = tuple(row[len(row) - n + 1 :]) if n > 1 else ()
        banned = {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i : i + n - 1]) == prefix}
        if banned:
            logits[b, list(banned)] = float("-inf")
    return logits
