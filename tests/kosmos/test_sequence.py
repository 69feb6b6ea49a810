"""Grounded-caption sequences: exact token layout, box remapping, loss mask, and the parser (vs transformers)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from PIL import Image

from grit_core.record import GritRecord
from kosmos.data.sequence import (
    IGNORE_INDEX,
    Phrase,
    ReservedTokenInText,
    SequenceConfig,
    build_grounded_sample,
    build_image_text_sample,
    build_prompt,
    build_text_sample,
    parse_generated_ids,
    parse_grounded_text,
    post_process_generation,
    remap_box_to_crop,
    select_phrases,
)

CAPTION = "A dog and two cats on a sofa"
ALWAYS = SequenceConfig(use_grounding_prob=1.0)


def hand_record(width: int = 224, height: int = 224) -> GritRecord:
    entries = [
        [0, 5, 0.1, 0.2, 0.5, 0.6, 0.9],  # "A dog"
        [10, 18, 0.5, 0.5, 0.75, 0.9, 0.8],  # "two cats", first box
        [10, 18, 0.05, 0.6, 0.3, 0.95, 0.7],  # "two cats", second box
        [14, 18, 0.2, 0.2, 0.3, 0.3, 0.95],  # "cats": inside "two cats", removed by the containment filter
        [22, 28, 0.0, 0.5, 1.0, 1.0, 0.5],  # "a sofa": score under 0.65
    ]
    return GritRecord(key="k0", caption=CAPTION, width=width, height=height, noun_chunks=entries, ref_exps=entries)


def test_exact_sequence_two_phrases_one_with_two_boxes(tokenizer):
    t = tokenizer
    words = ["ĠA", "Ġdog", "Ġand", "Ġtwo", "Ġcats", "Ġon", "Ġa", "Ġsofa"]
    A, dog, and_, two, cats, on, a, sofa = (t.token_to_id(w) for w in words)
    assert t.encode(CAPTION) == [A, dog, and_, two, cats, on, a, sofa]  # one token per word

    def loc(i):
        return t.token_to_id(f"<patch_index_{i:04d}>")

    # Boxes -> bins (224 x 224 image: the crop changes nothing):
    # (0.10, 0.20, 0.50, 0.60): ul x=floor(3.2)=3, y=floor(6.4)=6 -> 195;  lr x=ceil(15)=15, y=ceil(18.2)=19 -> 623
    # (0.50, 0.50, 0.75, 0.90): ul 16,16 -> 528;                            lr x=ceil(23)=23, y=ceil(27.8)=28 -> 919
    # (0.05, 0.60, 0.30, 0.95): ul x=floor(1.6)=1, y=floor(19.2)=19 -> 609; lr x=ceil(8.6)=9, y=ceil(29.4)=30 -> 969
    slots = list(range(t.unk_id + 1, t.unk_id + 65))
    expected = (
        [t.bos_id, t.boi_id, *slots, t.eoi_id, t.grounding_id]
        + [t.phrase_id, A, dog, t.phrase_end_id, t.object_id, loc(195), loc(623), t.object_end_id]
        + [and_]
        + [t.phrase_id, two, cats, t.phrase_end_id, t.object_id, loc(528), loc(919)]
        + [t.delimiter_id, loc(609), loc(969), t.object_end_id]
        + [on, a, sofa, t.eos_id]
    )
    counts = Counter()
    sample = build_grounded_sample(hand_record(), t, ALWAYS, random.Random(0), counts=counts)
    assert sample.input_ids == expected
    assert sample.image_embeds_position_mask == [0, 0] + [1] * 64 + [0] * (len(expected) - 66)
    assert sample.labels == [IGNORE_INDEX] * 67 + expected[67:]
    assert sample.grounded and sample.num_images == 1
    assert counts["boxes_contained"] == 1 and counts["boxes_below_score"] == 1 and counts["grounded"] == 1


def test_grounding_token_can_be_left_out(tokenizer):
    cfg = SequenceConfig(use_grounding_prob=1.0, grounding_token=False)
    sample = build_grounded_sample(hand_record(), tokenizer, cfg, random.Random(0))
    assert sample.input_ids[67] == tokenizer.phrase_id and tokenizer.grounding_id not in sample.input_ids


def test_plain_caption_choice(tokenizer):
    plain_ids = build_image_text_sample(tokenizer, CAPTION, None, ALWAYS).input_ids
    assert plain_ids[67:] == tokenizer.encode(CAPTION) + [tokenizer.eos_id]
    never = build_grounded_sample(hand_record(), tokenizer, SequenceConfig(use_grounding_prob=0.0), random.Random(1))
    assert never.input_ids == plain_ids and not never.grounded
    grounded = sum(
        build_grounded_sample(hand_record(), tokenizer, SequenceConfig(), random.Random(seed)).grounded
        for seed in range(400)
    )
    assert 160 < grounded < 240  # use_grounding_prob 0.5

    # The same rng seed gives the same choice.
    def choices():
        cfg = SequenceConfig()
        return [build_grounded_sample(hand_record(), tokenizer, cfg, random.Random(s)).grounded for s in range(20)]

    assert choices() == choices()


def test_all_boxes_filtered_gives_plain_caption(tokenizer):
    cfg = SequenceConfig(use_grounding_prob=1.0, box_score_threshold=0.99)
    counts = Counter()
    sample = build_grounded_sample(hand_record(), tokenizer, cfg, random.Random(0), counts=counts)
    assert not sample.grounded and counts["plain_no_phrase"] == 1 and tokenizer.grounding_id not in sample.input_ids


def test_chunk_mode_reads_noun_chunks(tokenizer):
    record = hand_record()
    record.ref_exps = []
    record.noun_chunks = [[14, 18, 0.2, 0.2, 0.3, 0.3, 0.95], [10, 18, 0.5, 0.5, 0.75, 0.9, 0.8]]
    cfg = SequenceConfig(phrase_mode="chunk", use_grounding_prob=1.0)
    phrases = select_phrases(record, cfg)
    # No containment filter in chunk mode: overlapping spans, the later one ("cats" inside "two cats") is dropped.
    assert [(p.start, p.end) for p in phrases] == [(10, 18)]
    assert select_phrases(record, ALWAYS) == []  # expression mode reads ref_exps, empty here


def test_remap_box_through_resize_and_centre_crop():
    # 448 x 224: resized to 448 x 224 (short side already 224), crop x from 112 to 336.
    assert remap_box_to_crop((0.0, 0.0, 0.5, 1.0), 448, 224) == (0.0, 0.0, 0.5, 1.0)  # half survives
    assert remap_box_to_crop((0.0, 0.0, 0.2, 1.0), 448, 224) is None  # x 0..89.6: all cut
    assert remap_box_to_crop((0.2, 0.0, 0.3, 1.0), 448, 224) == pytest.approx((0.0, 0.0, 0.1, 1.0))  # 50% kept
    # x 89.6..120.96: 8.96 of 31.36 px survive (28.6%)
    assert remap_box_to_crop((0.2, 0.0, 0.27, 1.0), 448, 224) == pytest.approx((0.0, 0.0, 8.96 / 224, 1.0))
    assert remap_box_to_crop((0.2, 0.0, 0.27, 1.0), 448, 224, min_area_kept=0.3) is None
    assert remap_box_to_crop((0.2, 0.0, 0.26, 1.0), 448, 224) is None  # 4.48 of 26.88 px: 16.7% < 20%
    # 225 x 300: resized to 224 x 298 (int(224 * 300 / 225)), crop top round(74 / 2) = 37.
    box = remap_box_to_crop((0.0, 0.5, 1.0, 0.75), 225, 300)
    assert box == pytest.approx((0.0, (149 - 37) / 224, 1.0, (223.5 - 37) / 224))
    # 1000 x 500 stored image of a 4000 x 2000 original: same result, boxes are normalised.
    assert remap_box_to_crop((0.4, 0.1, 0.6, 0.9), 1000, 500) == remap_box_to_crop((0.4, 0.1, 0.6, 0.9), 4000, 2000)


def test_select_phrases_uses_the_decoded_image_size(tokenizer):
    record = hand_record(width=448, height=224)
    # (0.1, 0.2, 0.5, 0.6) of a 448-wide image: x 44.8..224 -> crop 0..112, kept 62.5%
    phrases = select_phrases(record, ALWAYS)
    assert phrases[0].boxes[0] == pytest.approx((0.0, 0.2, 0.5, 0.6))
    # The same record read with a square image keeps the box as it is.
    assert select_phrases(record, ALWAYS, 300, 300)[0].boxes[0] == pytest.approx((0.1, 0.2, 0.5, 0.6))


def test_loss_mask_matches_transformers_shift_and_the_original_loader(tokenizer):
    from transformers.loss.loss_utils import ForCausalLMLoss

    sample = build_grounded_sample(hand_record(), tokenizer, ALWAYS, random.Random(0))
    ids, labels = sample.input_ids, sample.labels
    n = len(ids)
    caption_len = n - 67  # tokens after </image>, </s> included
    # The original loader: loss mask over the shifted targets, 0 for <s>, <image> and the slots, 1 from </image> on.
    official = ([0] + [0] + [0] * 64 + [1] + [1] * caption_len)[:-1]
    assert [int(label != IGNORE_INDEX) for label in labels[1:]] == official
    # transformers' loss shifts labels by one: logits that put all mass on the next supervised token give ~0 loss.
    vocab = tokenizer.vocab_size
    logits = torch.zeros(1, n, vocab)
    for t in range(n - 1):
        if labels[t + 1] != IGNORE_INDEX:
            logits[0, t, labels[t + 1]] = 50.0
    label_tensor = torch.tensor([labels])
    assert ForCausalLMLoss(logits, label_tensor, vocab).item() < 1e-6
    # The last slot (position 65) predicts </image>: not scored. The </image> position (66) predicts the first
    # caption token (<grounding>): scored.
    for position, scored in ((65, False), (66, True)):
        changed = logits.clone()
        changed[0, position] = torch.randn(vocab)
        assert (ForCausalLMLoss(changed, label_tensor, vocab).item() > 1e-3) == scored


def test_text_only_sample_and_truncation(tokenizer):
    sample = build_text_sample(tokenizer, "two cats sleeping on a red sofa")
    assert sample.input_ids[0] == tokenizer.bos_id and sample.input_ids[-1] == tokenizer.eos_id
    assert sample.labels[0] == IGNORE_INDEX and sample.labels[1:] == sample.input_ids[1:]
    assert sum(sample.image_embeds_position_mask) == 0 and sample.num_images == 0
    cut = build_text_sample(tokenizer, "two cats sleeping on a red sofa", max_length=4)
    assert len(cut) == 4 and cut.truncated and cut.input_ids[-1] != tokenizer.eos_id


def test_tags_written_in_captions_are_refused(tokenizer):
    with pytest.raises(ReservedTokenInText):
        build_image_text_sample(tokenizer, "a dog <phrase> on a sofa", None, ALWAYS)
    with pytest.raises(ReservedTokenInText):
        build_text_sample(tokenizer, "text with </s> inside")


def test_prompt_matches_transformers_processor(hf_folders):
    from transformers.models.kosmos2.processing_kosmos2 import Kosmos2Processor

    from kosmos.data.tokenizer import KosmosTokenizer

    processor = Kosmos2Processor.from_pretrained(str(hf_folders["kosmos2"]))
    tok = KosmosTokenizer.from_pretrained(hf_folders["kosmos2"])
    image = Image.new("RGB", (300, 200), (120, 30, 200))
    theirs = processor(images=image, text="<grounding>An image of", return_tensors=None)
    ids, mask = build_prompt(tok, "<grounding>An image of")
    assert ids == theirs["input_ids"] and mask == theirs["image_embeds_position_mask"]


def test_grounded_sequence_matches_transformers_processor(hf_folders):
    """The same caption and boxes through transformers' processor (tags written in the text) and through our builder
    (tags inserted between the tokens of the whole caption) give the same ids."""
    from transformers.models.kosmos2.processing_kosmos2 import Kosmos2Processor

    from kosmos.data.tokenizer import KosmosTokenizer

    processor = Kosmos2Processor.from_pretrained(str(hf_folders["kosmos2"]))
    tok = KosmosTokenizer.from_pretrained(hf_folders["kosmos2"])
    caption = "An image of a snowman warming himself by a fire"
    snowman, fire = (0.390625, 0.046875, 0.984375, 0.828125), [(0.17, 0.01, 0.48, 0.89), (0.5, 0.5, 0.6, 0.6)]
    theirs = processor(
        images=Image.new("RGB", (224, 224)),
        text="<grounding>An image of<phrase> a snowman</phrase> warming himself by<phrase> a fire</phrase>",
        bboxes=[[snowman], fire],
        add_eos_token=True,
        return_tensors=None,
    )
    phrases = [Phrase(12, 21, (snowman,)), Phrase(41, 47, tuple(fire))]
    ours = build_image_text_sample(tok, caption, phrases, ALWAYS)
    assert ours.input_ids == theirs["input_ids"]
    assert ours.image_embeds_position_mask == theirs["image_embeds_position_mask"]


PARSER_CASES = [
    # transformers' documented example
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming "
    "himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.",
    # several boxes for one phrase
    "<grounding><phrase> Two dogs</phrase><object><patch_index_0001><patch_index_0100></delimiter_of_multi_objects/>"
    "<patch_index_0200><patch_index_1023></object> play in the snow",
    # an object without a phrase, and a phrase without an object
    "Look at<object><patch_index_0010><patch_index_0500></object> this<phrase> thing</phrase> here",
    # no tags at all, surrounding spaces
    "   just text   ",
    # same bin and same row/column decoding
    "<phrase>x</phrase><object><patch_index_0033><patch_index_0033></object> and<phrase> y </phrase><object>"
    "<patch_index_0064><patch_index_0070></object>",
    # unicode before the entity shifts offsets by characters, not bytes
    "Ünïcödé café<phrase> a crème brûlée</phrase><object><patch_index_0100><patch_index_0300></object>!",
    # a generation that stopped inside an object: nothing to extract there
    "<grounding> a cat<phrase> on a mat</phrase><object><patch_index_0100>",
]


@pytest.mark.parametrize("text", PARSER_CASES)
def test_parser_matches_transformers(text):
    from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

    assert parse_grounded_text(text) == clean_text_and_extract_entities_with_bboxes(text)


def test_post_process_generation_drops_the_image_part():
    from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

    text = "<image>garbage slots</image>" + PARSER_CASES[0]
    assert post_process_generation(text) == clean_text_and_extract_entities_with_bboxes(PARSER_CASES[0])


def test_build_then_parse_round_trip(tokenizer):
    sample = build_grounded_sample(hand_record(), tokenizer, ALWAYS, random.Random(0))
    clean, entities = parse_generated_ids(sample.input_ids, tokenizer)
    assert clean == CAPTION
    assert [(name, span) for name, span, _ in entities] == [("A dog", (0, 5)), ("two cats", (10, 18))]
    # Boxes come back as the centres of their bins: within one bin (1/32) of the originals.
    originals = [[(0.1, 0.2, 0.5, 0.6)], [(0.5, 0.5, 0.75, 0.9), (0.05, 0.6, 0.3, 0.95)]]
    for (_, _, boxes), want in zip(entities, originals):
        assert len(boxes) == len(want)
        for got, ref in zip(boxes, want):
            assert all(abs(g - r) <= 1 / 32 for g, r in zip(got, ref))
