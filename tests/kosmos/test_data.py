"""The loader over real WebDataset shards: batch contract, GRIT-20M/img2dataset shards, bad samples, mixing,
packing, rank split, and exact resume."""

from __future__ import annotations

import io
import itertools
import json
import random

import pytest
import torch
from kosmos_shards import CORPUS, shapes_sample, write_grit_shards, write_shard, write_text_jsonl
from PIL import Image

from grit_core.config import load_config
from kosmos.data.loader import DataConfig, SourceConfig, make_loader
from kosmos.data.location import box_to_patch_indices
from kosmos.data.sequence import IGNORE_INDEX, parse_generated_ids, remap_box_to_crop
from kosmos.data.shards import assign_shards, complete_shards, expand_shard_patterns
from kosmos.data.transform import CLIP_MEAN, CLIP_STD, clip_transform, resize_crop_geometry


def grit_source(folder, **kw) -> SourceConfig:
    return SourceConfig(name=kw.pop("name", "grit"), kind="grit", shards=[str(folder / "*.tar")], **kw)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def split_rows(batch):
    """Per sample of an unpacked batch: (key, ids without padding, labels, image tensor or None)."""
    images = iter(batch["pixel_values"])
    out = []
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        image = next(images) if batch["num_images"][row] else None
        out.append(
            (batch["keys"][row], batch["input_ids"][row, :n].tolist(), batch["labels"][row, :n].tolist(), image)
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Shard lists
# ---------------------------------------------------------------------------------------------------------------


def test_shard_patterns_and_completeness(tmp_path):
    write_grit_shards(tmp_path, num_shards=3, per_shard=1)
    write_shard(tmp_path / "00003.tar", [], stats=False)
    urls = expand_shard_patterns([str(tmp_path / "{00000..00001}.tar") + "::" + str(tmp_path / "0000[23].tar")])
    assert [u.rsplit("/", 1)[-1] for u in urls] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert expand_shard_patterns(str(tmp_path / "*.tar")) == urls  # globs sort; duplicates would be dropped
    complete, incomplete = complete_shards(urls)
    assert len(complete) == 3 and incomplete == [urls[3]]
    assert expand_shard_patterns("s3://bucket/{0..1}.tar") == ["s3://bucket/0.tar", "s3://bucket/1.tar"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_shard_patterns(str(tmp_path / "missing-*.tar"))


def test_assign_shards_covers_every_sample_once():
    urls = [f"{i}.tar" for i in range(10)]
    dealt = [assign_shards(urls, slot, 4) for slot in range(4)]
    assert sorted(u for mine, _, _ in dealt for u in mine) == sorted(urls)
    assert all(stride == 1 for _, stride, _ in dealt)
    # Fewer shards than readers: everyone reads everything, keeping every 4th sample from its own offset.
    few = [assign_shards(urls[:2], slot, 4) for slot in range(4)]
    assert all(mine == urls[:2] and stride == 4 for mine, stride, _ in few)
    assert sorted(offset for _, _, offset in few) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------


def test_batch_contract_on_our_shards(tmp_path, tokenizer):
    write_grit_shards(tmp_path, num_shards=2, per_shard=6)
    cfg = DataConfig(
        sources=[grit_source(tmp_path)], batch_size=4, num_workers=0, shuffle_buffer=0, shuffle_shards=False
    )
    cfg.sequence.use_grounding_prob = 1.0
    loader = make_loader(cfg, tokenizer)
    batches = take(loader, 3)
    batch = batches[0]
    b, t = batch["input_ids"].shape
    assert b == 4 and t % 8 == 0
    assert batch["pixel_values"].shape == (4, 3, 224, 224) and batch["pixel_values"].dtype == torch.float32
    for name in ("input_ids", "attention_mask", "image_embeds_position_mask", "labels", "num_images"):
        assert batch[name].dtype == torch.long, name
    assert batch["image_embeds_position_mask"].sum(1).tolist() == [64] * 4
    assert batch["num_images"].tolist() == [1] * 4 and batch["sources"] == ["grit"] * 4
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == tokenizer.pad_id).all() and (batch["labels"][pad] == IGNORE_INDEX).all()
    # Shard order without shuffling: the first shard's samples in order.
    assert batch["keys"] == ["s0x000", "s0x001", "s0x002", "s0x003"]
    # Twelve samples, three batches: every sample once, every one grounded, images as the transform makes them.
    keys = [k for bt in batches for k in bt["keys"]]
    assert sorted(keys) == sorted(f"s{s}x{i:03d}" for s in range(2) for i in range(6))
    assert loader.counts["kept"] == 12 and loader.counts["grounded"] == 12
    rng = random.Random(0)
    first = shapes_sample("s0x000", rng)
    image = Image.open(io.BytesIO(first["jpg"]))
    assert torch.equal(batch["pixel_values"][0], clip_transform(image))
    # The phrases parse back with the boxes of the record, remapped through the crop.
    record = json.loads(first["json"])
    n = int(batch["attention_mask"][0].sum())
    clean, entities = parse_generated_ids(batch["input_ids"][0, :n].tolist(), tokenizer)
    assert clean == record["caption"]
    for (name, _, boxes), entry in zip(entities, record["ref_exps"]):
        assert name == record["caption"][entry[0] : entry[1]]
        want = remap_box_to_crop(entry[2:6], 320, 240)
        ids = batch["input_ids"][0].tolist()
        assert tokenizer.loc_token_id(box_to_patch_indices(want)[0]) in ids
        assert len(boxes) == 1


def test_clip_transform_matches_transformers_image_processor():
    from transformers import CLIPImageProcessorPil

    # 300 x 260 -> 258 x 224: the crop offset (258 - 224) / 2 = 17 is exact, where HF floors and we round alike.
    rng = random.Random(0)
    image = Image.new("RGB", (300, 260))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(300 * 260)])
    assert resize_crop_geometry(300, 260) == (258, 224, 17, 0)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    theirs = torch.as_tensor(processor(images=image, return_tensors="np")["pixel_values"][0])
    assert (clip_transform(image) - theirs).abs().max() < 1e-4


def test_fast_jpeg_decode_keeps_boxes_and_nearly_the_pixels(tmp_path, tokenizer):
    write_shard(tmp_path / "00000.tar", [shapes_sample(f"f{i}", random.Random(i), 640, 480) for i in range(2)])
    batches = []
    for fast in (False, True):
        cfg = DataConfig(sources=[grit_source(tmp_path)], batch_size=2, num_workers=0, fast_jpeg_decode=fast)
        cfg.sequence.use_grounding_prob = 1.0
        batches.append(take(make_loader(cfg, tokenizer), 1)[0])
    full, fast = batches
    assert fast["keys"] == full["keys"] and torch.equal(fast["input_ids"], full["input_ids"])
    difference = (fast["pixel_values"] - full["pixel_values"]).abs().mean().item()
    assert 0 < difference < 0.02  # normalised units (one grey level is about 0.015)


def test_img2dataset_grit20m_shards(tmp_path, tokenizer):
    """GRIT-20M downloaded with img2dataset: resized images, a JSON whose width/height are the original's (of another
    aspect here, as if the row were wrong), and the GRIT columns saved as additional columns."""
    rng = random.Random(5)
    samples = []
    for i in range(4):
        sample = shapes_sample(f"{i:09d}", rng, width=320, height=240)
        record = json.loads(sample["json"])
        img2dataset_json = {
            "url": f"https://example.com/{i}.jpg",
            "caption": record["caption"],
            "key": f"{i:09d}",
            "status": "success",
            "error_message": None,
            "width": 1000,
            "height": 250,
            "original_width": 1000,
            "original_height": 250,
            "noun_chunks": record["noun_chunks"],
            "ref_exps": json.dumps(record["ref_exps"]),  # some exports keep the lists as JSON text
        }
        samples.append(
            {
                "__key__": f"{i:09d}",
                "jpg": sample["jpg"],
                "txt": sample["txt"],
                "json": json.dumps(img2dataset_json).encode(),
            }
        )
    write_shard(tmp_path / "00000.tar", samples)
    cfg = DataConfig(sources=[grit_source(tmp_path)], batch_size=4, num_workers=0, shuffle_buffer=0)
    cfg.sequence.use_grounding_prob = 1.0
    batch = take(make_loader(cfg, tokenizer), 1)[0]
    for row, sample in enumerate(samples):
        entries = json.loads(json.loads(sample["json"])["ref_exps"])
        ids = batch["input_ids"][row].tolist()
        for entry in entries:
            # The box is remapped with the decoded image's size (320 x 240), not the JSON's 1000 x 250.
            ul, lr = box_to_patch_indices(remap_box_to_crop(entry[2:6], 320, 240))
            assert tokenizer.loc_token_id(ul) in ids and tokenizer.loc_token_id(lr) in ids


def test_bad_samples_are_counted_and_skipped(tmp_path, tokenizer, caplog):
    rng = random.Random(1)
    good = [shapes_sample(f"g{i}", rng) for i in range(5)]
    bad_image = dict(shapes_sample("badimage", rng), jpg=b"\xff\xd8 not a jpeg")
    bad_json = dict(shapes_sample("badjson", rng), json=b"{not json")
    no_image = {k: v for k, v in shapes_sample("noimage", rng).items() if k != "jpg"}
    with_tag = shapes_sample("tagged", rng)
    caption = "a red square <phrase> next to a blue circle"
    with_tag["json"] = json.dumps({**json.loads(with_tag["json"]), "caption": caption}).encode()
    write_shard(
        tmp_path / "00000.tar", [good[0], bad_image, good[1], bad_json, no_image, good[2], with_tag, *good[3:]]
    )
    # A truncated tar: the readable samples before the damage are used, the error is logged.
    whole = write_shard(tmp_path / "00001.tar", [shapes_sample(f"t{i}", rng) for i in range(3)]).read_bytes()
    (tmp_path / "00001.tar").write_bytes(whole[: len(whole) // 2 + 100])
    cfg = DataConfig(
        sources=[grit_source(tmp_path)], batch_size=2, num_workers=0, shuffle_buffer=0, shuffle_shards=False
    )
    loader = make_loader(cfg, tokenizer)
    keys = [k for batch in take(loader, 3) for k in batch["keys"]]
    assert keys[:5] == ["g0", "g1", "g2", "g3", "g4"]
    counts = loader.counts
    assert counts["dropped_bad_image"] == 1 and counts["dropped_bad_record"] == 1
    assert counts["dropped_missing_image"] == 1 and counts["dropped_reserved_token_in_text"] == 1
    assert "dropped sample from grit (bad_image" in caplog.text


def test_mixing_sources_by_weight(tmp_path, tokenizer):
    write_grit_shards(tmp_path / "grit", num_shards=2, per_shard=10)
    rng = random.Random(2)
    plain = []
    for i in range(10):
        sample = shapes_sample(f"p{i}", rng)
        plain.append({"__key__": f"p{i}", "jpg": sample["jpg"], "txt": sample["txt"]})
    write_shard(tmp_path / "plain" / "00000.tar", plain, stats=False)
    write_text_jsonl(tmp_path / "text" / "part-0.jsonl", CORPUS[:12])
    sources = [
        grit_source(tmp_path / "grit", weight=2.0),
        SourceConfig(
            name="plain", kind="caption", shards=[str(tmp_path / "plain" / "*.tar")], complete_shards_only=False
        ),
        SourceConfig(name="text", kind="text", shards=[str(tmp_path / "text" / "*.jsonl")], weight=1.0),
    ]
    cfg = DataConfig(sources=sources, batch_size=8, num_workers=0, shuffle_buffer=4, max_length=128)
    loader = make_loader(cfg, tokenizer)
    batches = take(loader, 40)
    seen = [s for batch in batches for s in batch["sources"]]
    share = {name: seen.count(name) / len(seen) for name in ("grit", "plain", "text")}
    assert abs(share["grit"] - 0.5) < 0.08 and abs(share["plain"] - 0.25) < 0.08 and abs(share["text"] - 0.25) < 0.08
    # Sources repeat epoch after epoch: 320 samples from 40 of them.
    assert loader.state_dict()["workers"]["0"]["sources"]["plain"]["epoch"] >= 5
    for batch in batches:
        rows_with_image = [s != "text" for s in batch["sources"]]
        assert batch["num_images"].tolist() == [int(r) for r in rows_with_image]
        assert batch["pixel_values"].shape[0] == sum(rows_with_image)
        assert batch["image_embeds_position_mask"].sum().item() == 64 * sum(rows_with_image)
        text_rows = [i for i, s in enumerate(batch["sources"]) if s == "text"]
        for i in text_rows:
            assert batch["input_ids"][i, 0] == tokenizer.bos_id and batch["labels"][i, 0] == IGNORE_INDEX
        for i, source in enumerate(batch["sources"]):
            if source == "plain":
                assert tokenizer.grounding_id not in batch["input_ids"][i].tolist()


def test_packing(tmp_path, tokenizer):
    write_grit_shards(tmp_path / "grit", num_shards=1, per_shard=12)
    write_text_jsonl(tmp_path / "text" / "a.jsonl", CORPUS[:12])
    sources = [
        grit_source(tmp_path / "grit"),
        SourceConfig(name="text", kind="text", shards=[str(tmp_path / "text" / "a.jsonl")]),
    ]
    cfg = DataConfig(sources=sources, batch_size=2, num_workers=0, shuffle_buffer=0, max_length=256, pack=True)
    batches = take(make_loader(cfg, tokenizer), 4)
    for batch in batches:
        assert batch["input_ids"].shape[1] <= 256
        assert batch["num_images"].sum().item() == batch["pixel_values"].shape[0]
        assert batch["image_embeds_position_mask"].sum().item() == 64 * batch["pixel_values"].shape[0]
        assert (batch["num_images"] >= 2).any()  # rows hold several samples
        # Every sample in a row starts with <s>, which is never a target.
        starts = batch["input_ids"] == tokenizer.bos_id
        assert starts.sum().item() == len(batch["keys"]) and (batch["labels"][starts] == IGNORE_INDEX).all()


def test_two_ranks_read_disjoint_samples(tmp_path, tokenizer):
    write_grit_shards(tmp_path, num_shards=4, per_shard=3)
    cfg = DataConfig(sources=[grit_source(tmp_path)], batch_size=3, num_workers=0, shuffle_buffer=0)
    keys = []
    for rank in range(2):
        batches = take(make_loader(cfg, tokenizer, rank=rank, world_size=2), 2)  # one epoch of this rank's shards
        keys.append({k for batch in batches for k in batch["keys"]})
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 12


def test_config_loads_from_yaml(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text(
        "sources:\n"
        "  - {name: grit, kind: grit, shards: ['a/{00000..00009}.tar'], weight: 2}\n"
        "  - {name: text, kind: text, shards: [t.jsonl]}\n"
        "batch_size: 16\n"
        "sequence: {phrase_mode: chunk, box_score_threshold: 0.5}\n"
    )
    cfg = load_config(DataConfig, path, ["pack=true"])
    assert cfg.sources[0].weight == 2.0 and cfg.sources[1].kind == "text" and cfg.batch_size == 16 and cfg.pack
    assert cfg.sequence.phrase_mode == "chunk" and cfg.sequence.box_score_threshold == 0.5


def test_bad_config_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="sources is empty"):
        make_loader(DataConfig(), tokenizer)
    with pytest.raises(ValueError, match="kind' must be one of grit, caption, text"):
        load_config(DataConfig, None, ["sources=[{kind: video, shards: [x]}]"])
    write_shard(tmp_path / "00000.tar", [], stats=False)
    with pytest.raises(FileNotFoundError, match="no complete shard"):
        make_loader(DataConfig(sources=[grit_source(tmp_path)]), tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["keys"] == b["keys"]
        for name in ("input_ids", "labels", "attention_mask", "image_embeds_position_mask", "pixel_values"):
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(("workers", "pack", "stop"), [(2, False, 3), (0, True, 2)])
def test_resume_continues_exactly(tmp_path, tokenizer, workers, pack, stop):
    write_grit_shards(tmp_path / "grit", num_shards=3, per_shard=5)
    write_text_jsonl(tmp_path / "text" / "a.jsonl", CORPUS[:9])
    sources = [
        grit_source(tmp_path / "grit", weight=3.0),
        SourceConfig(name="text", kind="text", shards=[str(tmp_path / "text" / "a.jsonl")]),
    ]
    cfg = DataConfig(
        sources=sources,
        batch_size=3,
        num_workers=workers,
        shuffle_buffer=4,
        shuffle_initial=2,
        max_length=200,
        pack=pack,
    )
    total = 7
    uninterrupted = take(make_loader(cfg, tokenizer), total)
    first = make_loader(cfg, tokenizer)
    assert_same_batches(take(first, stop), uninterrupted[:stop])
    state = json.loads(json.dumps(first.state_dict()))  # as the trainer saves it
    assert state["batches"] == stop
    resumed = make_loader(cfg, tokenizer, state=state)
    assert_same_batches(take(resumed, total - stop), uninterrupted[stop:])
    # The resumed loader's position is the uninterrupted one's.
    again = make_loader(cfg, tokenizer)
    take(again, total)
    assert resumed.state_dict() == again.state_dict()


def test_resume_refuses_another_reader_layout(tmp_path, tokenizer):
    write_grit_shards(tmp_path, num_shards=1, per_shard=4)
    cfg = DataConfig(sources=[grit_source(tmp_path)], batch_size=2, num_workers=0)
    loader = make_loader(cfg, tokenizer)
    take(loader, 1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="world_size"):
        make_loader(cfg, tokenizer, rank=0, world_size=2, state=state)
    other = DataConfig(sources=[grit_source(tmp_path)], batch_size=2, num_workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(other, tokenizer, state=state)
