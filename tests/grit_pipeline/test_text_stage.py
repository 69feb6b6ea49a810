"""The text stage on the real en_core_web_sm parse, the `grit phrases` command, and a property test over captions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grit_pipeline.config import GritConfig, TextConfig
from grit_pipeline.stages import CaptionStage, to_table
from grit_pipeline.stages.ray_adapter import StageRunner
from grit_pipeline.text import SpacyModelMissing, TextStage, load_spacy, needs_torch


@pytest.fixture(scope="module")
def stage(spacy_model_name):
    return TextStage(TextConfig(spacy_model=spacy_model_name)).setup()


def test_real_parse_of_the_paper_example(stage):
    (result,) = stage(["a dog in a field of flowers"])
    caption = result.caption
    assert [c.text for c in result.chunks] == ["a dog", "a field", "flowers"]
    assert caption[result.chunks[0].expr_start : result.chunks[0].expr_end] == "a dog in a field of flowers"


def test_real_parse_conjunct_and_filters(stage):
    results = stage(["a cat and a dog on a sofa", "Happiness is a warm puppy", "she holds it in her hands"])
    cat = results[0].chunks[0]
    assert (cat.text, results[0].caption[cat.expr_start : cat.expr_end]) == ("a cat", "a cat")
    dog = results[0].chunks[1]
    assert (dog.text, results[0].caption[dog.expr_start : dog.expr_end]) == ("a dog", "a dog")
    assert [(d.text, d.reason) for d in results[1].dropped_chunks] == [("Happiness", "abstract_noun")]
    assert [c.text for c in results[1].chunks] == ["a warm puppy"]
    assert [d.reason for d in results[2].dropped_chunks] == ["pronoun", "pronoun"]
    assert [c.text for c in results[2].chunks] == ["her hands"]


def expressions(result) -> list[tuple[str, str]]:
    return [(c.text, result.caption[c.expr_start : c.expr_end]) for c in result.chunks]


def test_real_parse_of_each_text_rule(stage):
    couch, kit, hope, starry = stage(
        [
            "A cat and a dog sleeping on a couch",
            "LEGO Creator Expert Building Kit (1,351 Pieces)",
            "Bob Hope at the show, full of hope",
            "&quot;The Starry Night&quot; by Van Gogh",
        ]
    )
    # Conjuncts in either direction: neither "A cat" nor "a dog" is expanded.
    assert expressions(couch) == [("A cat", "A cat"), ("a dog", "a dog"), ("a couch", "a couch")]
    # The subtree's ")" pairs with its "(": kept.
    assert expressions(kit)[0] == (
        "LEGO Creator Expert Building Kit",
        "LEGO Creator Expert Building Kit (1,351 Pieces)",
    )
    # "Bob Hope" (PROPN root) is kept; the common noun "hope" is filtered.
    assert [c.text for c in hope.chunks] == ["Bob Hope", "the show"]
    assert [(d.text, d.reason) for d in hope.dropped_chunks] == [("hope", "abstract_noun")]
    # Entities decoded before parsing.
    assert starry.caption == '"The Starry Night" by Van Gogh'
    assert expressions(starry)[0] == ('"The Starry Night', '"The Starry Night" by Van Gogh')


def test_stage_drop_reasons(stage):
    results = stage([None, "   ", "x" * 5000, "it", "two red apples on a plate"])
    assert [r.drop_reason for r in results] == [
        "missing_caption",
        "empty_caption",
        "caption_too_long",
        "no_noun_chunks",
        None,
    ]
    assert [d.reason for d in results[3].dropped_chunks] == ["pronoun"]
    assert len(results[4].chunks) == 2


def test_pipeline_text_stage_counts_once_per_row(spacy_model_name):
    """The text stage through the stage adapter: drops by reason, chunk counters in each row, counted once."""
    captions = [None, "   ", "x" * 5000, "it", "two red apples on a plate"]
    rows = [
        {"kind": "sample", "file_index": 0, "position": i, "key": f"k{i}", "status": "pending", "raw_caption": c}
        for i, c in enumerate(captions)
    ]
    rows.append({"kind": "eof", "file_index": 0, "position": len(captions), "status": "eof", "key": ""})
    cfg = GritConfig(text=TextConfig(spacy_model=spacy_model_name))
    runner = StageRunner(CaptionStage, cfg, keep_image_for=("no_noun_chunks",))
    out = runner(to_table(rows)).to_pylist()
    assert [r["drop_reason"] for r in out[:5]] == [
        "missing_caption",
        "empty_caption",
        "caption_too_long",
        "no_noun_chunks",
        None,
    ]
    assert [r["status"] for r in out] == ["dropped"] * 4 + ["pending", "eof"]
    counts = [json.loads(r["counters_json"] or "{}") for r in out]
    assert counts[:3] == [{}, {}, {}]
    assert counts[3] == {"chunks_found": 1, "chunks_filtered_pronoun": 1}
    assert counts[4] == {"chunks_found": 2, "chunks_kept": 2}
    assert all(r["t_text"] > 0 for r in out[:5]) and out[5]["t_text"] is None


def test_offsets_index_the_normalised_caption(stage):
    (result,) = stage(["  A\tbrown   dog\u200b on\nthe beach  "])
    assert result.caption == "A brown dog on the beach"
    for c in result.chunks:
        assert result.caption[c.start : c.end] == c.text


def test_missing_model_names_the_install_command():
    with pytest.raises(SpacyModelMissing, match=r"python -m spacy download en_core_web_xx_missing"):
        load_spacy("en_core_web_xx_missing")


# Parses the whole analysis the rules read (tokens, tags, lemmas, dependencies, noun chunks) in a fresh process,
# with torch imported first or not at all, and says whether torch was imported.
_PARSE = """
import json, sys
if sys.argv[2] == "torch-first":
    import torch
from grit_pipeline.text import load_spacy
nlp = load_spacy(sys.argv[1])
captions = ["A man riding a brown horse on the beach at sunset", "two dogs and a cat near an old red car",
            "Close-up of a woman's hand holding a cup of coffee"]
docs = [[(t.text, t.tag_, t.pos_, t.lemma_, t.dep_, t.head.i) for t in d] + [c.text for c in d.noun_chunks]
        for d in nlp.pipe(captions)]
print(json.dumps({"torch": sys.modules.get("torch") is not None, "docs": docs}))
"""


def _parse_in_a_new_process(model: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PARSE, model, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_pipeline_without_torch_components_loads_without_torch_and_parses_the_same(spacy_model_name):
    assert not needs_torch(spacy_model_name)
    alone = _parse_in_a_new_process(spacy_model_name, "alone")
    with_torch = _parse_in_a_new_process(spacy_model_name, "torch-first")
    assert alone["torch"] is False and with_torch["torch"] is True
    assert alone["docs"] == with_torch["docs"]


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"pipeline": ["tok2vec", "tagger", "parser"], "requirements": ["spacy>=3.7.5,<3.9.0"]}, False),
        ({"pipeline": ["tok2vec", "parser"], "requirements": ["spacy-lookups-data>=1.0.3", "spacy>=3.7"]}, False),
        ({"pipeline": ["transformer", "tagger", "parser"], "requirements": ["spacy>=3.7"]}, True),
        ({"pipeline": ["parser"], "components": ["curated_transformer"]}, True),
        ({"pipeline": ["tok2vec", "parser"], "requirements": ["spacy-transformers>=1.3.4,<1.4.0"]}, True),
        ({"pipeline": ["llm"], "requirements": ["spacy-llm>=0.7"]}, True),
        ({"pipeline": ["parser"], "requirements": [7]}, True),
        (None, True),  # no meta.json: torch, to be safe
        ("{not json", True),
    ],
)
def test_needs_torch_reads_the_pipeline_meta(tmp_path, meta, expected):
    if meta is not None:
        (tmp_path / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    assert needs_torch(str(tmp_path)) is expected


def test_unused_components_are_disabled(stage):
    assert "ner" not in stage.nlp.pipe_names
    assert {"parser", "lemmatizer"} <= set(stage.nlp.pipe_names)


def test_grit_phrases_command(spacy_model_name):
    out = subprocess.run(
        [sys.executable, "-m", "grit_pipeline", "phrases", "--model", spacy_model_name, "a dog in a field of flowers"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (line,) = out.strip().splitlines()
    view = json.loads(line)
    assert [c["text"] for c in view["noun_chunks"]] == ["a dog", "a field", "flowers"]
    assert view["ref_exps"][0] == {"start": 0, "end": 27, "text": "a dog in a field of flowers", "chunk": 0}
    assert [r["text"] for r in view["retained"]] == ["a dog in a field of flowers"]


def test_grit_phrases_follows_each_text_rule(spacy_model_name, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text(
        "A cat and a dog sleeping on a couch\n"
        "LEGO Creator Expert Building Kit (1,351 Pieces)\n"
        "Bob Hope at the show, full of hope\n"
        "&quot;The Starry Night&quot; by Van Gogh\n",
        encoding="utf-8",
    )
    out = subprocess.run(
        [sys.executable, "-m", "grit_pipeline", "phrases", "--model", spacy_model_name, "--file", str(captions)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    couch, kit, hope, starry = (json.loads(line) for line in out.strip().splitlines())
    assert [r["text"] for r in couch["ref_exps"]] == ["A cat", "a dog", "a couch"]
    assert kit["ref_exps"][0]["text"] == "LEGO Creator Expert Building Kit (1,351 Pieces)"
    assert [r["text"] for r in kit["retained"]] == ["LEGO Creator Expert Building Kit (1,351 Pieces)"]
    assert [c["text"] for c in hope["noun_chunks"]] == ["Bob Hope", "the show"]
    assert hope["dropped_chunks"] == [{"start": 30, "end": 34, "text": "hope", "reason": "abstract_noun"}]
    assert starry["caption"] == '"The Starry Night" by Van Gogh'
    assert starry["noun_chunks"][0] == {"start": 0, "end": 17, "text": '"The Starry Night'}
    assert starry["ref_exps"][0]["text"] == '"The Starry Night" by Van Gogh'


def test_grit_phrases_missing_model_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "grit_pipeline", "phrases", "--model", "no_such_model_xyz", "a dog"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "python -m spacy download no_such_model_xyz" in proc.stderr


captions = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(categories=("Cc", "Cf", "Zs", "Zl", "Zp")), max_size=50),
    st.lists(
        st.sampled_from(
            ["a dog", "<b>on</b>", "the", "\u05e9\u05dc\u05d5\u05dd", "\u202e", "\U0001f436", "&amp;", "\n", "CAR"]
        ),
        max_size=60,
    ).map(" ".join),
    st.integers(min_value=900, max_value=3000).map(lambda n: ("a big red bus " * n)[:n]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(captions, min_size=1, max_size=8))
def test_text_stage_never_raises_and_offsets_are_valid(stage, batch):
    results = stage(batch)
    assert len(results) == len(batch)
    for r in results:
        n = len(r.caption)
        assert n <= stage.cfg.max_caption_chars or r.drop_reason == "caption_too_long"
        for c in r.chunks:
            assert 0 <= c.expr_start <= c.start < c.end <= c.expr_end <= n
            assert r.caption[c.start : c.end] == c.text
        for d in r.dropped_chunks:
            assert 0 <= d.start < d.end <= n
        assert (r.drop_reason is None) == bool(r.chunks)
