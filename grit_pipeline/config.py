"""The GRIT pipeline's typed configuration: the ``GritConfig`` dataclass tree.

Loading (YAML file, then ``--set a.b=c`` overrides, unknown keys and bad types rejected) is the shared machinery of
:mod:`grit_core.config`, re-exported here: ``load_config(GritConfig, path, overrides)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
