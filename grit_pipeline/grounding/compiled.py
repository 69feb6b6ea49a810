"""``torch.compile`` for the detector's forward pass: one graph per (batch, padded shape, text length), bounded.

With transformers' shape checks off (``TRANSFORMERS_DISABLE_TORCH_CHECK=1``) Dynamo takes Grounding DINO as one
graph without breaks. Shapes are static (``dynamic=False``): each key compiles once, and past
``max_graphs`` keys a forward runs eager rather than compiling again, so a stream of web images with ~50 padded
shapes never spends its time compiling. Inductor's compiled code is cached on disk (``cache_dir``, else torch's
default), so a second worker or run on the same machine loads rather than recompiles. With ``cuda_graphs`` the
compiled forward is replayed as a CUDA graph (mode ``reduce-overhead``), which removes the ~2,100 kernel launches
per forward that bound the decoder.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)


class CompiledForward:
    """Calls ``model(**inputs)`` through ``torch.compile`` for the first ``max_graphs`` keys, eager after."""

    def __init__(self, model: Any, max_graphs: int, cache_dir: str = "", cuda_graphs: bool = False, backend=None):
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
        import torch._dynamo

        # Each key is one recompilation of the same code object: let Dynamo keep all of them.
        limit = max_graphs + 2
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
        self.model = model
        self.max_graphs = max_graphs
        self.cuda_graphs = cuda_graphs
        mode = "reduce-overhead" if cuda_graphs else None
        kwargs = {"backend": backend} if backend is not None else {"mode": mode}
        self._compiled = torch.compile(model, dynamic=False, **kwargs)
        self.keys: set[tuple] = set()
        self.eager_calls = 0

    def __call__(self, key: tuple, **inputs: Any) -> Any:
        if key not in self.keys and len(self.keys) >= self.max_graphs:
            self.eager_calls += 1
            return self.model(**inputs)
        if key not in self.keys:
            log.info(
                "compiling the detector's forward for %s (%d of at most %d)", key, len(self.keys) + 1, self.max_graphs
            )
            self.keys.add(key)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(**inputs)


def text_bucket(longest: int, limit: int) -> int:
    """Text length of a compiled forward: the next power of two >= 16 (fewer graphs than multiples of 8)."""
    return min(limit, max(16, 1 << (max(1, longest) - 1).bit_length()))
