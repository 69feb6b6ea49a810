"""The reference policy (``input.references``): what a table's image column may make the build read.

Out-of-policy references are refused before anything is opened: no local file outside the table's folder is read,
no URL is requested (a local HTTP server started here must see no request), and the answer does not depend on
whether the target exists. Widened explicitly, remote reads have timeouts, a byte bound, and redirects that stay
inside the policy.
"""

from __future__ import annotations

import time

import pytest

from grit_pipeline.config import InputConfig, ReferencesConfig
from grit_pipeline.readers import InputFile, iter_samples
from grit_pipeline.readers.references import ReferenceRefused, resolve
from tests.grit_pipeline import hostile_inputs as hostile
from tests.grit_pipeline import pipeline_corpus as corpus

MAX_BYTES = 1 << 20


def read_table(path, references: ReferencesConfig | None = None, max_bytes: int = MAX_BYTES):
    cfg = InputConfig(references=references or ReferencesConfig())
    return list(iter_samples(InputFile(0, str(path), "jsonl"), cfg, max_bytes))


def test_default_policy_reads_only_under_the_tables_folder(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"SECRET-" + corpus.jpeg(1))
    with hostile.RecordingServer({"/image.jpg": b"SECRET-HTTP"}) as server:
        expected = hostile.write_reference_table(tmp_path / "table", secret, server.url, seed=2)
        t0 = time.monotonic()
        got = read_table(tmp_path / "table" / "refs.jsonl")
        assert time.monotonic() - t0 < 10  # the FIFO did not block
        assert server.requests == []  # no request at all under the default policy
    assert {s.key: s.image_problem for s in got} == expected
    assert got[0].image == corpus.jpeg(2)
    assert all(b"SECRET" not in (s.image or b"") for s in got)
    # A path outside that exists and one that does not get the same answer: existence does not leak.
    outside = [s for s in got if s.image_problem == "reference_not_allowed"]
    assert {s.detail for s in outside if "'..'" in s.detail} == {"'..' in reference"}


@pytest.mark.parametrize(
    "ref, rule",
    [
        ("/etc/hostname", "absolute path"),
        ("../x.jpg", "'..'"),
        ("a/../../x.jpg", "'..'"),
        ("file:///etc/hostname", "file://"),
        ("zip://a.jpg::file:///tmp/a.zip", "chained"),
        ("simplecache::http://127.0.0.1:1/a.jpg", "chained"),
        ("http://127.0.0.1:1/a.jpg", "http://"),
        ("HTTPS://example.com/a.jpg", "https://"),
        ("s3://bucket/a.jpg", "s3://"),
        ("memory://a.jpg", "memory://"),
        ("~/a.jpg", "absolute path"),
        ("a\x00b.jpg", "NUL"),
    ],
)
def test_references_refused_by_default(tmp_path, ref, rule):
    import fsspec

    with pytest.raises(ReferenceRefused, match=rule.replace("(", r"\(").replace("*", r"\*")):
        resolve(ref, fsspec.filesystem("file"), str(tmp_path), ReferencesConfig())


def test_allowed_roots_and_schemes_widen_the_policy(tmp_path):
    import fsspec

    images = tmp_path / "shared-images"
    images.mkdir()
    (images / "a.jpg").write_bytes(corpus.jpeg(3))
    table_dir = tmp_path / "table"
    table_dir.mkdir()
    local = fsspec.filesystem("file")
    policy = ReferencesConfig(allow_roots=[str(images), "https://cdn.example.com/img/"])
    assert resolve(str(images / "a.jpg"), local, str(table_dir), policy).path == str(images / "a.jpg")
    assert resolve("https://cdn.example.com/img/a.jpg", local, str(table_dir), policy).kind == "http"
    with pytest.raises(ReferenceRefused):
        resolve("https://cdn.example.com/imgx/a.jpg", local, str(table_dir), policy)  # a prefix, not a substring
    with pytest.raises(ReferenceRefused):
        resolve(str(tmp_path / "elsewhere.jpg"), local, str(table_dir), policy)
    with pytest.raises(ReferenceRefused):
        resolve("https://cdn.example.com/img/../../admin", local, str(table_dir), policy)
    as_url = ReferencesConfig(allow_roots=[f"file://{images}"])  # a local root may be given as a file:// URL
    assert resolve(f"file://{images}/a.jpg", local, str(table_dir), as_url).path == str(images / "a.jpg")
    assert resolve(str(images / "a.jpg"), local, str(table_dir), as_url).kind == "local"
    policy = ReferencesConfig(allow_schemes=["https"])
    assert resolve("https://anywhere.example.org/a.jpg", local, str(table_dir), policy).kind == "http"
    with pytest.raises(ReferenceRefused):
        resolve("http://anywhere.example.org/a.jpg", local, str(table_dir), policy)


def test_allowed_http_reads_have_a_byte_bound_timeouts_and_checked_redirects(tmp_path):
    image = corpus.jpeg(4)
    routes = {"/ok.jpg": image, "/big.jpg": b"x" * 5000}
    with hostile.RecordingServer(routes) as server, hostile.RecordingServer({"/inner.jpg": b"INNER"}) as inner:
        server.redirects["/hop.jpg"] = f"{inner.url}/inner.jpg"  # an allowed host bouncing to a forbidden one
        server.redirects["/file.jpg"] = "file:///etc/hostname"
        with hostile.SilentServer() as silent:
            rows = [f"{server.url}/ok.jpg", f"{server.url}/big.jpg", f"{server.url}/hop.jpg",
                    f"{server.url}/file.jpg", f"{silent.url}/slow.jpg", f"{server.url}/missing.jpg",
                    f"{server.url}/ok.jpg"]  # fmt: skip
            corpus.write_jsonl(tmp_path / "r.jsonl", [{"caption": "a dog", "image": r} for r in rows])
            policy = ReferencesConfig(allow_roots=[server.url, silent.url], connect_timeout_s=2, read_timeout_s=0.5)
            t0 = time.monotonic()
            got = read_table(tmp_path / "r.jsonl", policy, max_bytes=4000)
            elapsed = time.monotonic() - t0
    assert [s.image_problem for s in got] == [
        None,
        "image_too_many_bytes",
        "image_fetch_failed",
        "image_fetch_failed",
        "image_fetch_failed",
        "image_fetch_failed",
        None,
    ]
    assert got[0].image == image and got[-1].image == image  # rows after a timeout are read
    assert inner.requests == []  # the redirect out of the policy was not followed
    assert "timed out" in got[4].detail.lower() and elapsed < 10


def test_an_allowed_protocol_without_its_back_end_fails_that_row_only(tmp_path):
    (tmp_path / "a.jpg").write_bytes(corpus.jpeg(5))
    rows = [{"caption": "a dog", "image": "nosuchproto://bucket/a.jpg"}, {"caption": "a dog", "image": "a.jpg"}]
    corpus.write_jsonl(tmp_path / "r.jsonl", rows)
    got = read_table(tmp_path / "r.jsonl", ReferencesConfig(allow_schemes=["nosuchproto"]))
    assert [s.image_problem for s in got] == ["image_fetch_failed", None]
    assert "nosuchproto" in got[0].detail and got[1].image == corpus.jpeg(5)
