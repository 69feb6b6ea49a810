"""The gallery on images it cannot show: it says so for that sample, and ``grit stats`` completes."""

from __future__ import annotations

import io
import tarfile

import pytest
from PIL import Image, PngImagePlugin
from stats_corpus_factory import make_corpus

from grit_pipeline.cli import main as grit_main
from grit_pipeline.stats.gallery import build_gallery

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\n%%EOF\n"


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _row(key: str) -> dict:
    return {"key": key, "shard": "00000", "caption": "a dog", "width": 64, "height": 48, "image_ext": "png"}


@pytest.mark.parametrize("exc_type", [NotImplementedError, RuntimeError, AttributeError, MemoryError])
def test_an_image_whose_decoder_raises_anything_is_skipped_with_its_reason(tmp_path, monkeypatch, exc_type):
    _tar(tmp_path / "00000.tar", {"bad.png": _png("red"), "good.jpg": b""})
    real_load = PngImagePlugin.PngImageFile.load

    def load(self):
        if self.size == (64, 48):
            raise exc_type("decoder blew up")
        return real_load(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    (item,) = build_gallery([_row("bad")], lambda shard: tmp_path / "00000.tar")
    assert item.image_uri is None and exc_type.__name__ in item.problem


def test_eps_and_other_formats_are_never_decoded_for_a_thumbnail(tmp_path):
    _tar(tmp_path / "00000.tar", {"eps.png": EPS, "ok.png": _png("blue")})
    eps, ok = build_gallery([_row("eps"), _row("ok")], lambda shard: tmp_path / "00000.tar")
    assert eps.image_uri is None and "UnidentifiedImageError" in eps.problem
    assert ok.image_uri and ok.problem is None


def test_grit_stats_completes_on_a_shard_with_an_undecodable_image(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    facts = make_corpus(root, shards=1, inputs_per_shard=6, seed=5)
    # Every PNG decoder call raises a non-OSError exception: the report must still be written.
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: (_ for _ in ()).throw(RuntimeError("x")))
    from PIL import JpegImagePlugin

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", lambda self: (_ for _ in ()).throw(RuntimeError("x")))
    assert grit_main(["stats", str(root), "--out", str(tmp_path / "r"), "--samples", "50"]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "image does not decode: RuntimeError" in html
    assert facts.records
