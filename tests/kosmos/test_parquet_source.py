"""`kosmos train`'s loader on GRIT parquet files with the images inside (the layout of Hub mirrors of GRIT-20M),
written by Hugging Face `datasets` and by pyarrow; and clear refusals for parquet it cannot use."""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from kosmos_shards import shapes_sample, write_shard
from PIL import Image

from kosmos.cli import main
from kosmos.data.loader import DataConfig, SourceConfig, make_loader
from kosmos.data.location import box_to_patch_indices
from kosmos.data.parquet import ParquetSourceError
from kosmos.data.sequence import parse_generated_ids, remap_box_to_crop
from kosmos.data.transform import clip_transform

REPO = Path(__file__).resolve().parents[2]


def grit_rows(n: int, seed: int = 0) -> list[dict]:
    """GRIT-20M's columns (floats in the entry lists, as the release stores them) plus the encoded image."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sample = shapes_sample(f"{i:09d}", rng)
        record = json.loads(sample["json"])
        entries = [[float(v) for v in e] for e in record["ref_exps"]]
        rows.append(
            {
                "clip_similarity_vitb32": 0.3,
                "clip_similarity_vitl14": 0.3,
                "id": 1000 + i,
                "url": f"https://example.com/{i}.jpg",
                "caption": record["caption"],
                "width": 320,
                "height": 240,
                "noun_chunks": entries,
                "ref_exps": entries,
                "key": f"{i:09d}",
                "jpg": sample["jpg"],
            }
        )
    return rows


def write_with_datasets(path, rows) -> None:
    """The Hub layout: `datasets` with an Image feature (a struct of bytes and path in the parquet file)."""
    datasets = pytest.importorskip("datasets")
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "jpg"}
    columns["image"] = [{"bytes": r["jpg"], "path": None} for r in rows]
    features = datasets.Features(
        {
            **{k: datasets.Value("float64") for k in ("clip_similarity_vitb32", "clip_similarity_vitl14")},
            "id": datasets.Value("int64"),
            "url": datasets.Value("string"),
            "caption": datasets.Value("string"),
            "width": datasets.Value("int64"),
            "height": datasets.Value("int64"),
            "noun_chunks": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
            "ref_exps": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
            "key": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))


def loader_for(shards, tokenizer, kind="grit", **kw):
    cfg = DataConfig(
        sources=[SourceConfig(name="p", kind=kind, shards=[str(s) for s in shards])],
        batch_size=kw.pop("batch_size", 3),
        num_workers=kw.pop("num_workers", 0),
        shuffle_buffer=0,
        shuffle_shards=False,
        **kw,
    )
    cfg.sequence.use_grounding_prob = 1.0
    return make_loader(cfg, tokenizer)


def test_a_hub_style_parquet_gives_the_batches_of_the_same_tar(tmp_path, tokenizer):
    rows = grit_rows(6)
    write_with_datasets(tmp_path / "train-00000-of-00001.parquet", rows)
    loader = loader_for([tmp_path / "train-00000-of-00001.parquet"], tokenizer)
    batches = list(itertools.islice(iter(loader), 2))
    assert [k for b in batches for k in b["keys"]] == [r["key"] for r in rows]
    assert loader.counts["kept"] == 6 and loader.counts["grounded"] == 6
    first, batch = rows[0], batches[0]
    assert torch.equal(batch["pixel_values"][0], clip_transform(Image.open(io.BytesIO(first["jpg"]))))
    n = int(batch["attention_mask"][0].sum())
    clean, entities = parse_generated_ids(batch["input_ids"][0, :n].tolist(), tokenizer)
    assert clean == first["caption"] and len(entities) == 2
    for entry in first["ref_exps"]:
        ul, lr = box_to_patch_indices(remap_box_to_crop(entry[2:6], 320, 240))
        assert tokenizer.loc_token_id(ul) in batch["input_ids"][0].tolist()
    # The same samples as a WebDataset tar give the same token ids.
    tar = [{"__key__": r["key"], "jpg": r["jpg"], "json": json.dumps(r | {"jpg": None}).encode()} for r in rows]
    write_shard(tmp_path / "tar" / "00000.tar", tar)
    from_tar = next(iter(loader_for([tmp_path / "tar" / "00000.tar"], tokenizer)))
    assert torch.equal(from_tar["input_ids"], batch["input_ids"])


def test_a_plain_binary_image_column_and_bad_rows(tmp_path, tokenizer):
    rows = grit_rows(4, seed=1)
    rows[1]["jpg"] = b"\xff\xd8 not a jpeg"
    rows[2]["jpg"] = None
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "key"} for r in rows])
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=2)
    loader = loader_for([tmp_path / "part.parquet"], tokenizer, batch_size=2)
    batch = next(iter(loader))
    assert batch["keys"] == ["1000", "1003"]  # keyed by the id column when there is no key column
    assert loader.counts["dropped_bad_image"] == 1 and loader.counts["dropped_missing_image"] == 1


def test_parquet_it_cannot_use_is_refused_with_the_reason(tmp_path, tokenizer):
    rows = grit_rows(2)
    url_only = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "jpg"} for r in rows])
    pq.write_table(url_only, tmp_path / "urls.parquet")
    with pytest.raises(ParquetSourceError, match="no column of image bytes.*download the images first"):
        loader_for([tmp_path / "urls.parquet"], tokenizer)
    no_boxes = pa.Table.from_pylist([{"caption": r["caption"], "jpg": r["jpg"]} for r in rows])
    pq.write_table(no_boxes, tmp_path / "captions.parquet")
    with pytest.raises(ParquetSourceError, match="no noun_chunks or ref_exps"):
        loader_for([tmp_path / "captions.parquet"], tokenizer)
    assert next(iter(loader_for([tmp_path / "captions.parquet"], tokenizer, kind="caption", batch_size=2)))
    no_caption = pa.Table.from_pylist([{"jpg": r["jpg"], "ref_exps": r["ref_exps"]} for r in rows])
    pq.write_table(no_caption, tmp_path / "nocaption.parquet")
    with pytest.raises(ParquetSourceError, match="no 'caption' text column"):
        loader_for([tmp_path / "nocaption.parquet"], tokenizer)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not really one")
    with pytest.raises(ParquetSourceError, match="not a readable parquet file"):
        loader_for([tmp_path / "broken.parquet"], tokenizer)
    (tmp_path / "misnamed.tar").write_bytes((tmp_path / "captions.parquet").read_bytes())
    with pytest.raises(ParquetSourceError, match="is a parquet file: name it"):
        loader_for([tmp_path / "misnamed.tar"], tokenizer, kind="caption")


def test_kosmos_train_reports_unusable_parquet_without_a_traceback(tmp_path, tokenizer, capsys):
    rows = grit_rows(2)
    pq.write_table(
        pa.Table.from_pylist([{k: v for k, v in r.items() if k != "jpg"} for r in rows]), tmp_path / "g.parquet"
    )
    tokenizer.save_pretrained(tmp_path / "tok")
    code = main(
        [
            "train",
            "--config", str(REPO / "configs/train/tiny-cpu.yaml"),
            "--set", f"tokenizer={tmp_path / 'tok'}",
            "--set", f"data.sources=[{{kind: grit, shards: [{tmp_path / 'g.parquet'}]}}]",
            "--set", f"run.output_dir={tmp_path / 'run'}",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "g.parquet: no column of image bytes" in err and "Traceback" not in err
