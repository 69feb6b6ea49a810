"""The shipped configs load, and configs/default.yaml says exactly what the dataclasses default to."""

from __future__ import annotations

from pathlib import Path

import pytest

from grit_pipeline.config import GritConfig, config_to_dict, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_default_yaml_is_the_defaults():
    assert config_to_dict(load_config(GritConfig, CONFIGS / "default.yaml")) == config_to_dict(GritConfig())


@pytest.mark.parametrize("name", ["demo.yaml", "grit-paper.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(GritConfig, CONFIGS / name)
    if name == "grit-paper.yaml":
        assert cfg.detector.box_threshold == 0.65 and cfg.text.spacy_model == "en_core_web_trf"
    else:
        assert cfg.input.paths == ["examples"] and cfg.detector.model == "IDEA-Research/grounding-dino-tiny"
