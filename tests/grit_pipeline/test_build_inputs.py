"""Malformed and hostile inputs through the whole pipeline, and boxes that come with the input (annotations).

The job completes; every good sample is kept; every bad one is counted under its reason; nothing is written outside
the output folder.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image

from grit_core.record import validate_record
from grit_pipeline.readers import make_key
from tests.grit_pipeline import pipeline_corpus as corpus
from tests.grit_pipeline.conftest import build_args, read_output, run_cli, stats_checks

GOOD_CAPTION = "a brown dog running on the beach"


def malformed_samples() -> tuple[list[dict], dict[str, str | None]]:
    """Samples of one tar, and for each key the expected drop reason (None: kept)."""
    c = GOOD_CAPTION
    samples = [
        ("good-jpeg", corpus.jpeg(1), "jpg", c, None),
        ("truncated", corpus.truncated(corpus.jpeg(2, 200, 150)), "jpg", c, "bad_image"),
        ("zero-bytes", b"", "jpg", c, "bad_image"),
        ("not-an-image", b"<html>a picture of a dog</html>", "jpg", c, "bad_image"),
        ("bomb", corpus.huge_declared_png(), "png", c, "image_too_large"),
        ("tiny", corpus.jpeg(3, 20, 20), "jpg", c, "image_too_small"),
        ("cmyk", corpus.cmyk_jpeg(4), "jpg", c, None),
        ("sixteen-bit", corpus.png16(5), "png", c, None),
        ("palette", corpus.palette_png(6), "png", c, None),
        ("rotated", corpus.exif_rotated_jpeg(7), "jpg", c, None),
        ("animated", corpus.animated_gif(8), "gif", c, None),
        ("no-caption", corpus.jpeg(9), "jpg", None, "missing_caption"),
        ("empty-caption", corpus.jpeg(10), "jpg", " \n\t\u200b ", "empty_caption"),
        ("no-chunks", corpus.jpeg(11), "jpg", "hello", "no_noun_chunks"),
        ("no-chunks-bad-image", b"garbage", "jpg", "hello", "bad_image"),  # image rules come before chunks
        ("dir/photo.v2", corpus.jpeg(12), "jpg", c, None),
        ("no-image", None, "jpg", c, "missing_image"),
    ]
    expected = {make_key(key): reason for key, _, _, _, reason in samples}
    tar_samples = [{"key": k, "image": img, "ext": ext, "caption": cap} for k, img, ext, cap, _ in samples]
    return tar_samples, expected


def test_malformed_and_hostile_inputs(ray_session, build_overrides, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    samples, expected = malformed_samples()
    corpus.write_tar(inputs / "00000.tar", samples)
    good = corpus.good_samples(4, seed=40)
    corpus.write_hostile_tar(inputs / "00001.tar", good)
    expected.update({g["key"]: None for g in good})
    cwd_before = set(os.listdir(Path.cwd()))
    parent_before = set(os.listdir(tmp_path))

    out = tmp_path / "out"
    # Each input's own format is kept (output.image_format=original), so the image rules' conversions show.
    extra = ["output.samples_per_shard=50", "output.image_format=original"]
    code, text = run_cli(build_args([str(inputs)], out, build_overrides, extra))
    assert code == 0, text
    got = read_output(out)
    rows = got["rows"]
    refused = [k for k, r in rows.items() if r["drop_reason"] == "unsafe_member"]
    assert len(refused) == 7
    rest = {k: r["drop_reason"] for k, r in rows.items() if r["drop_reason"] != "unsafe_member"}
    assert rest == expected
    assert set(got["records"]) == {k for k, reason in expected.items() if reason is None}
    for rec in got["records"].values():
        validate_record(rec, check_order=True)

    counts = got["manifest"]["totals"]
    assert counts["input"] == len(rows) and counts["kept"] == len(got["records"])
    want = Counter(reason for reason in expected.values() if reason) + Counter({"unsafe_member": 7})
    assert {k[8:]: v for k, v in counts.items() if k.startswith("dropped_")} == dict(want)
    assert counts["images_exif_reencoded"] == 1 and counts["images_converted_png"] == 1
    checks = stats_checks(out, tmp_path / "report")
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]

    # The rotated JPEG is stored upright; the GIF became a PNG; the 16-bit PNG is stored as it came.
    with tarfile.open(out / "00000-00000.tar") as tf:
        names = tf.getnames()
        rotated = Image.open(io.BytesIO(tf.extractfile("rotated.jpg").read()))
        assert rotated.size == (64, 96) and rotated.getexif().get(0x0112, 1) == 1
        assert "animated.png" in names and "animated.gif" not in names
        assert tf.extractfile("sixteen-bit.png").read() == corpus.png16(5)
    assert got["records"]["rotated"]["width"] == 64 and got["records"]["rotated"]["height"] == 96

    # Nothing was written outside the output folder.
    assert set(os.listdir(tmp_path)) == parent_before | {"out", "report"}
    assert set(os.listdir(Path.cwd())) == cwd_before
    assert not os.path.exists("/tmp/absolute-escape.jpg")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "up.txt").exists()


def test_a_truncated_tar_leaves_the_build_incomplete_and_names_the_file(ray_session, build_overrides, tmp_path):
    """The rest of a truncated tar is unknown (bad_input): its shard is not marked complete, the build says so."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    corpus.write_tar(inputs / "00000.tar", corpus.good_samples(3, seed=42))
    full = corpus.write_tar(tmp_path / "full.tar", corpus.good_samples(4, seed=41))
    with tarfile.open(full) as tf:
        offsets = {m.name: m.offset_data for m in tf}
    third = corpus.good_samples(4, seed=41)[2]["key"]
    (inputs / "00001.tar").write_bytes(full.read_bytes()[: offsets[f"{third}.jpg"] + 50])  # inside the 3rd image
    out = tmp_path / "out"
    code, text = run_cli(build_args([str(inputs)], out, build_overrides, ["output.samples_per_shard=50"]))
    assert code == 1, text
    assert "00001.tar" in text and "not marked complete" in text, text
    assert json.loads((out / "manifest.json").read_text())["status"] == "incomplete"
    assert (out / "00000-00000_stats.json").exists() and not (out / "00001-00000_stats.json").exists()


def test_annotations_become_the_records_boxes(ray_session, build_overrides, tmp_path):
    """Boxes given with the input (spans into the raw caption) go through the same writer as detector boxes."""
    (tmp_path / "img").mkdir()
    rows = []
    raw = "A  man in a blue shirt\triding a horse"
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(corpus.jpeg(60 + i))
    rows.append(
        {
            "caption": raw,
            "image": "img/0.jpg",
            "annotations": [
                {"start": 0, "end": raw.index("\triding"), "box": [0.1, 0.2, 0.4, 0.9]},
                {"start": raw.index("a horse"), "end": len(raw), "box": [0.3, 0.4, 0.9, 1.0], "score": 0.8},
            ],
        }
    )
    rows.append({"caption": "a red circle and a blue square", "image": "img/1.jpg"})
    rows[1]["annotations"] = [{"phrase": "blue square", "box": [0.5, 0.5, 0.7, 0.7]}]
    rows.append({"caption": "a green triangle", "image": "img/2.jpg", "annotations": []})
    corpus.write_jsonl(tmp_path / "shapes.jsonl", rows)
    out = tmp_path / "out"
    args = build_args([str(tmp_path / "shapes.jsonl")], out, build_overrides, ["detector.kind=annotations"])
    code, text = run_cli(args)
    assert code == 0, text
    got = read_output(out)
    assert got["manifest"]["detector"]["kind"] == "annotations"
    first = got["records"]["shapes_000000000"]
    assert first["caption"] == "A man in a blue shirt riding a horse"
    spans = [(e[0], e[1], e[2:]) for e in first["noun_chunks"]]
    # "A man in a blue shirt" goes to its head chunk "A man"; "a horse" to itself; offsets follow normalisation.
    assert spans == [(0, 5, [0.1, 0.2, 0.4, 0.9, 1.0]), (29, 36, [0.3, 0.4, 0.9, 1.0, 0.8])]
    assert first["ref_exps"][0][:2][0] == 0 and first["ref_exps"][0][1] >= 21  # the man's expression
    second = got["records"]["shapes_000000001"]
    assert [(e[0], e[1]) for e in second["noun_chunks"]] == [(17, 30)]
    assert got["rows"]["shapes_000000002"]["drop_reason"] == "no_grounded_phrase"


REPO = Path(__file__).resolve().parents[2]


def test_demo_config_with_the_offline_random_detector(ray_session, spacy_model_name, tmp_path, monkeypatch):
    """``make demo OFFLINE=1``: the bundled photographs, the default detector unavailable, random weights opted in."""
    monkeypatch.chdir(REPO)  # the demo config names its input relative to the repository, as make runs it
    examples_dir = REPO / "examples"
    out = tmp_path / "demo"
    args = ["--config", "configs/demo.yaml", "--output", str(out), "--offline-random-detector"]
    args += ["--set", f"text.spacy_model={spacy_model_name}", "--set", "detector.model=/nonexistent/grounding-dino"]
    code, text = run_cli(args)
    assert code == 0, text
    assert "RANDOM" in text and "meaningless" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["detector"]["random_weights"] is True
    assert any("meaningless" in w for w in manifest["warnings"])
    n_examples = len([p for p in examples_dir.iterdir() if p.suffix in (".jpg", ".png")])
    assert manifest["totals"]["input"] == n_examples >= 5


def _bad_image_tar(path: Path) -> dict[str, str | None]:
    """Images that once failed a build or ran a program: EPS named .jpg, formats outside the allow-list, a 32-bit
    integer TIFF (valid: kept), a lone surrogate in the metadata."""
    import numpy as np

    from tests.grit_pipeline.hostile_inputs import EPS

    ramp = (np.tile(np.linspace(0, 1, 96), (64, 1)) * 2_000_000_000).astype(np.int32)
    samples = [
        {"key": "eps", "image": EPS, "ext": "jpg", "caption": GOOD_CAPTION},
        {"key": "dds", "image": corpus.encode(corpus.picture(70), "DDS"), "ext": "jpg", "caption": GOOD_CAPTION},
        {"key": "spider", "image": corpus.encode(corpus.picture(71).convert("F"), "SPIDER"), "caption": GOOD_CAPTION},
        {"key": "tiff32", "image": corpus.encode(Image.fromarray(ramp), "TIFF"), "ext": "tif",
         "caption": GOOD_CAPTION},
        {"key": "surrogate-meta", "image": corpus.jpeg(72), "caption": GOOD_CAPTION,
         "meta": {"url": "https://x/\ud800", "id": "\udfff"}},
        {"key": "after", "image": corpus.jpeg(73), "caption": GOOD_CAPTION},
    ]  # fmt: skip
    corpus.write_tar(path, samples)
    reasons = {"eps": "bad_image", "dds": "bad_image", "spider": "bad_image"}
    return {make_key(s["key"]): reasons.get(s["key"]) for s in samples}


def test_web_scale_hostile_corpus(ray_session, build_overrides, tmp_path):
    """Every input case of GRIT_SPEC 3.0 in one build, mixed with good samples: the build exits 0, every good
    sample is kept (also after a bad row of the same file), every bad one is dropped with its reason, the bytes of
    a file outside the input never reach the output, and a local HTTP server named by a row gets no request."""
    import time

    from tests.grit_pipeline import hostile_inputs as hostile

    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"SECRET-" + corpus.jpeg(80))
    inputs = tmp_path / "in"
    (inputs / "wds").mkdir(parents=True)
    (inputs / "surrogates").mkdir()
    (inputs / "pq").mkdir()
    (inputs / "surrogates" / "a.jpg").write_bytes(corpus.jpeg(81))
    expected: dict[str, str | None] = {}
    expected |= hostile.write_non_utf8_tar(inputs / "wds" / "00000.tar", seed=82)
    expected |= _bad_image_tar(inputs / "wds" / "00001.tar")
    expected |= hostile.write_surrogate_jsonl(inputs / "surrogates" / "s.jsonl", "a.jpg")
    expected |= hostile.write_hostile_parquet(inputs / "pq" / "h.parquet", seed=90)
    expected |= hostile.make_hostile_folder(inputs / "folder", secret, seed=100)
    with hostile.RecordingServer({"/image.jpg": b"SECRET-HTTP"}) as server:
        expected |= hostile.write_reference_table(inputs / "table", secret, server.url, seed=110)
        out = tmp_path / "out"
        patterns = [str(inputs / d) for d in ("wds", "surrogates", "pq", "folder")] + [
            str(inputs / "table" / "refs.jsonl")
        ]
        t0 = time.monotonic()
        code, text = run_cli(build_args(patterns, out, build_overrides, ["output.samples_per_shard=50"]))
        elapsed = time.monotonic() - t0
        assert server.requests == []
    assert code == 0, text
    assert elapsed < 300
    got = read_output(out)
    assert {k: r["drop_reason"] for k, r in got["rows"].items()} == expected
    assert set(got["records"]) == {k for k, reason in expected.items() if reason is None}
    for rec in got["records"].values():
        validate_record(rec, check_order=True)
    assert "\ufffd" in got["records"][make_key("surrogate-meta")]["url"]
    details = {k: r["detail"] or "" for k, r in got["rows"].items()}  # the exception's type is in the index
    assert details[make_key("eps")].startswith("UnidentifiedImageError") and "0x" not in details[make_key("eps")]
    assert "row group 1 unreadable: OSError" in details["h_000000004"]
    assert details["refs_000000001"] == "absolute path outside input.references.allow_roots"
    assert got["manifest"]["status"] == "complete"
    for path in out.rglob("*"):
        if path.is_file():
            assert b"SECRET" not in path.read_bytes(), path
    checks = stats_checks(out, tmp_path / "report")
    assert all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
