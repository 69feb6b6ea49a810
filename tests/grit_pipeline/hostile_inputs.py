"""Inputs that real crawls contain and that once stopped or misled a build (issue cases of GRIT_SPEC 3.0).

Each builder writes one input file (or folder) and returns, for every sample it holds, the key it will have and the
drop reason expected (None: kept). Secrets outside the input are written by the caller, so tests can check their
bytes never reach an output. Used by the reader tests, the reference-policy tests, the fuzz harness and the
hostile-corpus build test.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from grit_pipeline.readers import generated_key, make_key
from tests.grit_pipeline import pipeline_corpus as corpus

CAPTION = "a brown dog running on the beach"
SURROGATE = "\ud800"
# A real EPS file: plain Pillow opens it as EPS and runs Ghostscript to decode it.
EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 64 64
%%EndComments
newpath 0 0 moveto 64 64 lineto stroke
showpage
%%EOF
"""


# ---------------------------------------------------------------------------------------------------------------
# A local HTTP server that records every request (and a silent one that never answers)
# ---------------------------------------------------------------------------------------------------------------


class RecordingServer:
    """An HTTP server on 127.0.0.1 (free port) serving ``routes``; ``requests`` lists every path asked for."""

    def __init__(self, routes: dict[str, bytes] | None = None, redirects: dict[str, str] | None = None):
        self.routes = dict(routes or {})
        self.redirects = dict(redirects or {})
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                server.requests.append(self.path)
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.end_headers()
                    return
                body = server.routes.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte: a read without a timeout hangs for ever."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self.stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)
            except OSError:
                continue

    def __enter__(self) -> SilentServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop = True
        self.thread.join(timeout=2)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


# ---------------------------------------------------------------------------------------------------------------
# Text that is not valid UTF-8
# ---------------------------------------------------------------------------------------------------------------


def write_surrogate_jsonl(path: Path, image: str) -> dict[str, str | None]:
    """JSONL rows whose caption, url, id, key and annotation hold lone surrogates (valid JSON, invalid UTF-8)."""
    rows = [
        {"caption": f"a dog {SURROGATE} on the beach", "image": image, "url": f"https://x/{SURROGATE}", "id": "i"},
        {"caption": CAPTION, "image": image, "id": f"id{SURROGATE}", "key": f"k{SURROGATE}"},
        {"caption": CAPTION, "image": image, "annotations": [{"phrase": f"dog{SURROGATE}", "box": [0, 0, 1, 1]}]},
        {"caption": CAPTION, "image": image},
    ]
    with open(path, "w", encoding="ascii") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")  # "\ud800" escapes: what a crawler's JSON holds
    stem = path.name.split(".", 1)[0]
    keys = [generated_key(stem, 0), make_key(f"k{SURROGATE}"), generated_key(stem, 2), generated_key(stem, 3)]
    return dict.fromkeys(keys)


def write_non_utf8_tar(path: Path, seed: int) -> dict[str, str | None]:
    """A tar whose member names are not UTF-8 (latin-1 bytes), with a caption that is not UTF-8 either."""
    raw_names = [b"caf\xe9_0001", b"\xff\xfe_0002", b"plain_0003"]
    keys = {}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for i, raw in enumerate(raw_names):
            name = raw.decode("utf-8", "surrogateescape")
            corpus.add_member(tf, f"{name}.jpg", corpus.jpeg(seed + i))
            caption = CAPTION.encode() + (b" \xe9t\xe9" if i == 0 else b"")
            corpus.add_member(tf, f"{name}.txt", caption)
            keys[make_key(name)] = None
    return keys


# ---------------------------------------------------------------------------------------------------------------
# Parquet: bad rows in good row groups, an oversized cell, a row group that cannot be decoded
# ---------------------------------------------------------------------------------------------------------------


def write_hostile_parquet(path: Path, seed: int, big_caption_bytes: int = 2 << 20) -> dict[str, str | None]:
    """Three row groups of three rows. Row group 0: an invalid UTF-8 caption (kept, replaced), an oversized caption
    (``caption_too_long`` before it becomes text), bad annotations (``bad_sample``). Row group 1 is corrupted on disk
    (each row ``bad_sample``). Row group 2: good rows, which must still be read."""
    captions = [
        b"a dog \xff\xfe on the beach",
        b"a dog " + b"x" * big_caption_bytes,
        CAPTION.encode(),
        *(CAPTION.encode() for _ in range(6)),
    ]
    annotations = [None, None, "[not json", *([None] * 6)]
    table = pa.table(
        {
            "caption": pa.array(captions, type=pa.binary()).view(pa.string()),  # invalid UTF-8 written as is
            "image": [corpus.jpeg(seed + i) for i in range(9)],
            "annotations": annotations,
        }
    )
    pq.write_table(table, path, row_group_size=3)
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)  # the image column of row group 1
    start = min(o for o in (column.dictionary_page_offset, column.data_page_offset) if o is not None)
    data = bytearray(path.read_bytes())
    data[start : start + column.total_compressed_size] = b"\xab" * column.total_compressed_size
    path.write_bytes(bytes(data))
    stem = path.stem
    reasons = [None, "caption_too_long", "bad_sample", "bad_sample", "bad_sample", "bad_sample", None, None, None]
    return {generated_key(stem, i): r for i, r in enumerate(reasons)}


# ---------------------------------------------------------------------------------------------------------------
# References from a table, and an image folder with links and FIFOs
# ---------------------------------------------------------------------------------------------------------------


def write_reference_table(folder: Path, secret: Path, http_url: str, seed: int) -> dict[str, str | None]:
    """A JSONL table in ``folder`` naming its own images (kept) and places outside it (never read)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    (folder / "img" / "ok.jpg").write_bytes(corpus.jpeg(seed))
    (folder / "img" / "escape.jpg").symlink_to(secret)  # a symlink inside that points out
    (folder / "img" / "pipe.jpg").unlink(missing_ok=True)
    os.mkfifo(folder / "img" / "pipe.jpg")  # would block a plain open() for ever
    refs = {
        "img/ok.jpg": None,
        str(secret): "reference_not_allowed",
        "/etc/hostname": "reference_not_allowed",
        "../" + secret.name: "reference_not_allowed",
        "../no-such-file.jpg": "reference_not_allowed",  # same answer whether or not it exists
        "img/escape.jpg": "reference_not_allowed",
        "img/pipe.jpg": "reference_not_allowed",
        f"file://{secret}": "reference_not_allowed",
        f"zip://x.jpg::file://{secret}": "reference_not_allowed",
        f"{http_url}/image.jpg": "reference_not_allowed",
        f"s3://bucket/{secret.name}": "reference_not_allowed",
        "img/" + "n" * 5000 + ".jpg": "missing_image",  # ENAMETOOLONG
        "img/missing.jpg": "missing_image",
    }
    path = folder / "refs.jsonl"
    corpus.write_jsonl(path, [{"caption": CAPTION, "image": ref} for ref in refs])
    return {generated_key("refs", i): reason for i, reason in enumerate(refs.values())}


def make_hostile_folder(root: Path, secret: Path, seed: int) -> dict[str, str | None]:
    """A folder of images: good ones, a symlink out (skipped), a symlink inside (read), FIFOs named .jpg and .txt
    (skipped without blocking), a symlink loop (skipped), a caption that is not UTF-8 (kept, replaced)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.jpg").write_bytes(corpus.jpeg(seed))
    (root / "a.txt").write_bytes(CAPTION.encode() + b" \xe9")
    (root / "b.jpg").write_bytes(corpus.jpeg(seed + 1))
    (root / "b.txt").write_text(CAPTION)
    (root / "c.jpg").symlink_to(root / "a.jpg")  # stays inside: read
    (root / "c.txt").write_text(CAPTION)
    (root / "out.jpg").symlink_to(secret)  # leaves the folder: never read
    (root / "out.txt").write_text(CAPTION)
    os.mkfifo(root / "fifo.jpg")
    (root / "d.jpg").write_bytes(corpus.jpeg(seed + 2))
    os.mkfifo(root / "d.txt")  # a FIFO caption: skipped, d has no caption
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    return {"a": None, "b": None, "c": None, "d": "missing_caption"}


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            corpus.add_member(tf, name, data)
    return buf.getvalue()
