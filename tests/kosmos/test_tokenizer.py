"""Tokenizer: the Kosmos-2 id layout, save/load, and the same ids as transformers on Hugging Face folders."""

from __future__ import annotations

import json

import pytest
from kosmos_shards import CAPTIONS_WITH_TAGS, CORPUS, write_grit_shards, write_shard, write_text_jsonl

from kosmos.data.tokenizer import TAG_TOKENS, KosmosTokenizer, TokenizerError

SPEC_TAG_ORDER = [
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
]


def test_trained_layout(tokenizer):
    assert tuple(SPEC_TAG_ORDER) == TAG_TOKENS
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    t = tokenizer.mask_id  # the text vocabulary ends just before <mask>
    assert t > 300
    tags = [tokenizer.token_to_id(tok) for tok in SPEC_TAG_ORDER]
    assert tags == list(range(t + 1, t + 12))
    assert tokenizer.grounding_id == t + 11 and tokenizer.boi_id == t + 2 and tokenizer.eoi_id == t + 3
    assert (tokenizer.phrase_id, tokenizer.object_id, tokenizer.delimiter_id) == (t + 6, t + 8, t + 10)
    assert tokenizer.loc_token_start == t + 12
    assert tokenizer.token_to_id("<patch_index_1023>") == t + 12 + 1023
    assert tokenizer.vocab_size == t + 12 + 1024
    assert tokenizer.loc_token_id(44) == tokenizer.token_to_id("<patch_index_0044>")
    assert tokenizer.is_location_id(tokenizer.loc_token_start) and not tokenizer.is_location_id(tokenizer.grounding_id)


def test_encode_recognises_tags_and_decode_keeps_them(tokenizer):
    text = "<grounding>a dog<phrase> two cats</phrase><object><patch_index_0044><patch_index_0863></object>"
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[1] == tokenizer.grounding_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.phrase_id in ids and tokenizer.loc_token_id(863) in ids
    # <s> and </s> go, the tags stay, text comes back (byte-level BPE with a prefix space: " a dog").
    assert tokenizer.decode(ids) == "<grounding> a dog<phrase> two cats</phrase><object><patch_index_0044>" + (
        "<patch_index_0863></object>"
    )
    # Byte-level: nothing is unknown.
    assert tokenizer.unk_id not in tokenizer.encode("emoji 🐈 and 漢字")


def test_save_load_roundtrip_and_transformers_reads_our_folder(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = KosmosTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.special_ids() == tokenizer.special_ids()
    assert loaded.kind == "byte_level_bpe"
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for text in CAPTIONS_WITH_TAGS:
        assert loaded.encode(text) == tokenizer.encode(text)
        assert hf(text).input_ids == loaded.encode(text, add_bos=True, add_eos=True)


def test_train_rejects_tiny_vocab():
    with pytest.raises(TokenizerError):
        KosmosTokenizer.train(CORPUS, vocab_size=100)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folders: a sentencepiece BPE the test trains, turned into transformers' Kosmos-2 tokenizer
# ---------------------------------------------------------------------------------------------------------------


def test_hf_kosmos2_folder_gives_transformers_ids(hf_folders):
    from transformers import AutoTokenizer

    ours = KosmosTokenizer.from_pretrained(hf_folders["kosmos2"])
    theirs = AutoTokenizer.from_pretrained(str(hf_folders["kosmos2"]))
    assert ours.kind == "hf"
    # fairseq layout: 4 specials, the sentencepiece pieces after its own 3 specials, <mask>, then Kosmos-2's.
    assert ours.mask_id == hf_folders["spm_pieces"] + 1
    assert ours.grounding_id == ours.mask_id + 11 and ours.loc_token_start == ours.mask_id + 12
    for token in (*SPEC_TAG_ORDER, "<mask>", "<s>", "</s>", "<pad>", "<patch_index_0000>", "<patch_index_1023>"):
        assert ours.token_to_id(token) == theirs.convert_tokens_to_ids(token), token
    for text in CAPTIONS_WITH_TAGS:
        ids = ours.encode(text, add_bos=True, add_eos=True)
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_plain_and_sentencepiece_only_folders_get_the_kosmos_tokens(hf_folders):
    reference = KosmosTokenizer.from_pretrained(hf_folders["kosmos2"])
    for name in ("plain", "spm_only"):
        tok = KosmosTokenizer.from_pretrained(hf_folders[name])
        assert tok.special_ids() == reference.special_ids(), name
        for text in CAPTIONS_WITH_TAGS:
            assert tok.encode(text) == reference.encode(text), (name, text)


def test_not_a_tokenizer_folder(tmp_path):
    with pytest.raises(TokenizerError):
        KosmosTokenizer.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# kosmos tokenizer train
# ---------------------------------------------------------------------------------------------------------------


def test_cli_trains_on_shards_and_jsonl(tmp_path, capsys):
    from kosmos.cli import main

    write_grit_shards(tmp_path / "grit", num_shards=2, per_shard=20)
    write_shard(tmp_path / "grit" / "00002.tar", [], stats=False)  # incomplete: must be skipped
    write_text_jsonl(tmp_path / "text" / "a.jsonl", CORPUS[:6] * 5)
    out = tmp_path / "tok"
    code = main(
        [
            "tokenizer",
            "train",
            "--shards",
            str(tmp_path / "grit" / "{00000..00002}.tar"),
            "--shards",
            str(tmp_path / "text" / "*.jsonl"),
            "--vocab-size",
            "320",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["texts"] == 40 + 30 and summary["shards"] == 3
    assert "00002.tar has no _stats.json" in captured.err
    tok = KosmosTokenizer.from_pretrained(out)
    assert tok.vocab_size == summary["vocab_size"] == tok.mask_id + 1036
    meta = json.loads((out / "kosmos_tokenizer.json").read_text())
    assert meta["trained_on"]["texts"] == 70 and meta["ids"]["grounding"] == tok.grounding_id
    ids = tok.encode("a red square next to a blue circle")
    assert len(ids) < len("a red square next to a blue circle")  # merges were learnt from the shards


def test_cli_reports_missing_shards(tmp_path, capsys):
    from kosmos.cli import main

    code = main(["tokenizer", "train", "--shards", str(tmp_path / "nope-*.tar"), "--vocab-size", "300", "--out", "x"])
    assert code == 2
    assert "matches no file" in capsys.readouterr().err
