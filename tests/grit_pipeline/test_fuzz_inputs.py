"""Fuzzing the untrusted-input paths with hypothesis: image decode, and each reader on mutated bytes.

The property is the one a build relies on: no exception escapes per-sample handling. ``process_image`` always
returns a result (kept, or dropped with a reason); ``stages.read_file_rows`` (the reader as the build runs it) never
raises, and its rows always convert to the work schema's Arrow table, so every text field is valid UTF-8. For JSONL
and parquet, a mutation inside one row never costs another row.

The budget is fixed and the examples are derandomised, so CI runs the same cases every time (well under a minute);
``GRIT_FUZZ_EXAMPLES=N`` scales every test's budget for a longer local run.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from grit_pipeline.config import GritConfig, ImageConfig
from grit_pipeline.image import ImageResult, process_image
from grit_pipeline.readers import InputFile
from grit_pipeline.stages import read_file_rows, to_table
from tests.grit_pipeline import pipeline_corpus as corpus

SCALE = float(os.environ.get("GRIT_FUZZ_EXAMPLES", "0") or 0) / 100 or 1.0
IMAGE_CFG = ImageConfig(max_pixels=4_000_000, decode_timeout_s=5.0, min_side=1)


def budget(n: int):
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


def _seeds() -> list[bytes]:
    pic = corpus.picture(1, 40, 32)
    out = [corpus.encode(pic, fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")]
    out.append(corpus.png16(2, 40, 32))
    out.append(corpus.exif_rotated_jpeg(3, 40, 32))
    out.append(corpus.animated_gif(4))
    out.append(corpus.encode(pic.convert("F"), "TIFF"))
    out.append(corpus.encode(pic, "TIFF", compression="tiff_lzw"))
    # Formats outside the allow-list: a mutation fuzzer found plugins for these raising NotImplementedError,
    # RuntimeError, AttributeError... They must stay refused, whatever their bytes become.
    out += [corpus.encode(pic, fmt) for fmt in ("DDS", "ICO", "TGA", "PCX", "SGI", "IM")]
    out += [corpus.encode(pic.convert("P"), "BLP"), corpus.encode(pic.convert("F"), "SPIDER")]
    return out


SEEDS = _seeds()


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed file with a few byte flips, inserted or deleted runs, or a truncation."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "truncate")))
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.sampled_from((0x00, 0xFF, 0x7F, 0x80)))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


@budget(300)
@given(data=mutated(SEEDS))
def test_image_decode_never_raises(data):
    r = process_image(data, IMAGE_CFG, (64, 96))
    assert isinstance(r, ImageResult)
    if r.drop_reason is None:
        assert r.data and r.ext in ("jpg", "png", "webp") and r.rgb.mode == "RGB"
        assert Image.open(io.BytesIO(r.data)).size == (r.width, r.height)
    else:
        assert r.data is None and r.rgb is None


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------


def rows_of(path, fmt: str) -> list[dict]:
    cfg = GritConfig()
    cfg.input.max_text_bytes = 4096
    rows = [row for batch in read_file_rows(InputFile(0, str(path), fmt), cfg) for row in batch]
    to_table(rows)  # every field fits the schema: valid UTF-8 text, right types
    json.dumps([r.get("source") for r in rows])
    assert rows[-1]["kind"] == "eof"
    return [r for r in rows if r["kind"] == "sample"]


def _tar_seed() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for s in corpus.good_samples(3, seed=5):
            corpus.add_member(tf, f"{s['key']}.jpg", corpus.jpeg(7, 32, 32))
            corpus.add_member(tf, f"{s['key']}.txt", s["caption"].encode())
            corpus.add_member(tf, f"{s['key']}.json", json.dumps(s["meta"]).encode())
    return buf.getvalue()


TAR = _tar_seed()


@budget(150)
@given(data=mutated([TAR]))
def test_tar_reader_never_raises_on_mutated_archives(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("tar") / "m.tar"
    path.write_bytes(data)
    rows_of(path, "webdataset")


LINE_VALUES = st.one_of(
    st.text(max_size=40),
    st.integers(),
    st.floats(allow_nan=True),
    st.none(),
    st.lists(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
ROW = st.fixed_dictionaries(
    {},
    optional={
        "caption": LINE_VALUES,
        "image": LINE_VALUES | st.sampled_from(["a.jpg", "../a.jpg", "/etc/hostname", "http://127.0.0.1:9/x"]),
        "key": LINE_VALUES,
        "id": LINE_VALUES,
        "url": LINE_VALUES,
        "annotations": LINE_VALUES,
        "clip_similarity_vitb32": LINE_VALUES,
    },
)


@budget(150)
@given(
    rows=st.lists(ROW, min_size=1, max_size=6),
    garbage=st.lists(st.binary(max_size=60).filter(lambda b: b"\n" not in b and b.strip()), max_size=3),
)
def test_jsonl_reader_keeps_one_row_per_line_whatever_the_lines_hold(tmp_path_factory, rows, garbage):
    folder = tmp_path_factory.mktemp("jsonl")
    (folder / "a.jpg").write_bytes(corpus.jpeg(8, 32, 32))
    lines = [json.dumps(r).encode() for r in rows] + list(garbage)  # json.dumps escapes lone surrogates as \ud800
    (folder / "r.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    got = rows_of(folder / "r.jsonl", "jsonl")
    assert len(got) == len(lines)  # every line is a sample: kept, pending or dropped, never lost
    assert all(r.get("drop_reason") != "bad_input" for r in got)


@budget(100)
@given(
    captions=st.lists(st.binary(max_size=40), min_size=1, max_size=8),
    images=st.lists(st.binary(max_size=64) | st.sampled_from([b"", corpus.jpeg(9, 32, 32)]), min_size=1, max_size=8),
    group=st.integers(1, 4),
)
def test_parquet_reader_keeps_every_row_whatever_its_bytes(tmp_path_factory, captions, images, group):
    n = min(len(captions), len(images))
    table = pa.table(
        {
            "caption": pa.array(captions[:n], type=pa.binary()).view(pa.string()),  # any bytes, UTF-8 or not
            "key": pa.array(captions[:n][::-1], type=pa.binary()).view(pa.string()),
            "image": images[:n],
        }
    )
    path = tmp_path_factory.mktemp("pq") / "t.parquet"
    pq.write_table(table, path, row_group_size=group)
    got = rows_of(path, "parquet")
    assert len(got) == n and all(r.get("drop_reason") != "bad_input" for r in got)


def _parquet_seed() -> bytes:
    buf = io.BytesIO()
    table = pa.table(
        {"caption": ["a dog", "a cat", "a cow", "a fox"], "image": [corpus.jpeg(i, 32, 32) for i in range(4)]}
    )
    pq.write_table(table, buf, row_group_size=2)
    return buf.getvalue()


@budget(100)
@given(data=mutated([_parquet_seed()]))
def test_parquet_reader_never_raises_on_mutated_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("pqm") / "m.parquet"
    path.write_bytes(data)
    rows_of(path, "parquet")


@budget(60)
@given(
    caption=st.binary(max_size=80),
    meta=st.binary(max_size=80) | st.just(b'{"id": "\\ud800", "url": "\\udfff"}'),
    image=mutated([corpus.jpeg(10, 32, 32)]),
)
def test_image_folder_reader_never_raises(tmp_path_factory, caption, meta, image):
    folder = tmp_path_factory.mktemp("folder")
    (folder / "a.jpg").write_bytes(image)
    (folder / "a.txt").write_bytes(caption)
    (folder / "a.json").write_bytes(meta)
    (folder / "b.jpg").write_bytes(corpus.jpeg(11, 32, 32))
    got = rows_of(folder, "images")
    assert len(got) == 2 and got[1].get("drop_reason") is None
