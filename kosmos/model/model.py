"""Kosmos-2 in one file: CLIP vision encoder, latent-query connector, Magneto decoder, tied LM head.

Every weight has a counterpart in Hugging Face's ``Kosmos2ForConditionalGeneration`` (``kosmos/model/hf.py`` maps
names), and the forward pass reproduces it, so the released checkpoint loads and gives the same logits.

Architectural choices, in data-flow order:
- Vision: CLIP ViT. Patches by a bias-free conv, a learned CLS token, learned absolute positions, ``ln_pre``
  before the blocks ("pre_layrnorm" in HF), pre-LN blocks with quick_gelu MLPs, and ``ln_post`` applied to *every*
  token (CLIP applies it to CLS only; Kosmos-2 feeds all 1 + (image/patch)^2 tokens onward).
- Connector: the post-LN'd tokens are L2-normalised over the channel dimension, projected by ``dense`` to the text
  width, then ``latent_query_num`` learned queries attend in one multi-head attention over
  concat(projected tokens, latent queries); its output is the image embedding, one vector per query.
- Decoder: pre-LN blocks plus the two Magneto sub-LayerNorms: ``attn.inner_ln`` before the attention output
  projection and ``ffn.ln`` before fc2. Exact (erf) GELU. Fixed sinusoidal positions with the fairseq offset:
  positions start at ``pad_token_id + 1`` and pad tokens get the all-zero row ``pad_token_id``.
- Input embeddings: token embeddings, with the image embeddings written into the slots marked by
  ``image_embeds_position_mask`` BEFORE the ``sqrt(dim)`` scale, then positions added.
- LM head: tied to the token embeddings; the loss is the usual shifted cross-entropy with ignore index -100. In
  training (``return_logits=False``) the head runs only at target positions and in chunks
  (``kosmos/model/lm_loss.py``), so the N x vocab logits never exist whole.
- Attention goes through ``F.scaled_dot_product_attention``: ``is_causal=True`` (flash-eligible) when there is no
  padding mask, otherwise an additive mask built exactly as HF builds it. Packed rows (``segment_ids``) get a
  block-diagonal causal mask, each sample attending only to itself, and positions that restart with each sample:
  FlexAttention on CUDA when attention dropout is off, otherwise SDPA with the boolean mask (exact on any device).
- Optional, off by default: a multiway FFN (separate FFN weights for image and text positions, BEiT-3 style).
The config (``kosmos/model/config.py``) is the architecture only. Training switches are applied from outside:
freezing, activation checkpointing, compilation and data parallelism in ``kosmos/model/parallelize.py``, the
from-scratch initialisations in ``kosmos/model/init.py``; decoding lives in ``kosmos/model/generation.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kosmos.model.config import KosmosConfig, TextConfig, VisionConfig
from kosmos.model.generation import generate
from kosmos.model.lm_loss import chunked_linear_cross_entropy

if TYPE_CHECKING:
    from kosmos.model.generation import KVCache

IGNORE_INDEX = -100


class KosmosOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None  # scalar, float32, when labels or loss_mask were given


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; ``inner_ln`` is Magneto's sub-LN (decoder only)."""

    def __init__(self, dim: int, heads: int, dropout: float, inner_ln_eps: float | None = None):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: q, k, v
        self.inner_ln = nn.LayerNorm(dim, eps=inner_ln_eps) if inner_ln_eps is not None else None
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, is_causal=False, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, past + T, hd)
        p = self.dropout if self.training else 0.0
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # a FlexAttention BlockMask
            y = _flex_attention()(q, k, v, block_mask=attn_mask)
        else:
            if attn_mask is not None and attn_mask.dtype not in (q.dtype, torch.bool):
                attn_mask = attn_mask.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        if self.inner_ln is not None:
            y = self.inner_ln(y)
        return self.out_proj(y)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.heads, cfg.attention_dropout)
        self.ln2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.checkpointing = False

    def forward(self, x):
        if _should_checkpoint(self):
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VisionEncoder(nn.Module):
    """CLIP ViT; returns every token after ``ln_post``: (B, 1 + patches, width)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(num_patches + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        if pixel_values.shape[-2:] != (size, size):
            raise ValueError(f"pixel_values must be {size}x{size}, got {tuple(pixel_values.shape[-2:])}")
        pixel_values = pixel_values.to(self.patch_embed.weight.dtype)
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1 + N, W)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class Connector(nn.Module):
    """Image tokens -> ``latent_query_num`` image embeddings at the text width (HF's image_to_text_projection)."""

    def __init__(self, cfg: KosmosConfig):
        super().__init__()
        dim = cfg.text.dim
        self.heads, self.dropout = cfg.text.heads, cfg.text.attention_dropout
        self.dense = nn.Linear(cfg.vision.width, dim)
        self.latent_query = nn.Parameter(torch.zeros(cfg.latent_query_num, dim))
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)  # rows: k, v
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = F.normalize(features, dim=-1)  # (B, N, W): unit length per token
        h = self.dense(features)  # (B, N, D)
        B, _, D = h.shape
        latents = self.latent_query.to(h.dtype).expand(B, -1, -1)  # (B, Q, D)
        memory = torch.cat([h, latents], dim=1)  # (B, N + Q, D): the queries also see themselves
        hd = D // self.heads
        q = self.q_proj(latents).view(B, -1, self.heads, hd).transpose(1, 2)  # (B, H, Q, hd)
        k, v = self.kv_proj(memory).view(B, -1, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N + Q, hd)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, -1, D))  # (B, Q, D)


class TextFFN(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim)
        self.ln = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layer_norm_eps)  # Magneto sub-LN before fc2
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim)
        self.activation_dropout, self.dropout = cfg.activation_dropout, cfg.dropout

    def forward(self, x):
        x = F.dropout(F.gelu(self.fc1(x)), self.activation_dropout, self.training)
        return F.dropout(self.fc2(self.ln(x)), self.dropout, self.training)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: TextConfig, multiway: bool = False):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.attention_dropout, inner_ln_eps=cfg.layer_norm_eps)
        self.ln_ffn = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.ffn = TextFFN(cfg)
        self.ffn_image = TextFFN(cfg) if multiway else None  # multiway: used at image-slot positions
        self.dropout = cfg.dropout
        self.checkpointing = False

    def forward(self, x, attn_mask=None, is_causal=False, image_mask=None, cache=None, layer: int = 0):
        if cache is None and _should_checkpoint(self):
            return checkpoint(self._forward, x, attn_mask, is_causal, image_mask, use_reentrant=False)
        return self._forward(x, attn_mask, is_causal, image_mask, cache, layer)

    def _forward(self, x, attn_mask=None, is_causal=False, image_mask=None, cache=None, layer: int = 0):
        h = self.attn(self.ln_attn(x), attn_mask, is_causal, cache, layer)
        x = x + F.dropout(h, self.dropout, self.training)
        h = self.ln_ffn(x)
        if self.ffn_image is None or image_mask is None:
            return x + self.ffn(h)
        # Multiway: each position goes through the FFN of its modality (one boolean gather each way).
        flat, is_image = h.reshape(-1, h.shape[-1]), image_mask.reshape(-1)
        out = flat.new_empty(flat.shape)
        out[is_image] = self.ffn_image(flat[is_image]).to(out.dtype)
        out[~is_image] = self.ffn(flat[~is_image]).to(out.dtype)
        return x + out.view_as(h)


def sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> torch.Tensor:
    """fairseq/tensor2tensor table: [sin | cos] halves, frequencies 10000^(-i/(half-1)), the padding row zero."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * freqs[None]  # (P, half)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[padding_idx] = 0
    return table


def make_positions(input_ids: torch.Tensor, padding_idx: int, past_length: int = 0) -> torch.Tensor:
    """fairseq ``make_positions``: non-pad tokens count from ``padding_idx + 1 + past_length``; pads stay at pad.

    Incremental decoding uses the same rule on the new tokens only, as HF does, so left-padded rows see a gap in
    their positions after the prompt; reproducing it is what keeps greedy generation token-identical to HF.
    """
    mask = input_ids.ne(padding_idx).int()
    return ((torch.cumsum(mask, dim=1) + past_length) * mask).long() + padding_idx


def insert_image_embeds(x: torch.Tensor, image_embeds: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Write row b's image embeddings, in order, into the True slots of ``image_mask[b]``.

    x (B, T, D), image_embeds (B, Q, D), image_mask (B, T) bool with 0 or Q True entries per row (rows without an
    image keep their token embeddings). A gather plus ``where`` rather than boolean indexing: no host sync.
    """
    slot = (image_mask.long().cumsum(dim=1) - 1).clamp(min=0, max=image_embeds.shape[1] - 1)  # (B, T)
    gathered = image_embeds.gather(1, slot[..., None].expand(-1, -1, image_embeds.shape[-1]))  # (B, T, D)
    return torch.where(image_mask[..., None], gathered.to(x.dtype), x)


def segment_positions(segment_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """Positions of packed rows: each sample (a run of equal non-zero ``segment_ids``) counts from
    ``padding_idx + 1`` again, as if it were alone in its row; padding (segment 0) gets ``padding_idx``."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (1, 0), value=True)  # (B, T): a sample begins
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # index where the sample began
    pos = idx - first + padding_idx + 1
    return torch.where(segment_ids > 0, pos, torch.full_like(pos, padding_idx))


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask, True where query t may attend key s: s <= t and both in the same sample.
    Padding (segment 0) attends causally to padding only, so no row is empty and nothing leaks into a sample."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


def document_block_mask(segment_ids: torch.Tensor):
    """The :func:`document_mask` as a FlexAttention ``BlockMask`` (blocks that are fully masked are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = segment_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])

    return create_block_mask(mask_mod, B, None, T, T, device=segment_ids.device)


_FLEX = None


def _flex_attention():
    """FlexAttention, compiled once (eager flex_attention is a slow reference implementation)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _FLEX


def _should_checkpoint(block: nn.Module) -> bool:
    """Recompute this block in backward: inside the block, so FSDP wrapping the block stays outside the recompute."""
    return block.checkpointing and block.training and torch.is_grad_enabled()


def _is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (or all ones). One host sync."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def decoder_attention_mask(attention_mask, past_length: int, query_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, T, past + T) mask: finfo.min on pad keys plus finfo.min on future keys, as HF adds them.

    A key that is both gets -inf; a row never becomes all -inf because its own position is causally allowed, so
    pad query rows stay finite (they attend to pads) and cannot leak NaN into real rows.
    """
    total = past_length + query_length
    neg = torch.finfo(dtype).min
    q_pos = torch.arange(query_length, device=attention_mask.device)[:, None] + past_length
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]
    causal = torch.zeros(query_length, total, dtype=dtype, device=attention_mask.device)
    causal = causal.masked_fill(k_pos > q_pos, neg)  # (T, S)
    pad = torch.zeros(attention_mask.shape[0], total, dtype=dtype, device=attention_mask.device)
    pad = pad.masked_fill(attention_mask[:, :total].eq(0), neg)  # (B, S)
    return pad[:, None, None, :] + causal[None, None]  # (B, 1, T, S)


class KosmosModel(nn.Module):
    """Kosmos-2: ``forward`` for training and scoring, ``generate`` for greedy or sampled decoding."""

    def __init__(self, config: KosmosConfig):
        super().__init__()
        self.config = config
        t = config.text
        self.vision = VisionEncoder(config.vision)
        self.connector = Connector(config)
        self.embed_tokens = nn.Embedding(t.vocab_size, t.dim, padding_idx=t.pad_token_id)
        self.blocks = nn.ModuleList(DecoderBlock(t, config.multiway_ffn) for _ in range(t.layers))
        self.ln_f = nn.LayerNorm(t.dim, eps=t.layer_norm_eps)
        self.embed_scale = math.sqrt(t.dim) if t.scale_embedding else 1.0
        table = sinusoidal_table(t.max_positions + t.pad_token_id + 1, t.dim, t.pad_token_id)
        self.register_buffer("pos_table", table, persistent=False)  # derived, never saved (as in HF)
        self.reset_parameters()

    # ----- set-up -----

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """HF's initialisation: the CLIP scheme for the vision tower, N(0, init_std) elsewhere. (The from-scratch
        recipes of ``kosmos.model.init`` are applied on top by whoever builds a model to train.)"""
        cfg, std = self.config, self.config.init_std
        v = cfg.vision

        def normal(p: torch.Tensor, s: float) -> None:
            p.normal_(0.0, s, generator=generator)

        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                normal(m.weight, std)
                m.bias.zero_()
        normal(self.embed_tokens.weight, std)
        self.embed_tokens.weight[cfg.text.pad_token_id].zero_()
        vis = self.vision
        normal(vis.class_embedding, v.width**-0.5)
        normal(vis.patch_embed.weight, 0.02)
        normal(vis.pos_embed, 0.02)
        in_std, out_std = v.width**-0.5 * (2 * v.layers) ** -0.5, v.width**-0.5
        for block in vis.blocks:
            normal(block.attn.qkv.weight, in_std)
            normal(block.attn.out_proj.weight, out_std)
            normal(block.mlp.fc1.weight, (2 * v.width) ** -0.5)
            normal(block.mlp.fc2.weight, in_std)
        normal(self.connector.latent_query, 1.0)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ----- forward -----

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised pixels -> (B, latent_query_num, text dim) image embeddings.

        A frozen tower (no parameter requiring grad) records no autograd graph, so it costs no activation memory."""
        features = self.vision(pixel_values)  # (B, 1 + N, W)
        return self.connector(features)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        image_embeds_position_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        loss_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
        return_logits: bool = True,
        images_in_slot_order: bool = False,
        check_slots: bool = True,
        flex_attention: bool | None = None,
    ) -> KosmosOutput:
        """Logits for every position and, given ``labels`` or ``loss_mask``, the causal-LM loss.

        input_ids (B, T); pixel_values (B, C, H, W) or precomputed image_embeds (B, Q, D); image_embeds_position_mask
        (B, T), 1 at the Q image slots of each row with an image; attention_mask (B, past + T), 0 at padding.
        labels (B, T) are aligned with input_ids (the shift happens here; -100 is ignored), or loss_mask (B, T) marks
        the input tokens that are targets. ``reduction="sum"`` returns the summed loss, for exact averaging over
        gradient-accumulation steps. ``return_logits=False`` (training) runs the LM head only where there is a
        target, which in Kosmos-2 sequences skips the image slots, and returns ``logits=None``.
        ``images_in_slot_order=True`` takes the loader's layout instead of HF's: pixel_values/image_embeds (N, ...)
        hold one image per block of Q slots, in the order the blocks appear reading the rows, so rows may have no
        image (text-only samples mixed in) or several (packed rows).

        Packed rows: ``segment_ids`` (B, T) numbers the samples of each row 1, 2, ... (0 at padding); every sample
        then attends only to itself and its positions restart (unless ``position_ids`` are given), so a packed row
        scores exactly as its samples would alone. ``flex_attention`` forces (True) or forbids (False)
        FlexAttention for that mask; None: on CUDA when attention dropout is off.

        No host syncs, for a compiled training step: ``target_index`` (M,) lists the flat ``b * T + t`` positions
        whose next token is a target (-1 entries are padding, ignored), computed on the host by the caller, so the
        LM head runs on exactly those rows without a boolean gather; ``check_slots=False`` skips the image-slot
        check (the caller checked the host copy with :meth:`check_image_slots`).
        """
        if input_ids is None:
            raise ValueError("input_ids is required")
        t = self.config.text
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > t.max_positions:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_positions={t.max_positions}")

        has_image = pixel_values is not None or image_embeds is not None
        if has_image and image_embeds_position_mask is not None and check_slots:
            images = (pixel_values if pixel_values is not None else image_embeds).shape[0]
            self.check_image_slots(image_embeds_position_mask, images, images_in_slot_order)
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_image(pixel_values)  # (B, Q, D)
        x = self.embed_tokens(input_ids)  # (B, T, D)
        if image_embeds is not None and image_embeds_position_mask is not None:
            if images_in_slot_order:  # fills the slots in row-major order, image after image
                slots = image_embeds_position_mask.bool()[..., None]
                x = x.masked_scatter(slots, image_embeds.reshape(-1, image_embeds.shape[-1]).to(x.dtype))
            else:
                x = insert_image_embeds(x, image_embeds, image_embeds_position_mask.bool())
        elif image_embeds_position_mask is not None and past == 0 and image_embeds_position_mask.any():
            raise ValueError("image_embeds_position_mask marks image slots but no pixel_values/image_embeds given")
        x = x * self.embed_scale
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for training and scoring, not incremental decoding")
        if position_ids is None:
            if segment_ids is not None:
                position_ids = segment_positions(segment_ids, t.pad_token_id)
            else:
                position_ids = make_positions(input_ids, t.pad_token_id, past)
        x = x + F.embedding(position_ids, self.pos_table).to(x.dtype)
        x = F.dropout(x, t.dropout, self.training)  # (B, T, D)

        attn_mask, is_causal = None, False
        if segment_ids is not None:  # the padding is segment 0: the document mask covers it
            attention_mask = None
        if attention_mask is not None and self.training and cache is None and _is_right_padded(attention_mask):
            # Causal attention alone gives every real token the same result, and pad positions carry no loss:
            # dropping the mask lets SDPA use its flash kernel. (Eval keeps HF's exact pad-position outputs.)
            attention_mask = None
        if segment_ids is not None:
            use_flex = flex_attention
            if use_flex is None:
                use_flex = x.is_cuda and not (self.training and t.attention_dropout > 0)
            if use_flex and self.training and t.attention_dropout > 0:
                raise ValueError("FlexAttention has no attention dropout: set text.attention_dropout to 0")
            attn_mask = document_block_mask(segment_ids) if use_flex else document_mask(segment_ids)
        elif attention_mask is not None:
            attn_mask = decoder_attention_mask(attention_mask, past, T, _compute_dtype(x))
        elif past == 0:
            is_causal = T > 1
        elif T > 1:  # chunked prefill into a filled cache
            attn_mask = decoder_attention_mask(input_ids.new_ones(B, past + T), past, T, _compute_dtype(x))
        multiway_mask = None
        if self.config.multiway_ffn:
            multiway_mask = (
                image_embeds_position_mask.bool()
                if image_embeds_position_mask is not None and past == 0
                else torch.zeros(B, T, dtype=torch.bool, device=x.device)
            )
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, is_causal, multiway_mask, cache, i)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)

        if labels is None and loss_mask is not None:
            labels = input_ids.masked_fill(~loss_mask.bool(), IGNORE_INDEX)
        if labels is None:
            if not return_logits:
                raise ValueError("return_logits=False needs labels or loss_mask")
            return KosmosOutput(F.linear(x, self.embed_tokens.weight), None)  # (B, T, V), tied head
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # position t predicts token t + 1
        if return_logits:
            logits = F.linear(x, self.embed_tokens.weight)  # (B, T, V)
            scored = logits.view(B * T, -1).float()
            loss = F.cross_entropy(scored, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
            return KosmosOutput(logits, loss)
        flat = x.reshape(B * T, -1)
        if target_index is None:
            keep = targets.ne(IGNORE_INDEX).nonzero().squeeze(1)  # one host sync (the count of targets)
            hidden, targets = flat.index_select(0, keep), targets.index_select(0, keep)
        else:
            valid = target_index >= 0
            index = target_index.clamp(min=0)
            hidden = flat.index_select(0, index)  # (M, D)
            targets = targets.index_select(0, index).masked_fill(~valid, IGNORE_INDEX)
        loss = chunked_linear_cross_entropy(hidden, self.embed_tokens.weight, targets, reduction=reduction)
        return KosmosOutput(None, loss)

    generate = generate  # (model, input_ids, ...) -> (B, T + n) token ids; see kosmos.model.generation

    def check_image_slots(self, image_mask: torch.Tensor, num_images: int, in_slot_order: bool = False) -> None:
        """Raise ValueError unless ``image_mask`` has the slots for ``num_images`` images (host syncs on a GPU
        tensor: call it on the host copy and pass ``check_slots=False`` to ``forward``)."""
        if torch.compiler.is_compiling():
            return
        counts = image_mask.bool().sum(dim=1)
        q = self.config.latent_query_num
        if in_slot_order:
            if not bool((counts % q == 0).all()) or int(counts.sum()) != num_images * q:
                raise ValueError(
                    f"{num_images} images need {num_images * q} image slots in blocks of {q}, got counts "
                    f"{counts.tolist()}"
                )
            return
        if not bool(((counts == 0) | (counts == q)).all()):
            raise ValueError(f"each row needs 0 or {q} image slots, got counts {counts.tolist()}")
