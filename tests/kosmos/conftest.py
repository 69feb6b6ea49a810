"""Fixtures of the kosmos tests."""

from __future__ import annotations

import random
import shutil

import pytest
from kosmos_shards import CAPTIONS_WITH_TAGS, CORPUS


@pytest.fixture(scope="session")
def tokenizer():
    from kosmos.tokenizer import KosmosTokenizer

    return KosmosTokenizer.train(CORPUS, vocab_size=600, min_frequency=2)


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory):
    """A sentencepiece BPE trained here, as transformers saves it: a Kosmos-2 processor folder, a plain XLM-R
    tokenizer folder and a folder holding only the sentencepiece model."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import CLIPImageProcessorPil, XLMRobertaTokenizer
    from transformers.models.kosmos2.processing_kosmos2 import Kosmos2Processor

    root = tmp_path_factory.mktemp("hf_tok")
    rng = random.Random(0)
    sentences = [" ".join(rng.sample(CAPTIONS_WITH_TAGS[0].split() + CORPUS[0].split(), 6)) for _ in range(200)]
    spm_dir = root / "spm_only"
    spm_dir.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences + CORPUS),
        model_prefix=str(root / "sp"),
        vocab_size=150,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
    )
    # transformers' own file name for XLM-R / Kosmos-2 sentencepiece models.
    shutil.copy(root / "sp.model", spm_dir / "sentencepiece.bpe.model")
    xlmr = XLMRobertaTokenizer.from_pretrained(str(spm_dir))
    xlmr.save_pretrained(str(root / "xlmr_plain"))
    processor = Kosmos2Processor(CLIPImageProcessorPil(), XLMRobertaTokenizer.from_pretrained(str(spm_dir)))
    processor.save_pretrained(str(root / "kosmos2"))
    return {"spm_only": spm_dir, "plain": root / "xlmr_plain", "kosmos2": root / "kosmos2", "spm_pieces": 150}
