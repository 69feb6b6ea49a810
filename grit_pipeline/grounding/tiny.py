"""A tiny, randomly initialised Grounding DINO saved as a real model folder, for tests and offline demos.

The folder holds exactly what a user's checkpoint holds (``config.json``, weights, tokenizer and processor files),
so it loads through the same ``from_pretrained`` path as ``IDEA-Research/grounding-dino-tiny``. Its boxes are
noise: never use it for quality claims.

Grounding DINO hard-codes BERT's ids of its delimiter tokens (``[CLS]`` 101, ``[SEP]`` 102, ``.`` 1012, ``?`` 1029)
to split the prompt into phrases, so the tiny vocabulary keeps those ids and fills the rest with single characters,
their ``##`` continuations and common caption words: any English text tokenizes without ``[UNK]``.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessorPil,
    GroundingDinoProcessor,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
    SwinConfig,
)

# BERT (uncased) ids that Grounding DINO's modeling code relies on.
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}

LOGIT_SHRINK = 0.15

# Words common in alt-text captions, so that prompts of real-looking captions have realistic token counts.
_COMMON_WORDS = (
    "a an the and of in on at with for to from by over under near next front behind top side two three some "
    "man woman men women person people boy girl child children baby player crowd group family couple team "
    "dog cat horse bird cow sheep elephant bear zebra giraffe animal fish "
    "car bus truck train bike bicycle motorcycle boat plane airplane street road sign light building house "
    "city tree trees grass field sky water sea beach river lake mountain snow hill park garden flower flowers "
    "table chair bed couch room kitchen window door wall floor food plate pizza cake sandwich bowl cup glass "
    "shirt hat dress jacket bag phone laptop computer book ball frisbee kite umbrella clock bottle "
    "red blue green white black yellow brown orange pink gray grey purple small large big young old little "
    "wooden tall open full empty sitting standing walking holding wearing playing riding looking "
    "picture photo image view close background day night sun"
)
COMMON_WORDS = tuple(_COMMON_WORDS.split())


def build_vocab(size: int = 1100) -> dict[str, int]:
    """A WordPiece vocabulary of ``size`` entries that keeps BERT's special ids (``size`` > 1029)."""
    if size <= max(BERT_SPECIAL_IDS.values()):
        raise ValueError(f"vocab size must exceed {max(BERT_SPECIAL_IDS.values())} to keep BERT's special ids")
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation if c not in ".?"]
    pool = chars + ["##" + c for c in string.ascii_lowercase + string.digits] + list(COMMON_WORDS)
    pool = [tok for tok in dict.fromkeys(pool) if tok not in BERT_SPECIAL_IDS]
    by_id: dict[int, str] = {i: tok for tok, i in BERT_SPECIAL_IDS.items()}
    free = (i for i in range(size) if i not in by_id)
    for tok in pool:
        i = next(free, None)
        if i is None:
            break
        by_id[i] = tok
    for n, i in enumerate(free):
        by_id[i] = f"[unused{n}]"
    return {tok: i for i, tok in sorted(by_id.items())}


def tiny_config(vocab_size: int, max_text_len: int = 32, mm: bool = False) -> GroundingDinoConfig:
    """The 653k-parameter configuration: every part of the real architecture, at toy width and depth.

    ``mm`` gives the same sizes as an MM-Grounding-DINO configuration (its own model type in transformers, loaded
    by the same Auto class).
    """
    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=7,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        vocab_size=vocab_size,
    )
    config_class = MMGroundingDinoConfig if mm else GroundingDinoConfig
    return config_class(
        backbone_config=backbone,
        text_config=text,
        d_model=64,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=50,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=max_text_len,
    )


def build_processor(vocab_size: int = 1100) -> GroundingDinoProcessor:
    """Tokenizer (built from an in-memory vocab: ``BertTokenizerFast(vocab_file=...)`` ignores the file) plus the
    PIL image processor (the default one needs torchvision)."""
    tokenizer = BertTokenizer(vocab=build_vocab(vocab_size), do_lower_case=True)
    return GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(), tokenizer=tokenizer)


def build_tiny_grounding_dino(
    seed: int = 0, max_text_len: int = 32, mm: bool = False
) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """The tiny model and its processor, in memory, with weights drawn from ``seed``."""
    processor = build_processor()
    model_class = MMGroundingDinoForObjectDetection if mm else GroundingDinoForObjectDetection
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(tiny_config(len(processor.tokenizer), max_text_len, mm=mm))
    # Random weights give query-token logits of +-10 to 20, so every score is 1.0. Shrinking the decoder's output
    # norm brings them to a few units: scores spread over (0, 1) and thresholds matter, as with a trained model.
    with torch.no_grad():
        model.model.decoder.layer_norm.weight.mul_(LOGIT_SHRINK)
    return model.eval(), processor


def save_tiny_grounding_dino(path: str | Path, seed: int = 0, max_text_len: int = 32, mm: bool = False) -> Path:
    """Save the tiny model and its processor to ``path`` (created if needed) and return it.

    Deterministic: the same ``seed`` gives the same weights. ``max_text_len`` is the text encoder limit; the
    default of 32 tokens makes long captions split into several prompts, which tests rely on. ``mm`` saves an
    MM-Grounding-DINO instead.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_grounding_dino(seed=seed, max_text_len=max_text_len, mm=mm)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
