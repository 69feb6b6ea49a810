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
    paired_tokens,
)

VOCAB = spacy.blank("en").vocab
ABSTRACT = frozenset(DEFAULT_ABSTRACT_NOUNS)


def make_doc(spec: str, text: str | None = None) -> Doc:
    """Build a Doc from lines ``word head dep pos lemma`` (head is a token index).

    Without ``text``, a token is followed by a space unless the next one is punctuation; with it, the spaces are
    those of ``text`` (which must be the words with spaces between some of them).
    """
    rows = [line.split() for line in spec.strip().splitlines()]
    words = [r[0] for r in rows]
    if text is not None:
        spaces, at = [], 0
        for word in words:
            at = text.index(word, at) + len(word)
            spaces.append(text[at : at + 1] == " ")
        doc = Doc(
            VOCAB,
            words=words,
            spaces=spaces,
            heads=[int(r[1]) for r in rows],
            deps=[r[2] for r in rows],
            pos=[r[3] for r in rows],
            lemmas=[r[4] for r in rows],
        )
        assert doc.text == text
        return doc
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
    # Conjuncts in either direction: "a cat" has the conj child "dog", and "dog" is itself a conj. Neither is
    # expanded, though "a dog"'s subtree is "a dog on a sofa" ("we do not expand noun chunks with conjuncts").
    assert spans(doc, result) == [("a cat", "a cat"), ("a dog", "a dog"), ("a sofa", "a sofa")]
    dog = list(doc.noun_chunks)[1]
    assert [t.text for t in dog.root.conjuncts] == ["cat"]
    assert doc[dog.root.left_edge.i : dog.root.right_edge.i + 1].text == "a dog on a sofa"


def test_chunk_without_conjuncts_beside_a_coordination_is_expanded():
    # "the sofa" is inside the coordination's subtree but has no conjunct itself.
    doc = make_doc(
        """
a 1 det DET a
cat 1 ROOT NOUN cat
and 1 cc CCONJ and
a 4 det DET a
dog 1 conj NOUN dog
on 4 prep ADP on
the 7 det DET the
sofa 5 pobj NOUN sofa
of 7 prep ADP of
grandma 8 pobj NOUN grandma
"""
    )
    assert spans(doc, analyse_doc(doc, ABSTRACT, drop_pronouns=True))[2] == ("the sofa", "the sofa of grandma")


BUILDING_KIT = """
LEGO 4 compound PROPN LEGO
Creator 4 compound PROPN Creator
Expert 4 compound PROPN Expert
Building 4 compound PROPN Building
Kit 4 ROOT PROPN Kit
( 4 punct PUNCT (
1,351 7 nummod NUM 1,351
Pieces 4 appos NOUN piece
) 4 punct PUNCT )
"""


def test_trimming_keeps_a_bracket_paired_inside_the_span():
    doc = make_doc(BUILDING_KIT, "LEGO Creator Expert Building Kit (1,351 Pieces)")
    chunk = next(iter(doc.noun_chunks))
    assert chunk.text == "LEGO Creator Expert Building Kit"
    assert doc.text[slice(*expand_to_referring_expression(chunk))] == "LEGO Creator Expert Building Kit (1,351 Pieces)"


def test_trimming_removes_a_bracket_without_its_partner_in_the_span():
    # The parser hung ")" on "Kit" but the "(" is not in the subtree: the lone ")" is trimmed.
    doc = make_doc(
        """
a 1 det DET a
kit 1 ROOT NOUN kit
, 1 punct PUNCT ,
) 1 punct PUNCT )
"""
    )
    chunk = next(iter(doc.noun_chunks))
    assert doc.text[slice(*expand_to_referring_expression(chunk))] == "a kit"


QUOTED_TITLE = """
" 3 punct PUNCT "
The 3 det DET the
Starry 3 compound PROPN Starry
Night 3 ROOT PROPN Night
" 3 punct PUNCT "
"""
SIGN_WITH_STRAY_QUOTE = """
a 1 det DET a
sign 1 ROOT NOUN sign
saying 1 acl VERB say
" 4 punct PUNCT "
hi 2 dobj INTJ hi
" 4 punct PUNCT "
" 1 punct PUNCT "
"""
FILM_WITH_NESTED_BRACKETS = """
a 1 det DET a
film 1 ROOT NOUN film
( 1 punct PUNCT (
1999 1 appos NUM 1999
[ 1 punct PUNCT [
US 1 appos PROPN US
] 1 punct PUNCT ]
) 1 punct PUNCT )
, 1 punct PUNCT ,
"""


@pytest.mark.parametrize(
    "spec, text, expected",
    [
        # The closing quote pairs with the opening one, which is part of the chunk: kept.
        (QUOTED_TITLE, '"The Starry Night"', '"The Starry Night"'),
        # Straight quotes pair by parity (first with second): the third one, at the edge, is trimmed.
        (SIGN_WITH_STRAY_QUOTE, 'a sign saying "hi""', 'a sign saying "hi"'),
        # The outer brackets pair through the inner ones; the comma after them goes.
        (FILM_WITH_NESTED_BRACKETS, "a film (1999 [US]),", "a film (1999 [US])"),
    ],
)
def test_trimming_and_quote_pairing(spec, text, expected):
    doc = make_doc(spec, text)
    chunk = next(c for c in doc.noun_chunks if c.root.dep_ == "ROOT")
    assert doc.text[slice(*expand_to_referring_expression(chunk))] == expected


def test_paired_tokens_by_kind_nesting_and_parity():
    doc = Doc(VOCAB, words=['"', "(", "a", ")", '"', '"', ")", "\u201c", "b", "\u201d"])
    assert paired_tokens(doc, 0, len(doc) - 1) == {0, 1, 3, 4, 7, 9}
    # Parity counts inside the range only: from token 1 on, tokens 4 and 5 are the pair.
    assert paired_tokens(doc, 1, 6) == {1, 3, 4, 5}


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


@pytest.mark.parametrize("pos, reason", [("PROPN", None), ("NOUN", "abstract_noun")])
def test_abstract_noun_filter_applies_to_common_nouns_only(pos, reason):
    # "Bob Hope" is a person; "hope" as a common noun is abstract.
    doc = make_doc(f"Bob 1 compound PROPN Bob\nHope 1 ROOT {pos} hope")
    assert chunk_filter_reason(next(iter(doc.noun_chunks)), ABSTRACT, drop_pronouns=True) == reason


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  a\tdog\n\non  grass ", "a dog on grass"),
        ("cafe\u0301", "caf\u00e9"),  # NFC
        ("zero\u200bwidth", "zerowidth"),  # Cf removed
        ("bell\x07 ring", "bell ring"),  # Cc removed
        ("line\u2028sep\u00a0nbsp", "line sep nbsp"),  # every white space is a space
        ("\u202eevil", "evil"),  # bidi override is Cf
        ("&quot;The Starry Night&quot;", '"The Starry Night"'),  # HTML references decoded
        ("Tom &amp; Jerry&#39;s", "Tom & Jerry's"),
        ("a&nbsp;dog&#8203;s &#x9;x", "a dogs x"),  # decoded first, so the rules see the characters
        ("&amp;quot; once", "&quot; once"),  # decoded once, as a browser shows it
        ("AT&T & co", "AT&T & co"),  # a bare ampersand is text
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
