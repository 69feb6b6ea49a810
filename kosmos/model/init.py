"""Initialisations for small Kosmos-2 models trained from scratch (KOSMOS_SPEC, "Known pitfall").

Trained jointly from a plain random start, a tiny model's patch features collapse toward each other and the decoder
learns to ignore the image. Two of the remedies are initialisations, applied to a freshly built model by
:func:`apply_init` (the train config's ``model.connector_init`` and ``model.loc_embed_init``):

- ``connector="block_pool"``: every patch of image block b gets block b's position code (orthonormal codes,
  added to the vision position embeddings); ``dense``, the value and output projections are scaled identities and
  the query/key projections read the block-code coordinates in every head, so latent query b starts out pooling
  block b. The sharpness is set from a probe of the vision tower on noise images, whatever its depth.
- ``loc_embed="sincos"``: the 1,024 location-token rows (tied with the output layer) get a 2-D sin-cos grid
  code, so neighbouring bins start with similar embeddings and logits.

The third remedy, a frozen vision encoder, is ``kosmos.model.parallelize.freeze_vision`` (``model.freeze_vision``
in the train config). None of this changes the architecture: a model so initialised still converts to and from
Hugging Face checkpoints, and the model itself never calls these recipes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kosmos.model.model import KosmosModel


ConnectorInit = Literal["random", "block_pool"]
LocEmbedInit = Literal["random", "sincos"]


def apply_init(
    model: KosmosModel,
    connector: ConnectorInit = "random",
    loc_embed: LocEmbedInit = "random",
    generator: torch.Generator | None = None,
) -> None:
    """Apply the from-scratch recipes to a model just built (after its own HF initialisation); "random" keeps it."""
    if connector not in ("random", "block_pool") or loc_embed not in ("random", "sincos"):
        raise ValueError(f"unknown initialisation: connector {connector!r}, loc_embed {loc_embed!r}")
    if connector == "block_pool":
        init_connector_block_pool(model, generator=generator)
    if loc_embed == "sincos":
        init_location_embeddings_sincos(model)


def unit_rows(n: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, dim) unit vectors: orthonormal when n <= dim, otherwise random (near-orthogonal in high dim)."""
    if n <= dim:
        q, _ = torch.linalg.qr(torch.randn(dim, n, generator=generator, device="cpu"))
        return q.T.contiguous()
    return F.normalize(torch.randn(n, dim, generator=generator, device="cpu"), dim=-1)


def patch_blocks(grid: int, side: int) -> torch.Tensor:
    """Block index (row-major over a side x side layout) of every patch of a grid x grid image, row-major."""
    rows = torch.arange(grid, device="cpu")[:, None] * side // grid
    cols = torch.arange(grid, device="cpu")[None, :] * side // grid
    return (rows * side + cols).flatten()


def sincos_2d(bins: int, dim: int) -> torch.Tensor:
    """(bins * bins, dim) codes of a bins x bins grid, index y * bins + x: [sin/cos of x | sin/cos of y]."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos code needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device="cpu") / quarter)  # (dim/4,)
    coords = torch.arange(bins, dtype=torch.float32, device="cpu")
    y, x = torch.meshgrid(coords, coords, indexing="ij")

    def code(p: torch.Tensor) -> torch.Tensor:
        angles = p.flatten()[:, None] * omega[None]  # (bins^2, dim/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([code(x), code(y)], dim=1)


@torch.no_grad()
def init_location_embeddings_sincos(model: KosmosModel) -> None:
    """Overwrite the location-token rows with a 2-D sin-cos grid scaled to the other rows' init RMS."""
    cfg = model.config
    n, start = cfg.loc_bins**2, cfg.loc_token_start
    if start < 0 or start + n > cfg.text.vocab_size:
        raise ValueError(
            f"location tokens {start}..{start + n - 1} do not fit a vocabulary of {cfg.text.vocab_size}: "
            "set loc_token_start for this vocabulary"
        )
    table = sincos_2d(cfg.loc_bins, cfg.text.dim)
    table = table / table.pow(2).mean().sqrt() * cfg.init_std
    weight = model.embed_tokens.weight
    weight[start : start + n] = table.to(weight.device, weight.dtype)


@torch.no_grad()
def init_connector_block_pool(
    model: KosmosModel,
    generator: torch.Generator | None = None,
    target_logit: float = 8.0,
    probe_images: int = 2,
) -> None:
    """Make latent query b attend to the patches of image block b (see the module docstring).

    ``target_logit`` is the attention-logit margin of a query's own block over the others, measured on noise.
    """
    cfg = model.config
    v, t = cfg.vision, cfg.text
    grid, q_num = v.image_size // v.patch_size, cfg.latent_query_num
    side = math.isqrt(q_num)
    if side * side != q_num or side > grid:
        raise ValueError(
            f"block_pool needs a square number of latent queries with side <= the patch grid ({grid}), got {q_num}"
        )
    width, dim, heads = v.width, t.dim, t.heads
    head_dim, shared = dim // heads, min(width, dim)
    block = patch_blocks(grid, side)  # (P,)
    codes = unit_rows(q_num, shared, generator)  # (Q, m): one code per block
    codes_d = torch.zeros(q_num, dim, device="cpu")
    codes_d[:, :shared] = codes  # the codes as they come out of the identity `dense`

    # Helper tensors are built on CPU (the generator's device) and moved where the weights live.
    vis, con = model.vision, model.connector
    device, dtype = con.dense.weight.device, con.dense.weight.dtype
    # Position codes at the norm of a typical patch embedding of a unit-variance image, so both survive ln_pre.
    content_norm = float(vis.patch_embed.weight.float().std()) * math.sqrt(v.num_channels * v.patch_size**2 * width)
    vis.pos_embed[1:, :shared] += (content_norm * codes[block]).to(device, vis.pos_embed.dtype)

    con.dense.weight.copy_(torch.eye(dim, width, device="cpu"))
    for linear in (con.dense, con.q_proj, con.kv_proj, con.out_proj):
        linear.bias.zero_()
    # Probe: how strongly do the (normalised) features of a patch carry its block code?
    was_training = model.training
    model.eval()  # no dropout in the probes
    pixels = torch.randn(probe_images, v.num_channels, v.image_size, v.image_size, generator=generator, device="cpu")
    tokens = vis(pixels.to(device=device, dtype=vis.pos_embed.dtype))  # (n, 1 + P, W)
    feats = F.normalize(tokens.float(), dim=-1)[:, 1:].cpu()  # (n, P, W)
    coords = feats[..., :shared] @ codes.T  # (n, P, Q): coordinate of each patch on each block code
    own = coords.gather(-1, block[None, :, None].expand(coords.shape[0], -1, 1)).squeeze(-1)  # (n, P)
    own_mean = float(own.mean())
    other_mean = float((coords.sum(-1) - own).mean()) / max(q_num - 1, 1)
    contrast = max(own_mean - other_mean, 1e-3)
    gamma = max(own_mean / 2, 1e-3)  # latent b's key scores half its own patches': pooling goes to the patches
    scale = math.sqrt(target_logit * math.sqrt(head_dim) / (gamma * contrast))

    head_codes = unit_rows(q_num, head_dim, generator)  # (Q, hd): every head scores block coordinates
    read = (head_codes.T @ codes_d).repeat(heads, 1)  # (D, D)
    con.q_proj.weight.copy_((scale * read).to(dtype))
    con.kv_proj.weight[:dim] = (scale * read).to(device, dtype)
    con.kv_proj.weight[dim:] = torch.eye(dim, device="cpu").to(device, dtype)
    con.latent_query.copy_((gamma * codes_d).to(dtype))
    con.out_proj.weight.copy_(torch.eye(dim, device="cpu"))
    # Output at the RMS of a token embedding, so image slots and text start on the same footing.
    pooled_rms = float(con(tokens).float().pow(2).mean().sqrt())
    con.out_proj.weight.mul_(cfg.init_std / max(pooled_rms, 1e-6))
    model.train(was_training)
