"""The Kosmos-2 tokenizer: a text vocabulary, then ``<mask>``, the 11 tag tokens and 1,024 location tokens.

Id layout (the released model's, kept for every tokenizer we make or load)::

    0 <s>   1 <pad>   2 </s>   3 <unk>   4 .. T-1 text pieces   T <mask>
    T+1 </doc>  <image>  </image>  </chunk>  </line>  <phrase>  </phrase>  <object>  </object>
        </delimiter_of_multi_objects/>  <grounding>            (T+11 = <grounding>)
    T+12 <patch_index_0000> ... <patch_index_1023>             (vocab_size = T + 1036)

For the release T = 64,001 (a 64,000-piece sentencepiece BPE with fairseq's id offsets), so ``<grounding>`` is
64012 and ``<patch_index_0000>`` 64013.

Two ways to get one:

- :meth:`KosmosTokenizer.train`: a byte-level BPE (Hugging Face ``tokenizers``, GPT-2 style, a space prefixed to
  the text) trained on corpus captions, for from-scratch runs. Byte-level because web captions hold every script
  and emoji, and a byte-level vocabulary never produces ``<unk>``.
- :meth:`KosmosTokenizer.from_pretrained` on a folder we saved, or on a Hugging Face Kosmos-2 tokenizer folder
  (``tokenizer.json``, or only ``sentencepiece.bpe.model``, as transformers saves it); ids are then those of
  transformers' tokenizer for the same folder. A folder without the Kosmos-2 tokens (a plain XLM-R tokenizer) gets
  them appended in order, as transformers' ``Kosmos2Processor`` does.

The tag and location tokens are added as non-special tokens that swallow the space before them (``lstrip``), the
way ``Kosmos2Processor`` adds them, so that ``decode(ids)`` drops ``<s>``/``</s>``/``<pad>`` but keeps the tags the
parser needs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kosmos.data.location import NUM_LOCATION_TOKENS, location_tokens

BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
BASE_SPECIAL_TOKENS = (BOS, PAD, EOS, UNK)  # ids 0..3
TAG_TOKENS = (
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
)
META_FILE = "kosmos_tokenizer.json"
FORMAT_VERSION = 1


class TokenizerError(ValueError):
    """A tokenizer folder or vocabulary that cannot serve as a Kosmos-2 tokenizer; the message says why."""


class KosmosTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids the model, the sequence builder and the trainer need.

    ``kind`` records where the vocabulary came from (``byte_level_bpe`` for ours, ``hf`` for a loaded Hugging
    Face folder); it is saved beside the vocabulary.
    """

    def __init__(self, backend: Tokenizer, kind: str = "byte_level_bpe", extra_meta: dict | None = None) -> None:
        self.backend = backend
        self.kind = kind
        self.extra_meta = dict(extra_meta or {})
        _ensure_kosmos_tokens(backend)
        ids = {}
        for token in (*BASE_SPECIAL_TOKENS, MASK, *TAG_TOKENS):
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise TokenizerError(f"the vocabulary has no {token!r} token")
            ids[token] = token_id
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = (ids[t] for t in BASE_SPECIAL_TOKENS)
        self.mask_id = ids[MASK]
        (
            self.eod_id,
            self.boi_id,
            self.eoi_id,
            self.eoc_id,
            self.eol_id,
            self.phrase_id,
            self.phrase_end_id,
            self.object_id,
            self.object_end_id,
            self.delimiter_id,
            self.grounding_id,
        ) = (ids[t] for t in TAG_TOKENS)
        self.loc_token_start = backend.token_to_id(location_tokens()[0])
        self.num_location_tokens = NUM_LOCATION_TOKENS
        # The model turns a predicted id into a bin by subtraction: the 1,024 location ids must be contiguous.
        for i, token in enumerate(location_tokens()):
            if backend.token_to_id(token) != self.loc_token_start + i:
                expected = self.loc_token_start + i
                raise TokenizerError(f"location tokens are not contiguous: {token!r} is not id {expected}")
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> KosmosTokenizer:
        """Train a byte-level BPE with ``vocab_size`` text pieces (``<s> <pad> </s> <unk>`` included).

        The full vocabulary is ``vocab_size + 1036`` (``<mask>``, tags, location tokens). A corpus too small to
        supply that many merges gives fewer pieces; :attr:`vocab_size` reports the real size.
        """
        floor = len(BASE_SPECIAL_TOKENS) + 256 + 1
        if vocab_size < floor:
            raise TokenizerError(f"vocab_size {vocab_size} is below {floor} (4 special tokens + 256 bytes + 1 merge)")
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(BASE_SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        # <s> text </s> when a caller (transformers, say) asks the backend itself for special tokens.
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 2)]
        )
        return cls(backend, kind="byte_level_bpe")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> KosmosTokenizer:
        """Load a folder saved by :meth:`save_pretrained` or by transformers (Kosmos-2 or XLM-R tokenizer)."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a tokenizer folder")
        meta_path = folder / META_FILE
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
        if (folder / "tokenizer.json").exists():
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif any(folder.glob("*.model")):
            backend = _convert_sentencepiece_folder(folder)
        else:
            raise TokenizerError(f"{folder}: no tokenizer.json and no sentencepiece model")
        kind = meta.get("kind", "hf")
        extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "kind", "ids", "vocab_size")}
        return cls(backend, kind=kind, extra_meta=extra)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``tokenizer.json``, our metadata, and a ``tokenizer_config.json`` that transformers loads."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        meta = {
            "format": "kosmos-tokenizer",
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "ids": self.special_ids(),
            **self.extra_meta,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        hf_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": UNK,
            "mask_token": MASK,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        return folder

    # -- ids ---------------------------------------------------------------------------------------------------

    def special_ids(self) -> dict[str, int]:
        """Every id the model and the trainer look up by name."""
        return {
            "bos": self.bos_id,
            "pad": self.pad_id,
            "eos": self.eos_id,
            "unk": self.unk_id,
            "mask": self.mask_id,
            "eod": self.eod_id,
            "image": self.boi_id,
            "image_end": self.eoi_id,
            "chunk_end": self.eoc_id,
            "line_end": self.eol_id,
            "phrase": self.phrase_id,
            "phrase_end": self.phrase_end_id,
            "object": self.object_id,
            "object_end": self.object_end_id,
            "delimiter": self.delimiter_id,
            "grounding": self.grounding_id,
            "loc_token_start": self.loc_token_start,
            "vocab_size": self.vocab_size,
        }

    def loc_token_id(self, index: int) -> int:
        """Id of ``<patch_index_{index:04d}>``."""
        if not 0 <= index < self.num_location_tokens:
            raise ValueError(f"location index {index} outside [0, {self.num_location_tokens})")
        return self.loc_token_start + index

    def is_location_id(self, token_id: int) -> bool:
        return self.loc_token_start <= token_id < self.loc_token_start + self.num_location_tokens

    def image_slot_ids(self, n: int = 64) -> list[int]:
        """Placeholder ids for the ``n`` image-embedding slots: ``unk + 1 .. unk + n``, as transformers'
        ``Kosmos2Processor`` writes them. The model overwrites those positions with image embeddings, so the ids
        only have to exist; matching HF keeps our sequences byte-identical to its processor's."""
        return list(range(self.unk_id + 1, self.unk_id + 1 + n))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def __len__(self) -> int:
        return self.vocab_size

    @functools.cached_property
    def reserved_ids(self) -> frozenset[int]:
        """Ids that text must never produce: ``<s> <pad> </s> <mask>``, tags and location tokens. Web text that
        spells one out (``"<phrase>"`` in a caption) would otherwise teach the model fake structure."""
        tags = [self.backend.token_to_id(t) for t in TAG_TOKENS]
        locs = range(self.loc_token_start, self.loc_token_start + self.num_location_tokens)
        return frozenset([self.bos_id, self.pad_id, self.eos_id, self.mask_id, *tags, *locs])

    # -- text --------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of ``text``; tag and location tokens written in the text are recognised as single tokens."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's ``(start, end)`` character span in ``text`` (for mapping phrases to tokens)."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. ``skip_special_tokens`` drops ``<s> <pad> </s> <unk> <mask>`` but keeps tags and
        location tokens, which are what :func:`kosmos.data.sequence.parse_grounded_text` reads."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _kosmos_added_token(content: str) -> AddedToken:
    return AddedToken(content, single_word=False, lstrip=True, rstrip=False, normalized=False, special=False)


def _ensure_kosmos_tokens(backend: Tokenizer) -> None:
    """Append ``<mask>``, the tags and the location tokens that a vocabulary lacks, in Kosmos-2's order."""
    if backend.token_to_id(MASK) is None:
        backend.add_special_tokens([AddedToken(MASK, normalized=False, special=True)])
    missing = [t for t in (*TAG_TOKENS, *location_tokens()) if backend.token_to_id(t) is None]
    if missing:
        backend.add_tokens([_kosmos_added_token(t) for t in missing])


def _convert_sentencepiece_folder(folder: Path) -> Tokenizer:
    """A folder with only a sentencepiece model: let transformers build the fast tokenizer it would use. Without a
    ``tokenizer_config.json`` naming a class, the model is read as Kosmos-2's own: XLM-R style (fairseq offsets)."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise TokenizerError(f"{folder}: converting a sentencepiece model needs transformers") from exc
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    if config.get("tokenizer_class"):
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    else:
        hf_tokenizer = transformers.XLMRobertaTokenizer.from_pretrained(str(folder))
    backend = getattr(hf_tokenizer, "backend_tokenizer", None) or getattr(hf_tokenizer, "_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"{folder}: transformers gave {type(hf_tokenizer).__name__}, which has no fast backend")
    return Tokenizer.from_str(backend.to_str())
