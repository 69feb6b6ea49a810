"""``manifest.json``: what an output was built from, and whether a new run may write into it.

Two groups of settings decide whether a re-run may continue an existing output:

- the *layout* (resolved input files, input format and columns, ``output.samples_per_shard``,
  ``input.max_tar_members``, ``output.id_type``): these decide which input sample lands in which shard, so a run with
  a different layout would mix up shards. It is refused, always: use a new output folder.
- the *result settings*: everything in the config except what only changes speed or placement (resources, batch
  sizes, device, the Ray address, progress), plus the detector actually loaded (model id, random weights or not) and
  the spaCy pipeline's name and version. A difference is refused unless ``output.overwrite_config`` is true; then
  the new settings are recorded and the manifest warns that the corpus mixes shards built with different settings.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from importlib import metadata
from typing import Any

from grit_pipeline import __version__
from grit_pipeline.config import GritConfig, config_to_dict
from grit_pipeline.output_store import OutputStore

FORMAT_VERSION = 2  # 2: shards named <file>-<block>, written by the workers
MANIFEST = "manifest.json"
CONFIG_COPY = "config.yaml"

# Settings that change speed or placement, never a record.
NON_RESULT_KEYS = (
    "input.paths",
    "input.resources",
    "text.pipe_batch_size",
    "text.resources",
    "image.resources",
    "detector.device",
    "detector.batch_size",
    "detector.deterministic_cpu",
    "detector.resources",
    "detector.fault_after_batches",
    "detector.allow_random_weights",  # what was actually loaded is compared instead (detector.random_weights)
    # How the detector is run (queues, post-processing place, compile, kernels): boxes equal within float tolerance.
    "detector.queue_window",
    "detector.device_postprocess",
    "detector.disable_torch_checks",
    "detector.compile",
    "detector.max_compiled_graphs",
    "detector.compile_cache_dir",
    "detector.cuda_graphs",
    "detector.msda_kernel",
    "output",
    "ray",
)
LAYOUT_KEYS = (
    "input.format",
    "input.caption_column",
    "input.image_column",
    "input.key_column",
    "input.max_tar_members",
    "output.samples_per_shard",
    "output.id_type",
    "output.image_format",  # one image extension per corpus: never mixed by a resume
)

PACKAGES = ("spacy", "transformers", "torch", "ray", "pyarrow", "pillow", "numpy", "webdataset", "fsspec")


class ManifestMismatch(RuntimeError):
    """The output was built with other settings; the message lists them and what to do."""


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _excluded(name: str, keys: tuple[str, ...]) -> bool:
    return any(name == k or name.startswith(k + ".") for k in keys)


def result_settings(cfg: GritConfig, detector: dict[str, Any], spacy_model: dict[str, Any]) -> dict[str, Any]:
    """Dotted settings that can change a record, with the loaded detector and spaCy pipeline."""
    flat = flatten(config_to_dict(cfg))
    out = {k: v for k, v in flat.items() if not _excluded(k, NON_RESULT_KEYS)}
    out["loaded.detector.model"] = detector.get("model")
    out["loaded.detector.random_weights"] = bool(detector.get("random_weights"))
    out["loaded.spacy.version"] = spacy_model.get("version")
    out["loaded.spacy.pipeline"] = spacy_model.get("pipeline")
    return out


def layout(cfg: GritConfig, inputs: list[str]) -> dict[str, Any]:
    flat = flatten(config_to_dict(cfg))
    out = {k: flat[k] for k in LAYOUT_KEYS}
    out["inputs"] = list(inputs)
    return out


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions from package metadata: nothing is imported (the driver never loads torch or transformers)."""
    versions: dict[str, str | None] = {"grit_pipeline": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_manifest(store: OutputStore) -> dict[str, Any] | None:
    """The output's manifest, or None where there is none. A file that is not a grit manifest is refused."""
    try:
        raw = store.read_bytes(MANIFEST)
    except FileNotFoundError:
        return None
    where = store.url_of(MANIFEST)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ManifestMismatch(f"{where} is not valid JSON ({exc}); move it away or use a new output folder") from None
    if not isinstance(data, dict) or "layout" not in data or "format_version" not in data:
        raise ManifestMismatch(f"{where} is not a grit build manifest; use a new output folder")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestMismatch(
            f"{where} is from format version {data.get('format_version')} (this grit writes {FORMAT_VERSION}); "
            "its shards cannot be continued: use a new output folder"
        )
    return data


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if json.dumps(old.get(k), default=str) != json.dumps(new.get(k), default=str)
    ]


def check_layout(old: dict[str, Any] | None, new_layout: dict[str, Any], out_dir: str) -> None:
    """Refuse (always) to continue an output whose shard layout differs."""
    if not old:
        return
    diffs = _diff(old.get("layout") or {}, new_layout)
    if diffs:
        raise ManifestMismatch(
            f"{out_dir} was built from other inputs or with another shard layout, so its shards cannot be "
            f"continued: {'; '.join(diffs)}. Use a new output folder."
        )


def check_results(old: dict[str, Any] | None, new_settings: dict[str, Any], overwrite: bool, out_dir: str) -> list:
    """Differences in result settings; raises unless ``overwrite``. Returns the differences (for the warning)."""
    if not old:
        return []
    diffs = _diff(old.get("result_settings") or {}, new_settings)
    if diffs and not overwrite:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ManifestMismatch(
            f"{out_dir} holds shards built with other settings ({shown}). Re-run with the same config to resume, "
            "use a new output folder, or pass --overwrite-config (output.overwrite_config=true) to continue with "
            "the new settings, which leaves shards built with different settings in one corpus."
        )
    return diffs


def new_manifest(
    cfg: GritConfig,
    inputs: list[str],
    detector: dict[str, Any],
    spacy_model: dict[str, Any],
    old: dict[str, Any] | None,
    changed: list[str],
) -> dict[str, Any]:
    settings = result_settings(cfg, detector, spacy_model)
    warnings = list((old or {}).get("warnings") or [])
    if detector.get("random_weights"):
        message = (
            f"detector {detector.get('model')} has RANDOM weights (offline demo): every box in this corpus is "
            "meaningless"
        )
        if message not in warnings:
            warnings.append(message)
    if changed:
        warnings.append(f"{_now()}: continued with changed settings (output.overwrite_config): {'; '.join(changed)}")
    return {
        "format_version": FORMAT_VERSION,
        "created_at": (old or {}).get("created_at") or _now(),
        "updated_at": _now(),
        "status": "running",
        "config": config_to_dict(cfg),
        "result_config_hash": settings_hash(settings),
        "result_settings": settings,
        "layout": layout(cfg, inputs),
        "versions": package_versions(),
        "spacy_model": spacy_model,
        "detector": detector,
        "inputs": list(inputs),
        "id_type": (old or {}).get("id_type"),
        "file_samples": dict((old or {}).get("file_samples") or {}),  # input file index -> samples, once known
        "warnings": warnings,
    }


def write_manifest(store: OutputStore, manifest: dict[str, Any]) -> None:
    manifest["updated_at"] = _now()
    data = (json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    store.write_bytes(MANIFEST, data)
