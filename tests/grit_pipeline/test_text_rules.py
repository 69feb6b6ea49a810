"""Text-stage rules on hand-built parses: words, heads, deps and POS are given, so no model's parse is involved."""

from __future__ import annotations

import pytest
import spacy
from spacy.tokens import Doc

from grit_core.record import containment_filter
from grit_pipeline.config import DEFAULT_ABSTRACT_NOUNS, TextConfig
from grit_pipeline.text import (
    analyse_doc,
    check_caption,
    chunk_filter_reason,
    describe,
    expand_to_referring_expression,
    normalize_caption,
)

VOCAB = spacy.blank("en").vocab
ABSTRACT = frozenset(DEFAULT_ABSTRACT_NOUNS)


def make_doc(spec: str) -> Doc:
    """Build a Doc from lines ``word head dep pos lemma`` (head is a token index)."""
    rows = [line.split() for line in spec.strip().splitlines()]
    words = [r[0] for r in rows]
    return Doc(
        VOCAB,
        words=words,
        heads=[int(r[1]) for r in rows],
        deps=[r[2] for r in rows],
        pos=[r[3] for r in rows],
        lemmas=[r[4] for r in rows],
        spaces=[not (i + 1 < len(rows) and rows[i + 1][3] == "PUNCT") for i in range(len(rows))],
    )


DOG_IN_FIELD = """
a 1 det DET a
dog 1 ROOT NOUN dog
in 1 prep ADP in
a 4 det DET a
field 2 pobj NOUN field
of 4 prep ADP of
flowers 5 pobj NOUN flower
"""


def spans(doc: Doc, result) -> list[tuple[str, str]]:
    return [(doc.text[c.start : c.end], doc.text[c.expr_start : c.expr_end]) for c in result.chunks]


def test_paper_example_dog_in_a_field_of_flowers():
    doc = make_doc(DOG_IN_FIELD)
    result = analyse_doc(doc, ABSTRACT, drop_pronouns=True)
    assert spans(doc, result) == [
        ("a dog", "a dog in a field of flowers"),
        ("a field", "a field of flowers"),
        ("flowers", "flowers"),
    ]
    view = describe(result)
    assert [r["text"] for r in view["retained"]] == ["a dog in a field of flowers"]


def test_root_with_conjunct_is_not_expanded():
    doc = make_doc(
        """
a 1 det DET a
cat 1 ROOT NOUN cat
and 1 cc CCONJ and
a 4 det DET a
dog 1 conj NOUN dog
on 4 prep ADP on
a 7 det DET a
sofa 5 pobj NOUN sofa
"""
    )
    result = analyse_doc(doc, ABSTRACT, drop_pronouns=True)
    got = spans(doc, result)
    # "a cat" has the conjunct "dog": it stays itself even though its subtree spans the whole caption.
    assert got[0] == ("a cat", "a cat")
    assert got[1] == ("a dog", "a dog on a sofa")
    assert got[2] == ("a sofa", "a sofa")


def test_dangling_conjunction_and_punctuation_are_trimmed():
    # "flowers , and" : the subtree of "flowers" ends with punctuation and a cc the parser attached to it.
    doc = make_doc(
        """
red 1 amod ADJ red
flowers 1 ROOT NOUN flower
, 1 punct PUNCT ,
and 1 cc CCONJ and
"""
    )
    chunk = next(iter(doc.noun_chunks))
    assert doc.text[slice(*expand_to_referring_expression(chunk))] == "red flowers"


def test_trimming_never_cuts_into_the_chunk():
    doc = make_doc(
        """
" 2 punct PUNCT "
a 2 det DET a
lamp 2 ROOT NOUN lamp
"""
    )
    chunk = next(iter(doc.noun_chunks))
    # spaCy's English chunker starts the chunk at the root's left edge, so the quote is part of the chunk and
    # trimming must leave it there: the expression always contains its chunk.
    assert chunk.text == '" a lamp'
    start, end = expand_to_referring_expression(chunk)
    assert (start, end) == (chunk.start_char, chunk.end_char)


def test_abstract_noun_and_pronoun_filters():
    doc = make_doc(
        """
Happiness 1 nsubj NOUN happiness
is 1 ROOT AUX be
it 1 attr PRON it
"""
    )
    chunks = list(doc.noun_chunks)
    assert chunk_filter_reason(chunks[0], ABSTRACT, drop_pronouns=True) == "abstract_noun"
    assert chunk_filter_reason(chunks[1], ABSTRACT, drop_pronouns=True) == "pronoun"
    assert chunk_filter_reason(chunks[1], ABSTRACT, drop_pronouns=False) is None
    result = analyse_doc(doc, ABSTRACT, drop_pronouns=True)
    assert result.chunks == []
    assert [d.reason for d in result.dropped_chunks] == ["abstract_noun", "pronoun"]
    assert result.drop_reason == "no_noun_chunks"


def test_abstract_nouns_compare_lemmas_case_insensitively():
    doc = make_doc(
        """
Times 0 ROOT NOUN Time
"""
    )
    assert chunk_filter_reason(next(iter(doc.noun_chunks)), ABSTRACT, drop_pronouns=True) == "abstract_noun"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  a\tdog\n\non  grass ", "a dog on grass"),
        ("cafe\u0301", "caf\u00e9"),  # NFC
        ("zero\u200bwidth", "zerowidth"),  # Cf removed
        ("bell\x07 ring", "bell ring"),  # Cc removed
        ("line\u2028sep\u00a0nbsp", "line sep nbsp"),  # every white space is a space
        ("\u202eevil", "evil"),  # bidi override is Cf
    ],
)
def test_normalize_caption(raw, expected):
    assert normalize_caption(raw) == expected


def test_check_caption_reasons():
    assert check_caption(None, 100) == ("", "missing_caption")
    assert check_caption(" \t\u200b ", 100)[1] == "empty_caption"
    assert check_caption("x" * 101, 100)[1] == "caption_too_long"
    assert check_caption("x" * 100, 100) == ("x" * 100, None)


def test_containment_filter_on_expression_entries():
    box = [0.1, 0.1, 0.5, 0.5, 0.9]
    entries = [[0, 27, *box], [9, 27, *box], [20, 27, *box], [0, 27, 0.2, 0.2, 0.6, 0.6, 0.8]]
    kept = containment_filter(entries)
    assert [e[:2] for e in kept] == [[0, 27], [0, 27]]


def test_default_config_lists_the_authors_abstract_nouns():
    assert TextConfig().abstract_nouns[:3] == ["time", "life", "love"]
    assert "pursuit" in TextConfig().abstract_nouns


def test_dependency_symbol_ids_match_spacy():
    from spacy import symbols

    from grit_pipeline import text

    assert (symbols.cc, symbols.conj) == (text._DEP_CC, text._DEP_CONJ)
