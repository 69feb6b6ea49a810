"""Model checkpoints: ``model.safetensors`` (our parameter names) beside ``config.json`` (the ``KosmosConfig``).

Safetensors holds tensors only, so loading a checkpoint never runs code from the file. The tied LM head is the token
embedding itself (one tensor), and the sinusoidal position table is derived, so neither is stored twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kosmos.model.config import KosmosConfig
from kosmos.model.model import KosmosModel, sinusoidal_table

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "kosmos"
FORMAT_VERSION = 1


def save_checkpoint(
    directory: str | Path, state_dict: dict[str, torch.Tensor], config: KosmosConfig, metadata: dict | None = None
) -> Path:
    """Write ``state_dict`` and ``config`` to ``directory``; ``metadata`` (str -> str) goes into the file header."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": FORMAT, **(metadata or {})})
    return save_config(out, config)


def save_config(directory: str | Path, config: KosmosConfig) -> Path:
    """Write ``config.json`` (the weights beside it are ``model.safetensors`` or a sharded checkpoint's shards)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict()}
    (out / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return out


def save_model(model: KosmosModel, directory: str | Path) -> Path:
    """``save_checkpoint`` of an unwrapped model (for FSDP, gather a full state dict and call save_checkpoint)."""
    return save_checkpoint(directory, model.state_dict(), model.config)


def load_config(directory: str | Path) -> KosmosConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a kosmos checkpoint folder")
    payload = json.loads(path.read_text(encoding="utf-8"))
    if payload.get("format") != FORMAT:
        hint = " (a Hugging Face folder? run `kosmos convert --from-hf`)" if "model_type" in payload else ""
        raise ValueError(f"{path} is not a kosmos checkpoint config{hint}")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {payload['format_version']}, newer than this code")
    return KosmosConfig.from_dict(payload["config"])


def load_state_dict(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The folder's weights: ``model.safetensors``, or the shards of a sharded training checkpoint (gathered
    whole on this process, ``kosmos.model.checkpoint_dcp``)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        from kosmos.model.checkpoint_dcp import is_sharded_checkpoint, load_full_model_state

        if is_sharded_checkpoint(directory):
            return load_full_model_state(directory, device)
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    return load_file(str(path), device=str(device))


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **overrides: Any
) -> KosmosModel:
    """Build the model from the folder's config (``overrides`` are KosmosConfig fields that leave the weights' shapes
    alone, e.g. dropout via ``text={...}``) and load its weights strictly. Every parameter is trainable: freezing is
    the caller's (``kosmos.model.parallelize.freeze_vision``)."""
    cfg = load_config(directory)
    data = cfg.to_dict()
    for key, value in overrides.items():
        if key in ("vision", "text") and isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    cfg = KosmosConfig.from_dict(data)
    with torch.device("meta"):
        model = KosmosModel(cfg)
    model.load_state_dict(load_state_dict(directory, device), strict=True, assign=True)
    # Non-persistent buffers were built on meta: rebuild them on the weights' device.
    model.pos_table = _position_table(cfg).to(device)
    if dtype is not None:
        model.to(dtype)
    return model


def _position_table(cfg: KosmosConfig) -> torch.Tensor:
    t = cfg.text
    return sinusoidal_table(t.max_positions + t.pad_token_id + 1, t.dim, t.pad_token_id)
