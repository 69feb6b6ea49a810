"""Typed configuration: YAML files loaded into dataclasses, with ``--set a.b=c`` overrides.

One mechanism serves both packages: :func:`load_config` fills any dataclass tree (``GritConfig`` here,
``kosmos.train`` has its own) from a YAML file and dotted overrides, rejects unknown keys with a message
that names the key and the keys that exist, and checks value types. :func:`dump_config` writes the resolved
config back as YAML, which every output keeps beside itself.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclass it is loaded into."""


# ---------------------------------------------------------------------------------------------------------------
# The GRIT pipeline's settings. Dotted names (``detector.box_threshold``) are the public interface: users and
# scripts rely on them (GRIT_SPEC section 5), so renaming one is a breaking change.
# ---------------------------------------------------------------------------------------------------------------

# The Kosmos-2 authors' abstract-noun list (microsoft/unilm issue #1421).
DEFAULT_ABSTRACT_NOUNS = (
    "time",
    "life",
    "love",
    "freedom",
    "happiness",
    "wisdom",
    "peace",
    "justice",
    "hope",
    "courage",
    "faith",
    "understanding",
    "advantage",
    "pursuit",
)


@dataclass
class StageResources:
    """How Ray runs one stage: an actor pool of ``actors`` workers, each reserving ``num_cpus``/``num_gpus``."""

    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 64


@dataclass
class TextConfig:
    spacy_model: str = "en_core_web_sm"
    abstract_nouns: list[str] = field(default_factory=lambda: list(DEFAULT_ABSTRACT_NOUNS))
    drop_pronouns: bool = True
    max_caption_chars: int = 1000
    # Captions per nlp.pipe call; spaCy's own default is 1000, smaller batches keep actor memory flat.
    pipe_batch_size: int = 256
    resources: StageResources = field(default_factory=lambda: StageResources(actors=1, num_cpus=1, batch_size=256))


@dataclass
class ImageConfig:
    # Pillow's own decompression-bomb figure; Pillow only warns between 1x and 2x of it, we drop above 1x.
    max_pixels: int = 89_478_485
    min_side: int = 32
    # Bounds on one sample's image, checked before decoding (bytes) and while decoding (seconds).
    max_bytes: int = 64 * 1024 * 1024
    decode_timeout_s: float = 30.0
    # Decode JPEGs at the smallest DCT scale that still covers the detector's input size (Pillow's draft mode):
    # several times faster on large photos; the stored bytes are untouched.
    jpeg_draft: bool = True
    resources: StageResources = field(default_factory=lambda: StageResources(actors=1, num_cpus=1, batch_size=32))


@dataclass
class DetectorConfig:
    kind: str = "grounding_dino"  # "grounding_dino" or "annotations"
    model: str = "IDEA-Research/grounding-dino-tiny"
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto"
    dtype: str = "fp32"  # "fp32", "bf16" or "fp16" (autocast; weights stay fp32 unless the release is fixed)
    batch_size: int = 8
    # Our choice for Grounding DINO; the paper's 0.65 was for GLIP (configs/grit-paper.yaml sets it).
    box_threshold: float = 0.35
    nms_iou: float = 0.5
    max_boxes_per_phrase: int = 4
    min_box_side: float = 0.01
    # Text encoder limit of Grounding DINO; longer prompts are split into several passes.
    max_text_tokens: int = 256
    # Shorter image side the detector sees (Grounding DINO's processor default is 800, longest 1333).
    image_short_side: int = 800
    image_long_side_max: int = 1333
    # On CPU, give the detector one image per forward pass: float results of a batched forward differ in the last
    # bits with the batch's composition, which Ray decides by arrival order, so only this makes two CPU builds
    # bit-identical. CPU throughput barely depends on batching; on GPU, batch_size applies.
    deterministic_cpu: bool = True
    # Opt-in for a randomly initialised tiny detector when weights are unavailable (demo only: boxes are noise).
    allow_random_weights: bool = False
    # num_gpus -1 = one GPU per actor where the Ray cluster has GPUs, none (CPU) where it has none.
    resources: StageResources = field(
        default_factory=lambda: StageResources(actors=1, num_cpus=1, num_gpus=-1, batch_size=8)
    )
    # Test-only fault injection: an actor raises SystemExit after this many batches (0 = never).
    fault_after_batches: int = 0


@dataclass
class InputConfig:
    # "auto" picks from the paths: *.tar -> webdataset, *.parquet -> parquet, *.jsonl -> jsonl, a folder -> images.
    format: str = "auto"
    paths: list[str] = field(default_factory=list)
    caption_column: str = "caption"
    image_column: str = "image"
    key_column: str = "key"
    # Bounds on input tar archives (hostile input): members per tar and bytes per member.
    max_tar_members: int = 1_000_000
    max_member_bytes: int = 64 * 1024 * 1024
    # Read tasks: at most ``actors`` input files read at once, each task reserving ``num_cpus``;
    # ``batch_size`` samples per block sent downstream.
    resources: StageResources = field(default_factory=lambda: StageResources(actors=2, num_cpus=0.5, batch_size=32))


@dataclass
class OutputConfig:
    path: str = "out/grit"
    samples_per_shard: int = 1000
    # Writing into an output whose manifest has different result-changing settings needs this flag.
    overwrite_config: bool = False
    # Type of the parquet ``id`` column: "int64", "string", or "auto" (decided once per corpus from the first
    # shard's ids: int64 when every id there is an integer, as in GRIT-20M and COYO; string otherwise).
    id_type: str = "auto"
    # Seconds between progress lines (0 = only the final summary).
    progress_interval_s: float = 10.0
    # The output's lease (docs/cluster.md): another build may take it over after this many seconds without a
    # heartbeat from its holder. Hosts sharing an output must agree on the time to well within this.
    lock_ttl_s: float = 60.0
    # The workers' writing: fragment tasks (at most ``actors`` at once, ``batch_size`` rows per fragment batch,
    # ``num_cpus`` each) and shard assembly tasks (``num_cpus`` each).
    resources: StageResources = field(default_factory=lambda: StageResources(actors=2, num_cpus=0.25, batch_size=64))
    # Ray custom resources every writing task asks for, e.g. {"writer_node": 0.01} to write from chosen nodes only.
    ray_resources: dict[str, float] = field(default_factory=dict)
    # Seconds a stopped build (SIGTERM, SIGINT) waits for shards being assembled before abandoning them.
    drain_timeout_s: float = 30.0


@dataclass
class RayConfig:
    address: str = ""  # empty: RAY_ADDRESS if set, else an embedded local Ray
    num_cpus: int = 0  # local Ray only; 0 = all cores
    num_gpus: int = -1  # local Ray only; -1 = detect
    object_store_memory: int = 0  # local Ray only; 0 = Ray's default


@dataclass
class GritConfig:
    input: InputConfig = field(default_factory=InputConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Loading machinery (generic over dataclass trees).
# ---------------------------------------------------------------------------------------------------------------


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``key=value`` overrides, in that order.

    Override values are parsed as YAML scalars or flow collections (``3``, ``0.5``, ``true``, ``[a, b]``).
    Raises :class:`ConfigError` naming the offending key for unknown keys, bad types and malformed overrides.
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        text = Path(path).read_text(encoding="utf-8")
        loaded = yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        _set_dotted(data, key.strip(), _parse_scalar(raw))
    return _build(cls, data, prefix="", source=source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain dicts and lists (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path | None = None) -> str:
    """Serialise ``cfg`` as YAML; also write it to ``path`` when given."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def _parse_scalar(raw: str) -> Any:
    raw = raw.strip()
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        # YAML 1.1 reads "4e-3" (no dot in the mantissa) as a string; users mean a number.
        try:
            return float(value) if _FLOAT_RE.fullmatch(value) else value
        except ValueError:
            return value
    return value


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type[T], data: dict[str, Any], prefix: str, source: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known keys in {where}: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, prefix=f"{key}.", source=source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: bad value for '{key}': {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices and not (isinstance(value, bool) and True not in choices and False not in choices):
            return value
        names = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{source}: '{key}' must be one of {names}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    return value
