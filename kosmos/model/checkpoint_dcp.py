"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards of the
model and the optimizer, and loading reshards them to whatever world size (one process included) reads them.

Layout, inside one checkpoint folder (``kosmos.train_state`` makes the folder atomic: it is written as
``.tmp-step_...``, flushed, renamed, and only then named in ``latest``)::

    dcp/.metadata          DCP's index of every tensor shard (which file, offset, global shape and dtype)
    dcp/__<r>_<k>.distcp   rank r's shards: "model.<parameter name>" and "optim.state.<parameter name>.<field>"
    dcp.json               what is not a tensor: format, AdamW param groups (hyper-parameters and parameter
                           names), non-tensor optimizer state, the world size that wrote it

Only tensors go into DCP. Two rules keep loading free of code from the file: the optimizer's hyper-parameters are
JSON, never DCP's pickled "bytes" items (which a load would ``torch.load(weights_only=False)``); and ``.metadata``
(a pickle, as DCP writes it) is read by :class:`SafeFileSystemReader`, whose unpickler resolves only DCP's own
metadata classes and a few torch/builtin types, and refuses anything else. Tensor data is raw storage bytes.

Resharding: the model is saved with the state dict the wrapped model gives (sharded DTensors under FSDP2, plain
tensors otherwise) and loaded into the state dict of the model doing the loading, so a checkpoint written by 2 FSDP
ranks loads into 1 plain process, 4 ranks, or DDP, unchanged. :func:`load_full_model_state` reads the whole model
into ordinary CPU tensors on one process, without a process group (``kosmos generate/eval/convert``).
"""

from __future__ import annotations

import io
import json
import pickle
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

DCP_DIR = "dcp"
DCP_META = "dcp.json"
DCP_FORMAT = "kosmos-dcp"
DCP_VERSION = 1
MODEL_PREFIX = "model"
OPTIM_PREFIX = "optim"

# Globals a DCP ``.metadata`` pickle may name. Everything else (os.system, builtins.eval, ...) is refused.
_SAFE_MODULE_PREFIXES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "layout"),
    ("torch", "memory_format"),
    ("torch", "strided"),
    ("torch", "contiguous_format"),
    ("torch.serialization", "_get_layout"),  # a layout by name, from a fixed table
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # (file, offset, length) of a shard
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "tuple"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "slice"),
}


class DcpCheckpointError(RuntimeError):
    """A sharded checkpoint that cannot be read (not DCP, unsafe metadata, missing tensors); the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# Reading DCP metadata without running code from the file
# ---------------------------------------------------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_SAFE_MODULE_PREFIXES) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise DcpCheckpointError(f"checkpoint metadata names {module}.{name}, which a DCP index never holds: refused")

    def persistent_load(self, pid: Any) -> Any:
        raise DcpCheckpointError("checkpoint metadata holds persistent references: refused")


def read_metadata_safely(path: str | Path) -> Any:
    """Unpickle a DCP ``.metadata`` file with :class:`_SafeUnpickler` (DCP's own classes and torch types only)."""
    data = Path(path).read_bytes()
    unpickler = _SafeUnpickler(io.BytesIO(data))
    try:
        return unpickler.load()
    except DcpCheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say which
        raise DcpCheckpointError(f"{path}: unreadable DCP metadata ({type(exc).__name__}: {exc})") from exc


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file reader, with the metadata read by the restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_metadata_safely(Path(self.path) / ".metadata")
            _refuse_bytes(metadata, Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta(checkpoint_id=self.path, load_id=self.load_id)
            return metadata

    return SafeFileSystemReader(str(path))


def _refuse_bytes(metadata: Any, path: Path) -> None:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    pickled = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if pickled:
        raise DcpCheckpointError(f"{path} holds non-tensor (pickled) items {pickled[:5]}: refused")


# ---------------------------------------------------------------------------------------------------------------
# State dicts: tensors for DCP, the rest as JSON
# ---------------------------------------------------------------------------------------------------------------


def is_sharded_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / DCP_DIR / ".metadata").is_file() and (Path(folder) / DCP_META).is_file()


def _split_optimizer(optim_sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    tensors: dict[str, dict[str, Any]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, fields in optim_sd["state"].items():
        for key, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(name, {})[key] = value
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in optim_sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def join_optimizer_state(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict from per-parameter tensors and the JSON side (scalars, param groups)."""
    state = {name: dict(fields) for name, fields in tensors.items()}
    for name, fields in meta.get("scalars", {}).items():
        state.setdefault(name, {}).update(fields)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Model and optimizer state dicts keyed by parameter name, as this process holds them (DTensor shards under
    FSDP2). Collective under FSDP: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(model, optimizer) if optimizer is not None else None
    return model_sd, optim_sd


# ---------------------------------------------------------------------------------------------------------------
# Save and load (every rank calls these)
# ---------------------------------------------------------------------------------------------------------------


def save_sharded(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    asynchronous: bool = False,
) -> Future | None:
    """Write ``model`` (and ``optimizer``) into ``folder/dcp`` (each rank its own shards) and ``folder/dcp.json``
    (rank 0). ``model`` is the model being trained: plain, or sharded in place by FSDP2 (not a DDP wrapper).

    With ``asynchronous`` the tensors are staged to CPU memory and written in the background: the return value is a
    Future that completes when every shard of this rank is on disk; until then the checkpoint is not complete and
    must not be named in ``latest``.
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    state: dict[str, Any] = {MODEL_PREFIX: model_sd}
    meta: dict[str, Any] = {"format": DCP_FORMAT, "format_version": DCP_VERSION, "world_size": world_size}
    if optim_sd is not None:
        tensors, optim_meta = _split_optimizer(optim_sd)
        state[OPTIM_PREFIX] = {"state": tensors}
        meta["optimizer"] = optim_meta
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DCP_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    writer = dcp.FileSystemWriter(str(folder / DCP_DIR), sync_files=True)
    if asynchronous:
        return dcp.async_save(state, storage_writer=writer)
    dcp.save(state, storage_writer=writer)
    return None


def read_dcp_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / DCP_META
    if not path.is_file():
        raise DcpCheckpointError(f"{folder} has no {DCP_META}: not a sharded checkpoint")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != DCP_FORMAT:
        raise DcpCheckpointError(f"{path} is not a sharded kosmos checkpoint")
    if meta.get("format_version", 0) > DCP_VERSION:
        raise DcpCheckpointError(f"{path}: format_version {meta['format_version']} is newer than this code")
    return meta


def load_sharded(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a :func:`save_sharded` checkpoint into ``model`` (and ``optimizer``), resharding to how they are laid
    out here (any world size, FSDP2 or plain). Every rank calls it; the model must already be parallelized and
    the optimizer built over its parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    folder = Path(folder)
    meta = read_dcp_meta(folder)
    if optimizer is not None and "optimizer" not in meta:
        raise DcpCheckpointError(f"{folder} holds no optimizer state")
    reader = _reader(folder / DCP_DIR)
    saved = set(reader.read_metadata().state_dict_metadata)
    model_sd, optim_sd = _state_dicts(model, optimizer)  # the shapes and shards to fill (initialises AdamW state)
    state: dict[str, Any] = {MODEL_PREFIX: model_sd}
    if optim_sd is not None:
        tensors, _ = _split_optimizer(optim_sd)
        # Parameters that had no gradient yet when the checkpoint was written have no AdamW state there: they get
        # none here either, as in the run that wrote it.
        prefix = f"{OPTIM_PREFIX}.state."
        state[OPTIM_PREFIX] = {
            "state": {
                name: fields
                for name, fields in tensors.items()
                if all(f"{prefix}{name}.{key}" in saved for key in fields)
            }
        }
    try:
        dcp.load(state, storage_reader=reader)
    except DcpCheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's exception derives from BaseException
        raise DcpCheckpointError(f"{folder}: the sharded checkpoint does not fit this model ({exc})") from exc
    set_model_state_dict(model, state[MODEL_PREFIX])
    if optimizer is not None:
        full = join_optimizer_state(state[OPTIM_PREFIX]["state"], meta["optimizer"])
        # strict=False: parameters without saved state (above) are allowed to have none.
        set_optimizer_state_dict(model, optimizer, optim_state_dict=full, options=StateDictOptions(strict=False))


def load_full_model_state(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The whole model of a sharded checkpoint as ordinary tensors, on one process (no process group needed):
    parameter names as ``KosmosModel.state_dict()`` has them."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    read_dcp_meta(folder)
    reader = _reader(folder / DCP_DIR)
    metadata = reader.read_metadata()
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = MODEL_PREFIX + "."
    state: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata):
            state[key[len(prefix) :]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state:
        raise DcpCheckpointError(f"{folder} holds no model tensors")
    dcp.load({MODEL_PREFIX: state}, storage_reader=reader, no_dist=True)
    return {k: v.to(device) for k, v in state.items()}
