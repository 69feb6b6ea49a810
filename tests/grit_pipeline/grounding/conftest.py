"""Fixtures of the grounding tests: one tiny Grounding DINO folder per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_grounding_dino_path(tmp_path_factory) -> Path:
    """A saved tiny Grounding DINO (random weights, seed 0, 32-token text limit), loadable by ``from_pretrained``."""
    from grit_pipeline.grounding.tiny import save_tiny_grounding_dino

    return save_tiny_grounding_dino(tmp_path_factory.mktemp("tiny-grounding-dino") / "model")
