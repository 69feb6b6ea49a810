"""The StartGate: on the embedded local Ray the stages' actors report what they loaded, and the output is opened only
once every model is in; a loader's error refuses, the driver's abandon gives up, and neither writes a byte."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from grit_pipeline.config import GritConfig, load_config
from grit_pipeline.manifest import read_manifest
from grit_pipeline.outcome import BuildRefused
from grit_pipeline.output_store import OutputStore
from grit_pipeline.plan import StartAbandoned, StartGate
from grit_pipeline.writer import run_dir

SPACY = {"spacy_model": {"name": "en_core_web_sm", "pipeline": "en_core_web_sm", "version": "3.8.0"}}
DETECTOR = {"detector": {"kind": "grounding_dino", "model": "/models/gdino", "random_weights": False, "notes": []}}
RUN = "0" * 32


def _open(gate: StartGate, store: OutputStore, cfg: GritConfig):
    return gate.open(store, cfg, ["/in/00000.tar"], None, RUN, {"HF_HUB_OFFLINE": "1"})


def _run(store: OutputStore, cfg: GritConfig, first, then) -> dict:
    """Open through a new gate: ``first(gate)`` before the opening is seen waiting, ``then(gate)`` after."""

    async def scenario():
        gate = StartGate(("spacy_model", "detector"))
        task = asyncio.ensure_future(_open(gate, store, cfg))
        first(gate)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done(), "the opening must wait for every model"
        assert not Path(store.url).exists()  # nothing written while a model is unreported
        then(gate)
        return await task

    return asyncio.run(scenario())


@pytest.fixture
def setting(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(GritConfig, None, [f"output.path={out}"])
    return cfg, OutputStore(str(out)), out


def test_the_output_opens_once_every_model_is_reported_and_first_reports_count(setting):
    cfg, store, out = setting

    def then(gate):
        gate.report(DETECTOR)
        gate.report({"detector": {**DETECTOR["detector"], "model": "a restarted actor's"}})
        gate.report({}, "OSError: a later error, after every model was in")

    result = _run(store, cfg, lambda gate: gate.report(SPACY), then)
    assert result["info"] == {**SPACY, **DETECTOR, "env": {"HF_HUB_OFFLINE": "1"}}
    manifest = read_manifest(store)
    assert manifest["status"] == "running" and manifest["detector"]["model"] == "/models/gdino"
    assert (out / run_dir(RUN)).is_dir()


def test_a_loaders_error_refuses_with_its_message_and_writes_nothing(setting):
    cfg, store, out = setting

    def then(gate):
        gate.report({}, "cannot load detector weights from '/models/gdino'")
        gate.report(DETECTOR)  # another actor of the pool loaded it: the refusal stands

    with pytest.raises(BuildRefused, match="cannot load detector weights from '/models/gdino'"):
        _run(store, cfg, lambda gate: gate.report(SPACY), then)
    assert not out.exists()


def test_abandoned_before_every_model_is_in_gives_up_and_writes_nothing(setting):
    cfg, store, out = setting
    with pytest.raises(StartAbandoned):
        _run(store, cfg, lambda gate: gate.report(DETECTOR), lambda gate: gate.abandon())
    assert not out.exists()
