"""The GRIT pipeline's typed configuration: the ``GritConfig`` dataclass tree.

Loading (YAML file, then ``--set a.b=c`` overrides, unknown keys and bad types rejected) is the shared machinery of
:mod:`grit_core.config`, re-exported here: ``load_config(GritConfig, path, overrides)``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from grit_core.config import ConfigError, config_to_dict, dump_config, load_config  # noqa: F401 (re-exported)

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
    """How Ray runs one stage: a pool of ``actors`` workers (tasks for reading), each reserving ``num_cpus`` and
    ``num_gpus``, given ``batch_size`` rows per call.

    Every stage declares its defaults (``grit_pipeline/stages``); in a config (``ray.stages.<stage>``) a field left
    unset (``None``) keeps the stage's default, so ``--set ray.stages.text.batch_size=64`` changes only that field.
    """

    actors: int | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None  # -1 (grounding): one GPU per actor where the cluster has GPUs, none where not
    batch_size: int | None = None

    def over(self, default: StageResources) -> StageResources:
        """These settings, with every unset field taken from ``default``."""
        return StageResources(
            **{f.name: getattr(default, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
               for f in dataclasses.fields(self)}
        )  # fmt: skip


@dataclass
class TextConfig:
    spacy_model: str = "en_core_web_sm"
    abstract_nouns: list[str] = field(default_factory=lambda: list(DEFAULT_ABSTRACT_NOUNS))
    drop_pronouns: bool = True
    max_caption_chars: int = 1000
    # Captions per nlp.pipe call; spaCy's own default is 1000, smaller batches keep actor memory flat.
    pipe_batch_size: int = 256


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


@dataclass
class DetectorConfig:
    kind: str = "grounding_dino"  # "grounding_dino" or "annotations"
    model: str = "IDEA-Research/grounding-dino-tiny"
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto"
    dtype: str = "fp32"  # "fp32", "bf16" or "fp16" (autocast; weights stay fp32 unless the release is fixed)
    batch_size: int = 8
    # A phrase's score from its tokens' sigmoids (GRIT_SPEC 3.3): "max", the Grounding DINO demo's and the Hugging
    # Face post-processor's convention, which its 0.35 threshold goes with; "mean", GLIP's (the paper's detector) and
    # Grounding DINO's grounding evaluation, which configs/grit-paper.yaml uses with the paper's 0.65.
    phrase_score: Literal["mean", "max"] = "max"
    # Our choice for Grounding DINO with max scores; the paper's 0.65 was GLIP's, with mean scores.
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
    # Test-only fault injection: an actor raises SystemExit after this many batches (0 = never).
    fault_after_batches: int = 0
    # Padded sides are multiples of this (the backbone's stride is 32): images of one padded shape share a forward.
    pad_multiple: int = 32
    # GroundingDinoDetector.stream holds at most this many images in its per-shape queues to fill whole batches.
    queue_window: int = 1024
    # Threshold, clip, sort and NMS overlaps on the device, one copy of the small results per forward group
    # (false: the host functions on the full outputs; the same boxes, used as the reference).
    device_postprocess: bool = True
    # Sets TRANSFORMERS_DISABLE_TORCH_CHECK=1 (unless already set): removes 12 host syncs per forward pass from
    # transformers' shape checks, which only check inputs the detector builds itself.
    disable_torch_checks: bool = True
    # torch.compile the model per (padded shape, text length, batch), at most max_compiled_graphs graphs (then
    # eager); "auto" compiles on CUDA only. The cache of compiled code persists in compile_cache_dir ("" = torch's).
    # Off by default: each graph costs a compile at start-up, worth it only for long runs (docs/grounding.md).
    compile: Literal["auto", "on", "off"] = "off"
    max_compiled_graphs: int = 16
    compile_cache_dir: str = ""
    # CUDA graphs for compiled forwards (torch.compile mode "reduce-overhead"); CUDA only.
    cuda_graphs: bool = False
    # Multi-scale deformable attention: "auto" = the fused Triton kernel on CUDA where triton imports, else
    # transformers' PyTorch path.
    msda_kernel: Literal["auto", "triton", "pytorch"] = "auto"


@dataclass
class ReferencesConfig:
    """Where an image path or URL in a table (parquet, JSONL) may point (GRIT_SPEC 3.0).

    By default only a relative path under the table's own folder is read: no ``..``, no absolute path, no symlink
    out of the folder, no URL or other fsspec protocol. Anything else is dropped as ``reference_not_allowed``,
    whether or not it exists.
    """

    # Extra places references may point to: absolute local folders (``/data/images``) or URL prefixes
    # (``https://cdn.example.com/img/``, ``s3://bucket/images/``).
    allow_roots: list[str] = field(default_factory=list)
    # URL schemes allowed anywhere (``https``, ``s3``...): wider than allow_roots; empty = none.
    allow_schemes: list[str] = field(default_factory=list)
    # Every remote read: seconds to connect, seconds without data before giving up (image_fetch_failed).
    # The byte bound of a remote read is image.max_bytes.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0


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
    # Bound on every text cell or member (caption, url, id, key, annotations, .txt/.json members, sidecars),
    # checked before it is turned into text: a caption over it is caption_too_long, anything else cell_too_large.
    max_text_bytes: int = 1024 * 1024
    references: ReferencesConfig = field(default_factory=ReferencesConfig)


# Defaults of the workers' writing (fragments and shard assembly), the sink after the last stage.
WRITE_RESOURCES = StageResources(actors=2, num_cpus=0.25, num_gpus=0, batch_size=64)


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
    # Stored images (GRIT_SPEC 2, grit_pipeline/image_output.py): "jpg", one extension per corpus as the usual
    # WebDataset readers expect (JPEG bytes as they came, other formats re-encoded to JPEG, counted); "original",
    # each input's own bytes and format (jpg, png or webp).
    image_format: Literal["jpg", "original"] = "jpg"
    # The output's lease (docs/cluster.md): another build may take it over after this many seconds without a
    # heartbeat from its holder. Hosts sharing an output must agree on the time to well within this.
    lock_ttl_s: float = 60.0
    # The workers' writing: fragment tasks (at most ``actors`` at once, ``batch_size`` rows per fragment batch,
    # ``num_cpus`` each) and shard assembly tasks (``num_cpus`` each). Fields left unset keep WRITE_RESOURCES.
    resources: StageResources = field(default_factory=StageResources)
    # Ray custom resources every writing task asks for, e.g. {"writer_node": 0.01} to write from chosen nodes only.
    ray_resources: dict[str, float] = field(default_factory=dict)
    # Seconds a stopped build (SIGTERM, SIGINT) waits for shards being assembled before abandoning them.
    drain_timeout_s: float = 30.0

    def write_resources(self) -> StageResources:
        """The writing tasks' resources: what is set in ``resources``, the rest from ``WRITE_RESOURCES``."""
        return self.resources.over(WRITE_RESOURCES)


@dataclass
class RayConfig:
    address: str = ""  # empty: RAY_ADDRESS if set, else an embedded local Ray
    num_cpus: int = 0  # local Ray only; 0 = all cores
    num_gpus: int = -1  # local Ray only; -1 = detect
    object_store_memory: int = 0  # local Ray only; 0 = Ray's default
    # Per stage (read, text, decode, grounding): pool size, CPUs/GPUs per worker, rows per call. Only the fields
    # set here differ from the stage's declared defaults (docs/cluster.md lists them).
    stages: dict[str, StageResources] = field(default_factory=dict)
    # A plan that needs more CPUs/GPUs than the cluster has: 0 = refuse at once; N = wait up to N seconds for the
    # cluster to grow (an autoscaler adding nodes); -1 = wait for ever.
    wait_for_resources_s: float = 0.0
    # Longest wait for one stage's actors to be placed and set up (model loading included) once the job runs,
    # e.g. on a cluster busy with other jobs; -1 = no limit.
    actor_start_timeout_s: float = 600.0


@dataclass
class GritConfig:
    # Keys of earlier releases, still accepted: each moves to its new place before the config is built.
    ALIASES: typing.ClassVar[dict[str, str]] = {
        "input.resources": "ray.stages.read",
        "text.resources": "ray.stages.text",
        "image.resources": "ray.stages.decode",
        "detector.resources": "ray.stages.grounding",
    }

    input: InputConfig = field(default_factory=InputConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0
