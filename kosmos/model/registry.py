"""Named model sizes: ``create_model(name, **overrides)``, ``model_config(name, **overrides)``, ``list_models()``.

Overrides are ``KosmosConfig`` fields; ``vision=`` and ``text=`` take dicts merged into the size's sub-configs, e.g.
``create_model("tiny", text={"vocab_size": 3000}, loc_token_start=1976, multiway_ffn=True)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from kosmos.model.config import KosmosConfig, TextConfig, VisionConfig
from kosmos.model.model import KosmosModel


def _tiny() -> KosmosConfig:
    # Small enough for a CPU training step in milliseconds. 64 px / 8 px patches = an 8x8 grid pooled by 16 queries
    # (2x2 patches each, so block_pool works); head width 16 >= 16 queries (orthonormal codes per head).
    # Vocabulary: 1,024 text/special ids followed by the 1,024 location tokens; from-scratch runs override both.
    return KosmosConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=64, layers=2, heads=4, mlp_dim=256),
        text=TextConfig(vocab_size=2048, max_positions=512, dim=64, layers=2, heads=4, ffn_dim=256),
        latent_query_num=16,
        loc_token_start=1024,
    )


def _base() -> KosmosConfig:
    # ~300M parameters: a ViT-B/16-like tower (224 px, 196 patches) and a 12-layer, 1024-wide decoder with the
    # released vocabulary, for single-GPU experiments.
    return KosmosConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072),
        text=TextConfig(dim=1024, layers=12, heads=16, ffn_dim=4096),
    )


def _paper() -> KosmosConfig:
    # The released model (microsoft/kosmos-2-patch14-224): CLIP ViT-L/14 at 224 px and a 24-layer, 2048-wide decoder.
    return KosmosConfig()


_SIZES: dict[str, Callable[[], KosmosConfig]] = {"tiny": _tiny, "kosmos2-base": _base, "kosmos2-1.6b": _paper}


def list_models() -> list[str]:
    return list(_SIZES)


def model_config(name: str, **overrides: Any) -> KosmosConfig:
    """The named size's config with ``overrides`` applied (unknown names and fields raise ValueError)."""
    if name not in _SIZES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(_SIZES)}")
    cfg = _SIZES[name]()
    known = {f.name for f in dataclasses.fields(KosmosConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown KosmosConfig field {key!r}")
        if key in ("vision", "text") and isinstance(value, dict):
            value = dataclasses.replace(getattr(cfg, key), **value)
        setattr(cfg, key, value)
    return KosmosConfig.from_dict(cfg.to_dict())  # re-run validation on the merged config


def create_model(name: str, **overrides: Any) -> KosmosModel:
    """A randomly initialised model of the named size (``model_config`` for the overrides)."""
    return KosmosModel(model_config(name, **overrides))
