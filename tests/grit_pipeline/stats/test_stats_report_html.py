"""The report page: self-contained, escaped, and shown as intended by a real headless Chromium."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from stats_corpus_factory import HOSTILE_CAPTIONS, make_corpus, spec_from_phrases

from grit_pipeline.cli import main as grit_main
from grit_pipeline.stats.gallery import Phrase, caption_html, draw_thumbnail, read_members

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# A chunk that is itself markup, so box labels, highlight titles and alt text all carry it.
IMG_CHUNK = '<img src=x onerror="window.__grit_pwned_img = 1">'


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    specs = (
        spec_from_phrases(HOSTILE_CAPTIONS[0], [("a dog", "a dog"), ("the mat", 'a "cat" on the mat')]),
        spec_from_phrases(HOSTILE_CAPTIONS[1], [(IMG_CHUNK, IMG_CHUNK), ("a 'red' table", "a 'red' table")]),
    )
    facts = make_corpus(root, shards=1, inputs_per_shard=8, seed=11, extra_captions=specs)
    out = root / "report"
    # Enough samples for every kept record, so both hostile captions are in the gallery.
    assert grit_main(["stats", str(root), "--out", str(out), "--samples", "100"]) == 0
    return out / "report.html", len(facts.records)


def test_html_is_self_contained_and_escaped(hostile_report):
    html = hostile_report[0].read_text(encoding="utf-8")
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert "&lt;script&gt;window.__grit_pwned = 1&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&quot;window.__grit_pwned_img = 1&quot;&gt;" in html
    # Nothing is fetched: no URLs in src/href attributes other than inline data, no CSS urls, no imports.
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", html, re.I)
    assert "url(" not in html and "@import" not in html and "<link" not in html
    assert "Content-Security-Policy" in html


def test_caption_html_escapes_every_piece():
    caption = '<b>x</b> & a "dog" <i>'
    phrases = [Phrase(11, 18, 'a "dog"', [[0, 0, 1, 1, 0.5]], "#e6194b"), Phrase(0, 8, "<b>x</b>", [], "#3cb44b")]
    out = caption_html(caption, phrases)
    assert out.count("<mark") == 2 and "<b>" not in out and "<i>" not in out
    assert "&lt;b&gt;x&lt;/b&gt;" in out and "a &quot;dog&quot;" in out and out.endswith(" &lt;i&gt;")


def test_thumbnails_and_member_reading(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (80, 40), "white").save(buf, format="PNG")
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("k1.png", buf.getvalue()), ("k1.json", b"{}"), ("k2.jpg", b"not an image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = read_members(tar_path, {"k1": "png", "k2": None, "k3": None})
    assert got["k1"] == buf.getvalue() and got["k2"] == b"not an image" and "no image member" in got["k3"]
    thumb = draw_thumbnail(got["k1"], [Phrase(0, 1, "a", [[0.1, 0.1, 0.5, 0.9, 0.7]], "#e6194b")], max_side=160)
    assert thumb.size == (160, 80)
    assert thumb.getpixel((16, 40)) != (255, 255, 255)  # the box's left edge is drawn


def test_report_shows_broken_images_as_problems(tmp_path):
    root = tmp_path / "corpus"
    facts = make_corpus(root, shards=1, inputs_per_shard=6, seed=5)
    tar_path = root / "00000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            if m.name.startswith(facts.records[0].key + ".") and not m.name.endswith((".json", ".txt")):
                data = b"garbage"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    assert grit_main(["stats", str(root), "--out", str(tmp_path / "r"), "--samples", "50"]) == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "image does not decode" in html


def test_report_in_headless_chromium(hostile_report):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary on this machine (CI installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    path, kept = hostile_report
    console, page_errors, requests = [], [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri(), wait_until="load")
            widths = page.eval_on_selector_all(
                "figure.sample img", "els => els.map(e => e.complete && e.naturalWidth)"
            )
            flags = page.evaluate("[typeof window.__grit_pwned, typeof window.__grit_pwned_img]")
            scripts = page.evaluate("document.querySelectorAll('script').length")
            all_imgs = page.evaluate("document.querySelectorAll('img').length")
            text = page.evaluate("document.body.textContent")
            captions = page.eval_on_selector_all("figure.sample .caption", "els => els.map(e => e.textContent)")
        finally:
            browser.close()
    assert not [m for m in console if m[0] in ("error", "warning")], console
    assert not page_errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert len(widths) == kept and all(w and w > 0 for w in widths), widths
    assert all_imgs == kept  # no <img> smuggled in by a caption
    assert flags == ["undefined", "undefined"] and scripts == 0
    assert HOSTILE_CAPTIONS[0] in captions and HOSTILE_CAPTIONS[1] in captions
    assert "<script>window.__grit_pwned = 1</script>" in text and IMG_CHUNK in text
