"""The model: architecture and nothing about training runs. Data flow inside the package:

``config.py`` (the architecture as dataclasses) -> ``model.py`` (the network, ~450 lines) -> ``generation.py``
(KV cache and decoding) ; ``registry.py`` (named sizes), ``checkpoint.py`` (safetensors + config.json),
``hf.py`` (Hugging Face Kosmos-2 and CLIP weights), ``init.py`` (from-scratch initialisation recipes) and
``parallelize.py`` (freezing, activation checkpointing, compile, DDP/FSDP) act on a built model from outside.

Imports torch and safetensors only (no Ray, spaCy, WebDataset or the GRIT pipeline).
"""

from kosmos.model.checkpoint import load_model, save_model
from kosmos.model.config import KosmosConfig, TextConfig, VisionConfig
from kosmos.model.model import KosmosModel, KosmosOutput
from kosmos.model.registry import create_model, list_models, model_config

__all__ = [
    "KosmosConfig",
    "KosmosModel",
    "KosmosOutput",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "list_models",
    "load_model",
    "model_config",
    "save_model",
]
