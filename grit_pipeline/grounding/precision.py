"""Device and precision choices for Grounding DINO, and checks of the installed transformers release.

Half precision runs as autocast (``torch.autocast``), which keeps the numerically delicate ops (layer norms,
softmax, the promoted ``grid_sample`` of deformable attention) in fp32. The weights themselves are cast to bf16
only where that is known to work:

- transformers releases before PR #48438 built ``valid_ratios`` and the deformable-attention grids in fp32 whatever
  the weights' dtype, so half weights crash (``grid_sample`` dtype mismatch); with fp32 weights under autocast the
  same releases run fine. :func:`release_has_half_fix` reads the installed source for the fix.
- on CPU, PyTorch's bf16 ``grid_sample`` returns NaN for the non-contiguous inputs the deformable attention passes
  it (checked with torch 2.13), so CPU always keeps fp32 weights.
- fp16 weights overflow more easily than bf16 ones; fp16 runs with fp32 weights under autocast.

Even where half weights are allowed, the detector checks them with one probe forward pass at set-up and falls back
to fp32 weights under autocast when it fails or returns non-finite values.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"detector.device={name!r} but CUDA is not available here (use 'cpu' or 'auto')")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"detector.device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return device


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype for ``detector.dtype`` (None for fp32)."""
    if name not in DTYPES:
        raise ValueError(f"detector.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def release_has_half_fix(model_class: type | None = None) -> bool:
    """Whether the installed release builds Grounding DINO's valid ratios at the model's dtype (PR #48438).

    The fix gave ``get_valid_ratio`` of the base model class (``GroundingDinoModel`` unless ``model_class`` names
    another, such as ``MMGroundingDinoModel``) a ``dtype`` parameter and passes the features' dtype to it; both are
    read from the installed source rather than guessed from the version number.
    """
    try:
        if model_class is None:
            from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoModel as model_class
        if "dtype" not in inspect.signature(model_class.get_valid_ratio).parameters:
            return False
        return "dtype=source_flatten.dtype" in inspect.getsource(model_class.forward)
    except (ImportError, AttributeError, OSError, TypeError):
        return False


def half_weights_wanted(device: torch.device, dtype: torch.dtype | None, model_class: type | None = None) -> bool:
    """Cast the weights to ``dtype`` (rather than fp32 weights under autocast) only for bf16 on CUDA with a fixed
    release; see the module docstring for why each other case keeps fp32 weights."""
    return dtype is torch.bfloat16 and device.type == "cuda" and release_has_half_fix(model_class)


def text_position_embeddings_are_integer(model: torch.nn.Module) -> bool:
    """True on releases (5.17 among them) that compute the text position embeddings of the encoder in int64:
    the sinusoid is truncated to 0 and 1, so boxes differ from the reference implementation's. Later releases
    compute them in the features' dtype. Checked on the loaded model's first encoder layer."""
    try:
        layer = model.model.encoder.layers[0]
        d_model = model.config.d_model
        feats = torch.zeros(1, 2, d_model)
        emb = layer.get_text_position_embeddings(feats, None, torch.tensor([[0, 1]]))
        return not emb.is_floating_point()
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return False
