"""Training checkpoints on disk: written whole or not at all, read back without unpickling anything.

A run folder holds ``checkpoints/step_XXXXXXXX/`` folders and a ``checkpoints/latest`` pointer (a one-line text
file naming the newest complete one). A checkpoint is written into ``checkpoints/.tmp-step_XXXXXXXX``, every file
is flushed to disk, the folder is renamed to its final name (atomic on one filesystem), and only then is ``latest``
replaced (write a temporary file, ``os.replace``). A write that dies at any point (exception, SIGKILL, full disk)
leaves ``latest`` on the previous checkpoint, which is untouched; the next start removes the leftover ``.tmp-*``.

One checkpoint folder::

    model.safetensors, config.json   the model (kosmos.model.checkpoint: `kosmos generate/eval` and load_model read it)
    tokenizer/                       its tokenizer, so the folder stands alone
    optimizer.safetensors            AdamW moments and step counts, keyed "<parameter name>/<field>"
    optimizer.json                   param groups (hyper-parameters, parameter names) and non-tensor state
    rank<r>.safetensors, rank<r>.json   per rank: torch/CUDA/numpy RNG states, Python RNG, the loader's position
    train_config.yaml                the resolved training config
    trainer_state.json               step, counters, schedule; written last inside the folder

Everything is safetensors or JSON: loading a checkpoint never runs code from a file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from grit_core.durable import fsync_dir
from kosmos.model.checkpoint_dcp import join_optimizer_state

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
OPTIM_TENSORS = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
TOKENIZER_DIR = "tokenizer"
CONFIG_YAML = "train_config.yaml"
STATE_FORMAT = "kosmos-train-state"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d{8,})")
_TOKENIZER_FILES = ("tokenizer.json", "kosmos_tokenizer.json", "sentencepiece.bpe.model")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message says which and why."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state <-> (safetensors tensors, JSON)
# ---------------------------------------------------------------------------------------------------------------


def optimizer_state_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a parameter-name-keyed optimizer state dict (``torch.distributed.checkpoint.state_dict`` layout:
    ``{"state": {name: {field: value}}, "param_groups": [{..., "params": [names]}]}``) into tensors and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, fields in state["state"].items():
        for key, value in fields.items():
            if "/" in key:
                raise CheckpointError(f"optimizer state field {key!r} contains '/'")
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_files`."""
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, field_name = key.rpartition("/")
        state.setdefault(name, {})[field_name] = tensor
    return join_optimizer_state(state, meta)


# ---------------------------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------------------------


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states, as tensors and JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()  # this rank's device
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    n = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ---------------------------------------------------------------------------------------------------------------
# Writing: temporary folder, then rename, then the pointer
# ---------------------------------------------------------------------------------------------------------------


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete (the same name on every rank)."""
    return checkpoints_root(output_dir) / f".tmp-{step_dir_name(step)}"


def remove_incomplete(output_dir: str | Path) -> list[str]:
    """Delete what interrupted checkpoint writes left (``.tmp-*`` and ``.old-*`` folders); returns their names."""
    root = checkpoints_root(output_dir)
    removed = []
    if root.is_dir():
        for path in sorted(root.glob(".tmp-*")) + sorted(root.glob(".old-*")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        stale = root / f"{LATEST}.tmp"
        if stale.exists():
            stale.unlink()
    return removed


def write_state_files(
    folder: Path,
    *,
    step: int,
    state: dict[str, Any],
    optimizer: dict[str, Any] | None,
    fault: Callable[[str], None] | None = None,
) -> None:
    """Rank 0's part after the model files: optimizer files, then ``trainer_state.json`` (the last file)."""
    if optimizer is not None:
        tensors, meta = optimizer_state_to_files(optimizer)
        save_file(tensors, str(folder / OPTIM_TENSORS), metadata={"format": STATE_FORMAT})
        if fault is not None:
            fault("optimizer")
        write_json(folder / OPTIM_META, meta)
    write_json(folder / STATE_FILE, {"format": STATE_FORMAT, "format_version": STATE_VERSION, "step": step, **state})


def write_rank_files(folder: Path, rank: int, data_state: dict[str, Any] | None) -> None:
    """Each rank's RNG states and loader position."""
    tensors, meta = capture_rng_state()
    save_file(tensors, str(folder / f"rank{rank}.safetensors"))
    write_json(folder / f"rank{rank}.json", {"rng": meta, "data": data_state})


def finalize_checkpoint(output_dir: str | Path, step: int, keep: int) -> Path:
    """Make the temporary folder of ``step`` the checkpoint: flush, rename, point ``latest`` at it, prune.

    Only rank 0 calls this, after every rank has written its files.
    """
    root = checkpoints_root(output_dir)
    tmp = temporary_dir(output_dir, step)
    if not (tmp / STATE_FILE).is_file():
        raise CheckpointError(f"{tmp} has no {STATE_FILE}: the checkpoint of step {step} is incomplete")
    _fsync_tree(tmp)
    final = root / step_dir_name(step)
    if final.exists():  # the same step saved again (a re-run): replace it, still never leaving a gap
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    pointer = root / f"{LATEST}.tmp"
    pointer.write_text(final.name + "\n", encoding="utf-8")
    with open(pointer, "rb") as f:
        os.fsync(f.fileno())
    os.replace(pointer, root / LATEST)
    fsync_dir(root)
    prune_checkpoints(output_dir, keep)
    return final


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest complete checkpoints; the one ``latest`` names is always kept."""
    root = checkpoints_root(output_dir)
    latest = latest_checkpoint(output_dir)
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name)))
    removed = []
    for _, path in steps[: max(0, len(steps) - max(1, keep))]:
        if latest is not None and path.resolve() == latest.resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names in a run folder, or None when there is none yet."""
    root = checkpoints_root(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not _STEP_DIR.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name!r}, not a checkpoint folder")
    path = root / name
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {name}, which is missing or incomplete")
    return path


def read_trainer_state(folder: Path) -> dict[str, Any]:
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{folder / STATE_FILE} is not a training state file")
    if state.get("format_version", 0) > STATE_VERSION:
        raise CheckpointError(f"{folder / STATE_FILE}: format_version {state['format_version']} is too new")
    return state


def read_optimizer_state(folder: Path) -> dict[str, Any] | None:
    if not (folder / OPTIM_TENSORS).is_file():
        return None
    meta = json.loads((folder / OPTIM_META).read_text(encoding="utf-8"))
    return optimizer_state_from_files(load_file(str(folder / OPTIM_TENSORS)), meta)


def read_rank_files(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = folder / f"rank{rank}.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no state for rank {rank}: it was saved with fewer ranks")
    return load_file(str(folder / f"rank{rank}.safetensors")), json.loads(path.read_text(encoding="utf-8"))


def resolve_model_dir(path: str | Path) -> Path:
    """A folder with model weights from what a user may pass: a run folder (its latest checkpoint), a
    ``checkpoints`` folder or its ``latest`` pointer, one checkpoint, or any kosmos model folder (``kosmos convert``
    output)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    found = None
    if path.name == LATEST and path.is_file() and path.parent.name == CHECKPOINTS_DIR:  # the pointer itself
        found = latest_checkpoint(path.parent.parent)
    elif (path / CHECKPOINTS_DIR / LATEST).is_file():
        found = latest_checkpoint(path)
    elif path.name == CHECKPOINTS_DIR and (path / LATEST).is_file():
        found = latest_checkpoint(path.parent)
    if found is not None:
        return found
    raise CheckpointError(f"{path}: no model (expected config.json, or a run folder with {CHECKPOINTS_DIR}/latest)")


def resolve_tokenizer_dir(model_dir: str | Path) -> Path:
    """The tokenizer that goes with a model folder: its ``tokenizer/`` subfolder, or tokenizer files beside the
    weights (``kosmos convert`` copies Hugging Face's there), or the folder its training config names."""
    model_dir = Path(model_dir)
    if (model_dir / TOKENIZER_DIR).is_dir():
        return model_dir / TOKENIZER_DIR
    if any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        return model_dir
    config = model_dir / CONFIG_YAML
    if config.is_file():
        import yaml

        named = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("tokenizer")
        if named and Path(named).is_dir():
            return Path(named)
    raise CheckpointError(
        f"{model_dir}: no tokenizer found (a tokenizer/ folder, tokenizer.json or sentencepiece.bpe.model beside "
        "the weights); pass --tokenizer"
    )
