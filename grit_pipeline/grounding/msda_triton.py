"""Multi-scale deformable attention as one fused Triton kernel (bf16 or fp32 in, fp32 accumulation).

transformers' PyTorch path samples every level with ``grid_sample`` into (B*H, D, Q, P) tensors, stacks them and
reduces with the attention weights: several full-size intermediates per call and uncoalesced gathers, about a
third of a forward pass's memory traffic. The kernel reads each sampled value once, for a tile of queries of one
(batch, head), and writes only the (B, Q, H*D) output.

Semantics are ``grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``: a location ``(x, y)`` in
[0, 1] of a level of ``h x w`` cells samples pixel coordinates ``x * w - 0.5, y * h - 0.5``; corners outside the
map contribute zero.

:func:`install_msda_kernel` swaps the kernel into every deformable-attention module of a loaded model (their
``attn`` child, the hook transformers' own hub kernels use). On CPU, or where Triton is missing, the module keeps
calling the PyTorch path, so results there are transformers' own. The parity test runs the kernel on CPU through
Triton's interpreter (``TRITON_INTERPRET=1``, read when this module is imported).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of torch; CPU machines usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _msda_kernel(
        value_ptr,  # (B, S, H, D)
        shapes_ptr,  # (L, 2) int64: height, width
        starts_ptr,  # (L,) int64
        loc_ptr,  # (B, Q, H, L, P, 2)
        weight_ptr,  # (B, Q, H, L, P)
        out_ptr,  # (B, Q, H, D)
        S,
        Q,
        H: tl.constexpr,
        D: tl.constexpr,
        L: tl.constexpr,
        P: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // H
        h = bh % H
        offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        q_mask = offs_q < Q
        d_mask = offs_d < D
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        value_base = value_ptr + b.to(tl.int64) * S * H * D + h * D
        for lvl in tl.static_range(L):
            height = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
            width = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
            start = tl.load(starts_ptr + lvl).to(tl.int32)
            for pt in tl.static_range(P):
                # (b, q, h, lvl, pt) of the location and weight tensors
                lin = ((b * Q + offs_q) * H + h) * (L * P) + lvl * P + pt
                x = tl.load(loc_ptr + 2 * lin, mask=q_mask, other=0.0).to(tl.float32) * width - 0.5
                y = tl.load(loc_ptr + 2 * lin + 1, mask=q_mask, other=0.0).to(tl.float32) * height - 0.5
                a = tl.load(weight_ptr + lin, mask=q_mask, other=0.0).to(tl.float32)
                x0f = tl.floor(x)
                y0f = tl.floor(y)
                fx = x - x0f
                fy = y - y0f
                x0 = x0f.to(tl.int32)
                y0 = y0f.to(tl.int32)
                for corner in tl.static_range(4):
                    cx = x0 + (corner % 2)
                    cy = y0 + (corner // 2)
                    wx = fx if corner % 2 == 1 else 1.0 - fx
                    wy = fy if corner // 2 == 1 else 1.0 - fy
                    inside = q_mask & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
                    cell = tl.where(inside, start + cy * width + cx, 0)
                    ptrs = value_base + cell.to(tl.int64)[:, None] * (H * D) + offs_d[None, :]
                    v = tl.load(ptrs, mask=inside[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                    acc += (a * wx * wy)[:, None] * v
        out_ptrs = out_ptr + ((b * Q + offs_q).to(tl.int64)[:, None] * H + h) * D + offs_d[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


def triton_available() -> bool:
    return triton is not None


def msda_fused(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    block_q: int = 16,
) -> torch.Tensor:
    """Multi-scale deformable attention: (B, S, H, D) values -> (B, Q, H*D), in ``value``'s dtype."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    batch, seq, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    value = value.contiguous()
    out = torch.empty((batch, queries, heads, dim), dtype=value.dtype, device=value.device)
    grid = (batch * heads, triton.cdiv(queries, block_q))
    _msda_kernel[grid](
        value,
        spatial_shapes.to(torch.int64).contiguous(),
        level_start_index.to(torch.int64).contiguous(),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        out,
        seq,
        queries,
        H=heads,
        D=dim,
        L=levels,
        P=points,
        BLOCK_Q=block_q,
        BLOCK_D=triton.next_power_of_2(dim),
    )
    return out.view(batch, queries, heads * dim)


class FusedMultiScaleDeformableAttention(nn.Module):
    """Drop-in for transformers' ``MultiScaleDeformableAttention``: the fused kernel on CUDA, else the original."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original

    def forward(
        self,
        value,
        value_spatial_shapes,
        value_spatial_shapes_list,
        level_start_index,
        sampling_locations,
        attention_weights,
        im2col_step,
    ):
        if value.is_cuda and triton is not None:
            return msda_fused(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return self.original(
            value,
            value_spatial_shapes,
            value_spatial_shapes_list,
            level_start_index,
            sampling_locations,
            attention_weights,
            im2col_step,
        )


def self_check(device: torch.device) -> str:
    """Run the kernel once at toy size against the PyTorch path on ``device``: "" when they agree, else why not."""
    from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

    try:
        gen = torch.Generator().manual_seed(0)
        shapes_list = [(6, 5), (3, 3)]
        shapes = torch.tensor(shapes_list, device=device)
        starts = torch.tensor([0, 30], device=device)
        value = torch.randn(2, 39, 2, 32, generator=gen).to(device)
        loc = (torch.rand(2, 7, 2, 2, 4, 2, generator=gen) * 1.2 - 0.1).to(device)
        weights = torch.softmax(torch.randn(2, 7, 2, 8, generator=gen), -1).view(2, 7, 2, 2, 4).to(device)
        ref = MultiScaleDeformableAttention()(value, shapes, shapes_list, starts, loc, weights, 64)
        err = (msda_fused(value, shapes, starts, loc, weights) - ref).abs().max().item()
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile here is a fallback, not a crash
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return "" if err < 1e-4 else f"max abs difference {err:.2e}"


def install_msda_kernel(model: Any, choice: str, device: torch.device) -> str:
    """Swap the fused kernel into ``model`` per ``choice`` ("auto": on CUDA where Triton imports; "triton": the
    same, with a note when it cannot; "pytorch": never). Returns a note for the manifest ("" when none)."""
    if choice == "pytorch" or (choice == "auto" and device.type != "cuda"):
        return ""
    if triton is None or device.type != "cuda":
        note = f"detector.msda_kernel={choice!r}: the fused kernel needs CUDA and triton; using the PyTorch path"
        if choice == "triton":
            log.warning(note)
            return note
        return ""
    problem = self_check(device)
    if problem:
        note = f"fused deformable-attention kernel failed its check on {device} ({problem}); using the PyTorch path"
        log.warning(note)
        return note
    swapped = 0
    for module in model.modules():
        attn = getattr(module, "attn", None)
        if attn is not None and type(attn).__name__ == "MultiScaleDeformableAttention":
            module.attn = FusedMultiScaleDeformableAttention(attn)
            swapped += 1
    log.info("fused deformable-attention kernel installed in %d modules", swapped)
    return ""
