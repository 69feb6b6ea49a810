"""Write the report: ``report.html`` (one self-contained page), ``stats.json`` (every figure) and ``summary.md``.

The page embeds its charts as inline SVG and its thumbnails as base64 JPEG, links to nothing, runs no script,
and says so to the browser with a Content-Security-Policy, so it opens offline and a caption that slipped past
escaping still could not run. Every string that comes from the corpus is escaped where it is placed.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from grit_pipeline.stats.corpus import Corpus, open_corpus
from grit_pipeline.stats.figures import FigureOptions, compute_figures
from grit_pipeline.stats.gallery import GalleryItem, build_gallery, caption_html
from grit_pipeline.stats.svg import bar_list, fmt_number, histogram_chart

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1280px;padding:0 20px 40px;color:#222}
h1{margin:18px 0 4px}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#666}
.warn{background:#fff4e5;border:1px solid #f0a040;padding:8px 12px;margin:10px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:10px}
svg.chart{width:100%;max-width:760px;height:auto;font-family:system-ui,sans-serif}
figure{margin:0;border:1px solid #ddd;padding:8px;overflow-wrap:anywhere}figure img{max-width:100%;height:auto}
figcaption{font-size:13px}.noimg{background:#eee;padding:30px 8px;color:#a00}ul.exp{margin:4px 0;padding-left:18px}
"""


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


class Raw(str):
    """HTML built by this module (already escaped), placed as is in a table cell."""


def _table(headers: list[str] | None, rows: list[list[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>" if headers else ""
    body = []
    for row in rows:
        cells = []
        for cell in row:
            if isinstance(cell, Raw):
                cells.append(f"<td>{cell}</td>")
            elif isinstance(cell, (int, float)) or cell is None:
                cells.append(f'<td class="n">{_e(fmt_number(cell))}</td>')
            else:
                cells.append(f"<td>{_e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _pct(part: float | None, whole: float | None) -> str:
    return f"{100 * part / whole:.1f}%" if part is not None and whole else "–"


def reference_rows(fig: dict[str, Any]) -> list[list[Any]]:
    ours, paper = fig["reference"]["corpus"], fig["reference"]["published"]
    return [
        ["images", ours["images"], paper["images"]],
        ["text spans (retained expressions)", ours["text_spans"], paper["text_spans"]],
        ["boxes (of retained expressions)", ours["boxes"], paper["boxes"]],
        ["spans per image", ours["spans_per_image"], paper["spans_per_image"]],
        ["boxes per image", ours["boxes_per_image"], paper["boxes_per_image"]],
        ["average expression length (words)", ours["expression_words"], paper["expression_words"]],
    ]


def funnel_rows(fig: dict[str, Any]) -> list[list[Any]]:
    s = fig["samples"]
    rows: list[list[Any]] = [["input pairs", s["input"], "100%"]]
    rows += [[f"dropped: {r}", n, _pct(n, s["input"])] for r, n in s["drop_reasons"].items()]
    rows.append(["kept", s["kept"], _pct(s["kept"], s["input"])])
    return rows


READ_AS = {
    "shards": "grit build shards",
    "img2dataset": "an img2dataset download (kept = downloaded, with its record)",
    "parquet": "parquet records (GRIT-20M style)",
}


def _header(fig: dict[str, Any], generated: str) -> str:
    src = fig["source"]
    facts = [
        ["corpus", src["path"]],
        ["read as", READ_AS.get(src["mode"], src["mode"])],
        ["shards / index files", f"{src['shards']} / {src['index_files']}"],
        ["report written", generated],
    ]
    for name in ("created_at", "updated_at", "result_config_hash"):
        if name in src:
            facts.append([name.replace("_", " "), src[name]])
    if isinstance(src.get("detector"), dict):
        facts.append(["detector", ", ".join(f"{k}={v}" for k, v in src["detector"].items())])
    if isinstance(src.get("spacy_model"), dict):
        facts.append(["spaCy model", ", ".join(f"{k}={v}" for k, v in src["spacy_model"].items())])
    out = [_table(None, facts)]
    notes = list(src.get("manifest_warnings", [])) + list(fig["warnings"])
    if src["incomplete_shards"]:
        notes.append(
            f"{len(src['incomplete_shards'])} unfinished shard(s) left out: {', '.join(src['incomplete_shards'])}"
        )
    if notes:
        out.append(
            '<div class="warn"><b>Warnings</b><ul>' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></div>"
        )
    return "".join(out)


def _sections(fig: dict[str, Any]) -> list[str]:
    s, ch, bx, ex = fig["samples"], fig["chunks"], fig["boxes"], fig["expressions"]
    html = ["<h2>Beside GRIT</h2>", _table(["figure", "this corpus", "GRIT (paper, Table 1)"], reference_rows(fig))]
    ref = fig["reference"]["corpus"]
    html.append(
        f'<p class="muted">Spans are referring expressions kept by the containment filter, what a model trains on. '
        f"Before the filter: {_e(fmt_number(ref['grounded_chunks_per_image']))} grounded noun chunks and "
        f"{_e(fmt_number(ref['all_boxes_per_image']))} boxes per image.</p>"
    )
    html += ["<h2>Samples: the drop funnel</h2>", _table(["", "samples", "share of input"], funnel_rows(fig))]
    items = [("input pairs", s["input"]), *((f"dropped: {r}", n) for r, n in s["drop_reasons"].items())]
    html.append(bar_list([*items, ("kept", s["kept"])], "Where the input pairs went", total=s["input"] or None))

    chunk_rows = [["noun chunks found", ch["found"]]]
    chunk_rows += [[f"filtered: {r}", n] for r, n in ch["filtered"].items()]
    chunk_rows += [["kept after filters", ch["kept"]], ["grounded (with a box)", ch["grounded"]]]
    box_rows = [
        ["boxes over the threshold, before NMS", bx["before_nms"]],
        ["boxes after NMS and per-phrase cap", bx["after_nms"]],
        ["referring expressions (entries)", ex["entries"]],
        ["  retained by the containment filter", ex["entries_retained"]],
        ["distinct expressions (spans)", ex["distinct"]],
        ["  retained by the containment filter", ex["retained"]],
    ]
    html += ["<h2>Noun chunks, boxes and expressions</h2>", '<div class="charts">']
    html += [_table(["noun chunks", "count"], chunk_rows), _table(["boxes and expressions", "count"], box_rows)]
    html.append("</div>")

    titles = {
        "chunks_found": "Noun chunks found per input (before filters)",
        "boxes_raw": "Boxes over the threshold per input (before NMS)",
        "grounded_chunks": "Grounded noun chunks per kept image",
        "boxes": "Boxes per kept image",
        "expressions": "Referring expressions per kept image",
        "expressions_retained": "Retained expressions per kept image",
    }
    charts = [histogram_chart(h, titles[k]) for k, h in {**fig["per_image"], **fig["per_input"]}.items()]
    html += ["<h2>Per image</h2>", '<div class="charts">', *charts, "</div>"]
    html += ["<h2>Boxes</h2>", '<div class="charts">']
    html.append(histogram_chart(fig["box_area"], "Box area (fraction of the image)"))
    html.append(histogram_chart(fig["box_aspect_ratio"], "Box aspect ratio (width / height, log bins)"))
    html.append(histogram_chart(fig["box_score"], "Detector score"))
    html.append("</div>")

    words = fig["expression_words"]
    html += ["<h2>Expressions and chunks</h2>", '<div class="charts">']
    html.append(histogram_chart(words["retained"], "Words per retained expression"))
    html.append(histogram_chart(words["all"], "Words per expression (before the containment filter)"))
    for key, title in (("top_expressions", "Top retained expressions"), ("top_chunk_roots", "Top chunk heads")):
        top = fig[key]
        note = "" if top["exact"] else f" (counts may be low by up to {top['max_error']})"
        html.append(bar_list([(t, n) for t, n in top["top"]], title + note))
    html.append("</div>")

    img = fig["images"]
    html += ["<h2>Images</h2>", '<div class="charts">']
    html.append(histogram_chart(img["width"], "Stored image width"))
    html.append(histogram_chart(img["height"], "Stored image height"))
    if img["formats"]:
        html.append(bar_list(sorted(img["formats"].items(), key=lambda kv: -kv[1]), "Image formats", s["kept"]))
    html.append("</div>")
    html += ["<h2>Time and throughput</h2>", _timing_html(fig["timing"])]
    if fig["checks"]:
        rows = [[c["name"], c["index"], c["counters"], "yes" if c["ok"] else "NO"] for c in fig["checks"]]
        html += [
            "<h2>Index and counters agree</h2>",
            _table(["counter", "parquet index", "_stats.json", "agree"], rows),
        ]
    return html


def _timing_html(timing: dict[str, Any]) -> str:
    if not timing["seconds"] and not timing["wall_s"]:
        return '<p class="muted">No timing: this corpus has no _stats.json counters.</p>'
    rows = [[stage, sec, timing["ms_per_input"].get(stage)] for stage, sec in timing["seconds"].items()]
    rows.append(["total (summed over workers)", sum(timing["seconds"].values()), sum(timing["ms_per_input"].values())])
    facts = [
        ["first shard started", timing["started_at"] or "–"],
        ["last shard finished", timing["finished_at"] or "–"],
        ["wall time (s)", timing["wall_s"]],
        ["input pairs per second", timing["inputs_per_s"]],
        ["kept samples per second", timing["kept_per_s"]],
    ]
    chart = bar_list(
        [(k, v) for k, v in timing["seconds"].items()], "Seconds per stage", sum(timing["seconds"].values())
    )
    return (
        '<div class="charts">'
        + _table(["stage", "seconds", "ms per input pair"], rows)
        + _table(None, facts)
        + "</div>"
        + chart
    )


def _gallery_html(items: list[GalleryItem], has_images: bool) -> str:
    if not items:
        why = "no images in this corpus" if not has_images else "no samples requested or no kept records"
        return f'<h2>Gallery</h2><p class="muted">No gallery: {_e(why)}.</p>'
    cards = []
    for item in items:
        if item.image_uri:
            pic = f'<img src="{item.image_uri}" alt="{_e(item.caption)}" title="{_e(item.key)}">'
        else:
            pic = f'<div class="noimg">{_e(item.problem or "no image")}</div>'
        exps = "".join(
            f"<li>{_e(p.text)} <span class='muted'>({len(p.boxes)} box{'es' if len(p.boxes) != 1 else ''})</span></li>"
            for p in item.expressions
        )
        cards.append(
            f'<figure class="sample">{pic}<figcaption><div class="caption">{caption_html(item.caption, item.chunks)}'
            f'</div><ul class="exp">{exps}</ul><div class="muted">{_e(item.key)} · shard {_e(item.shard)} · '
            f"{item.width}×{item.height}</div></figcaption></figure>"
        )
    intro = "Random kept samples: boxes labelled with their noun chunk and score; the caption's grounded chunks "
    intro += "highlighted in the same colours; below, the referring expressions the containment filter keeps."
    return f'<h2>Gallery</h2><p class="muted">{_e(intro)}</p><div class="grid">{"".join(cards)}</div>'


def render_html(fig: dict[str, Any], items: list[GalleryItem], generated: str) -> str:
    title = f"GRIT corpus report: {fig['source']['path']}"
    body = [f"<h1>{_e('GRIT corpus report')}</h1>", _header(fig, generated), *_sections(fig)]
    body.append(_gallery_html(items, fig["source"]["has_images"]))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def _md(text: Any) -> str:
    """Safe in a Markdown table cell: HTML escaped, pipes and line breaks neutralised."""
    return escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ").replace("`", "\\`")


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return fmt_number(v) if isinstance(v, (int, float)) or v is None else _md(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_summary(fig: dict[str, Any]) -> str:
    ch, bx, ex, t = fig["chunks"], fig["boxes"], fig["expressions"], fig["timing"]
    parts = [f"# GRIT corpus report: {_md(fig['source']['path'])}", ""]
    warnings = list(fig["source"].get("manifest_warnings", [])) + fig["warnings"]
    parts += [f"> warning: {_md(w)}" for w in warnings] + ([""] if warnings else [])
    parts += ["## Beside GRIT", "", _md_table(["figure", "this corpus", "GRIT (paper)"], reference_rows(fig)), ""]
    parts += ["## Funnel", "", _md_table(["", "samples", "share"], funnel_rows(fig)), ""]
    rows = [
        ["noun chunks found", ch["found"]],
        *([f"chunks filtered: {r}", n] for r, n in ch["filtered"].items()),
        ["noun chunks grounded", ch["grounded"]],
        ["boxes before NMS", bx["before_nms"]],
        ["boxes after NMS", bx["after_nms"]],
        ["expressions (distinct spans)", ex["distinct"]],
        ["expressions retained (containment filter)", ex["retained"]],
    ]
    parts += ["## Chunks, boxes, expressions", "", _md_table(["", "count"], rows), ""]
    top = [[text, n] for text, n in fig["top_expressions"]["top"][:10]]
    parts += ["## Top retained expressions", "", _md_table(["expression", "count"], top), ""]
    if t["seconds"]:
        rows = [[k, v, t["ms_per_input"].get(k)] for k, v in t["seconds"].items()]
        rows.append(["wall time (s)", t["wall_s"], None])
        rows.append(["input pairs per second", t["inputs_per_s"], None])
        parts += ["## Time", "", _md_table(["stage", "seconds", "ms per input"], rows), ""]
    return "\n".join(parts)


@dataclass
class ReportResult:
    html: Path
    stats: Path
    summary: Path
    figures: dict[str, Any]
    seconds: dict[str, float]


def make_report(path: str | Path, out_dir: str | Path, opts: FigureOptions | None = None) -> ReportResult:
    """Read the corpus at ``path`` (streaming), pick and draw the gallery, write the three files to ``out_dir``."""
    opts = opts or FigureOptions()
    t0 = time.perf_counter()
    corpus: Corpus = open_corpus(path)
    fig, rows = compute_figures(corpus, opts)
    t1 = time.perf_counter()
    items = build_gallery(rows, corpus.tar_of) if corpus.mode != "parquet" else []
    t2 = time.perf_counter()
    generated = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig["gallery"] = [
        {
            "key": i.key,
            "shard": i.shard,
            "caption": i.caption,
            "has_image": i.image_uri is not None,
            "problem": i.problem,
        }
        for i in items
    ]
    fig["report"] = {"generated_at": generated, "samples": opts.samples, "seed": opts.seed, "top_k": opts.top_k}
    result = ReportResult(out / "report.html", out / "stats.json", out / "summary.md", fig, {})
    for target, text in (
        (result.html, render_html(fig, items, generated)),
        (result.stats, json.dumps(fig, indent=1, ensure_ascii=False, allow_nan=False) + "\n"),
        (result.summary, render_summary(fig) + "\n"),
    ):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    result.seconds = {"figures": t1 - t0, "gallery": t2 - t1, "write": time.perf_counter() - t2}
    return result
