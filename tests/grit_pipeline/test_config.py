"""Typed configs: YAML into dataclasses, dotted overrides, unknown keys and bad types rejected by name."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import yaml

from grit_pipeline.config import ConfigError, GritConfig, dump_config, load_config


def test_defaults_match_the_spec():
    cfg = load_config(GritConfig)
    assert cfg.text.spacy_model == "en_core_web_sm"
    assert cfg.detector.model == "IDEA-Research/grounding-dino-tiny"
    assert cfg.detector.box_threshold == 0.35
    assert cfg.detector.nms_iou == 0.5
    assert cfg.detector.max_boxes_per_phrase == 4
    assert cfg.image.max_pixels == 89_478_485
    assert cfg.image.min_side == 32
    assert cfg.text.max_caption_chars == 1000


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("detector:\n  box_threshold: 0.5\n  device: cpu\ntext:\n  drop_pronouns: false\n")
    cfg = load_config(
        GritConfig,
        path,
        ["detector.box_threshold=0.65", "output.samples_per_shard=10", "text.abstract_nouns=[time, love]"],
    )
    assert cfg.detector.box_threshold == 0.65
    assert cfg.detector.device == "cpu"
    assert cfg.text.drop_pronouns is False
    assert cfg.output.samples_per_shard == 10
    assert cfg.text.abstract_nouns == ["time", "love"]
    assert isinstance(cfg.detector.nms_iou, float)


def test_exponent_without_a_dot_is_a_number():
    cfg = load_config(GritConfig, overrides=["detector.box_threshold=4e-1", "detector.min_box_side=1E-2"])
    assert cfg.detector.box_threshold == 0.4 and cfg.detector.min_box_side == 0.01


def test_int_is_accepted_for_float():
    cfg = load_config(GritConfig, overrides=["detector.box_threshold=1"])
    assert cfg.detector.box_threshold == 1.0 and isinstance(cfg.detector.box_threshold, float)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "detector.box_treshold=0.3",
            r"unknown key 'detector.box_treshold' \(known keys in detector: .*box_threshold",
        ),
        ("nope=1", "unknown key 'nope'"),
        ("detector.batch_size=big", "'detector.batch_size' must be an integer"),
        ("text.drop_pronouns=3", "must be true or false"),
        ("detector.box_threshold.x=1", "'detector.box_threshold' must be a number"),
        ("novalue", "must look like key.sub=value"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GritConfig, overrides=[override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("text:\n  spacy_modle: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'text.spacy_modle'"):
        load_config(GritConfig, path)


def test_dump_round_trips(tmp_path):
    cfg = load_config(GritConfig, overrides=["detector.dtype=bf16", "ray.address=auto"])
    path = tmp_path / "resolved.yaml"
    dump_config(cfg, path)
    assert yaml.safe_load(path.read_text())["detector"]["dtype"] == "bf16"
    assert load_config(GritConfig, path) == cfg


@dataclasses.dataclass
class _LiteralSection:
    mode: Literal["mean", "max"] = "max"


@dataclasses.dataclass
class _LiteralTop:
    part: _LiteralSection = dataclasses.field(default_factory=_LiteralSection)


def test_literal_fields_are_checked_by_the_loader():
    assert load_config(_LiteralTop, None, ["part.mode=mean"]).part.mode == "mean"
    with pytest.raises(ConfigError, match="part.mode' must be one of mean, max"):
        load_config(_LiteralTop, None, ["part.mode=median"])


def test_stage_resources_override_field_by_field_over_the_declared_defaults():
    from grit_pipeline.stages import CaptionStage, GroundingStage, ReadStage

    cfg = load_config(GritConfig, None, ["ray.stages.grounding.batch_size=4", "ray.stages.read.actors=8"])
    grounding = GroundingStage.resources_for(cfg)
    assert (grounding.batch_size, grounding.num_gpus, grounding.actors) == (4, -1, 1)  # the rest stays
    assert ReadStage.resources_for(cfg).num_cpus == 0.5 and ReadStage.resources_for(cfg).actors == 8
    assert CaptionStage.resources_for(cfg) == CaptionStage.resources
    with pytest.raises(ConfigError, match="unknown key 'ray.stages.text.actorz'"):
        load_config(GritConfig, None, ["ray.stages.text.actorz=2"])
    with pytest.raises(ConfigError, match="'ray.stages.text.actors' must be an integer"):
        load_config(GritConfig, None, ["ray.stages.text.actors=many"])


@pytest.mark.parametrize(
    ("old", "stage"),
    [("input", "read"), ("text", "text"), ("image", "decode"), ("detector", "grounding")],
)
def test_old_resources_keys_are_aliases(tmp_path, old, stage):
    from grit_pipeline.stages import STAGES

    (cls,) = [s for s in STAGES if s.name == stage]
    by_override = load_config(GritConfig, None, [f"{old}.resources.actors=3", f"{old}.resources.batch_size=5"])
    path = tmp_path / "old.yaml"
    path.write_text(f"{old}:\n  resources: {{actors: 3, batch_size: 5}}\n")
    by_file = load_config(GritConfig, path)
    for cfg in (by_override, by_file):
        res = cls.resources_for(cfg)
        assert (res.actors, res.batch_size, res.num_cpus) == (3, 5, cls.resources.num_cpus)
        assert cfg.ray.stages[stage].actors == 3
    # The new spelling wins over the old one in a file; a later override wins over both.
    path.write_text(f"{old}:\n  resources: {{actors: 3}}\nray:\n  stages:\n    {stage}: {{actors: 7}}\n")
    assert cls.resources_for(load_config(GritConfig, path)).actors == 7
    assert cls.resources_for(load_config(GritConfig, path, [f"{old}.resources.actors=2"])).actors == 2
    # The saved config holds the new spelling only, and loads back to the same settings.
    saved = tmp_path / "saved.yaml"
    dump_config(by_file, saved)
    assert "resources" not in yaml.safe_load(saved.read_text())[old]
    assert load_config(GritConfig, saved) == by_file
