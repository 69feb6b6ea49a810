"""The tiny Grounding DINO factory: a real, deterministic model folder with a usable vocabulary."""

from __future__ import annotations

import torch

from grit_pipeline.grounding.tiny import BERT_SPECIAL_IDS, build_processor, build_tiny_grounding_dino, build_vocab


def test_vocab_keeps_berts_delimiter_ids_and_has_no_holes():
    vocab = build_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab)))
    for token, index in BERT_SPECIAL_IDS.items():
        assert vocab[token] == index


def test_any_english_text_tokenizes_without_unknown_tokens():
    tokenizer = build_processor().tokenizer
    text = "A zebra-striped UMBRELLA, 42 flamingos & the Eiffel Tower at 9:30pm?"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert ids[0] == 101 and ids[-1] == 102 and 1029 in ids


def test_saved_folder_loads_through_from_pretrained(tiny_grounding_dino_path):
    from transformers import AutoModelForZeroShotObjectDetection, AutoTokenizer

    model = AutoModelForZeroShotObjectDetection.from_pretrained(tiny_grounding_dino_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_grounding_dino_path)
    assert model.config.model_type == "grounding-dino" and model.config.max_text_len == 32
    assert tokenizer("a dog .")["input_ids"] == [101, build_vocab()["a"], build_vocab()["dog"], 1012, 102]
    fresh, _ = build_tiny_grounding_dino(seed=0)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    other, _ = build_tiny_grounding_dino(seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), other.state_dict().values()))
