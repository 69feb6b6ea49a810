"""The model's configuration: the architecture, and nothing about how a run trains it.

A saved ``config.json`` holds a :class:`KosmosConfig`, so it describes the weights beside it. Run switches (frozen
vision tower, activation checkpointing, the from-scratch initialisations) live in the train config
(``kosmos.train.config``) and are applied from outside the model (``kosmos.model.parallelize``,
``kosmos.model.init``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Run flags that checkpoints written by earlier versions carry in their config.json; they never changed the weights'
# shapes and are now train-config settings (model.freeze_vision, parallel.activation_checkpointing,
# model.connector_init, model.loc_embed_init). Reading an old config ignores them.
LEGACY_RUN_FIELDS = ("freeze_vision", "gradient_checkpointing", "connector_init", "loc_embed_init")


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    attention_dropout: float = 0.0


@dataclass
class TextConfig:
    vocab_size: int = 65037  # text pieces and special tokens (<grounding> = 64012), then 1,024 location tokens
    max_positions: int = 2048
    dim: int = 2048
    layers: int = 24
    heads: int = 32
    ffn_dim: int = 8192
    dropout: float = 0.1  # on embeddings, attention output and FFN output
    attention_dropout: float = 0.1  # on attention probabilities, also inside the connector
    activation_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    scale_embedding: bool = True  # token embeddings * sqrt(dim); image embeddings are inserted before the scale
    pad_token_id: int = 1  # also the position offset: the first real position index is pad_token_id + 1
    bos_token_id: int = 0
    eos_token_id: int = 2


@dataclass
class KosmosConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    latent_query_num: int = 64  # image embeddings per image (= image slots in the sequence)
    loc_token_start: int = 64013  # id of <patch_index_0000>; from-scratch vocabularies pass their own
    loc_bins: int = 32  # location bins per side: loc_bins**2 location tokens
    multiway_ffn: bool = False  # separate FFN weights for image positions (not in Kosmos-2 or HF)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        widths = (("vision", self.vision.width, self.vision.heads), ("text", self.text.dim, self.text.heads))
        for name, width, heads in widths:
            if width % heads:
                raise ValueError(f"{name} width {width} is not divisible by its {heads} heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")

    @property
    def num_image_tokens(self) -> int:
        """Vision tokens per image: CLS plus the patch grid."""
        return 1 + (self.vision.image_size // self.vision.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KosmosConfig:
        """The config of a ``to_dict`` payload; the run flags of older checkpoints (``LEGACY_RUN_FIELDS``) are
        dropped, any other unknown field raises ValueError."""
        data = {k: v for k, v in data.items() if k not in LEGACY_RUN_FIELDS}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown KosmosConfig fields: {sorted(unknown)}")
        return cls(**data)
