"""Inline SVG charts for the report: column charts for histograms, horizontal bars for funnels and top lists.

Hand-written SVG keeps the report one self-contained file that renders offline, scales without blurring, and
costs nothing to produce. Every piece of text placed in the SVG (labels come from captions) is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

BAR = "#4c78a8"
BAR_ALT = "#e45756"
MUTED = "#666"


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


def fmt_number(value: float | None, digits: int = 2) -> str:
    """1234567 -> '1,234,567'; 0.1234 -> '0.12'; None -> '–'."""
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    rounded = round(float(value), digits)
    if rounded.is_integer() and abs(rounded) >= 1:
        return f"{int(rounded):,}"
    return f"{value:,.{digits}f}"


def _edge_label(v: float) -> str:
    if v >= 100 or float(v).is_integer():
        return f"{v:g}"
    if v >= 1:
        return f"{v:.2g}"
    return f"{v:.2f}".rstrip("0").rstrip(".") if v else "0"


def _tick(value: float) -> str:
    return fmt_number(round(value)) if value >= 2 else fmt_number(value)


def column_chart(
    labels: list[str], values: list[float], title: str, x_title: str = "", colors: list[str] | None = None
) -> str:
    """Vertical bars, one per label; the tooltip of each bar names its bin and exact count."""
    width, height = 600, 240
    left, right, top, bottom = 56, 12, 28, 52
    n = max(len(values), 1)
    vmax = max(values) if values and max(values) > 0 else 1
    plot_w, plot_h = width - left - right, height - top - bottom
    step = plot_w / n
    every = max(1, round(n / 12))  # at most a dozen tick labels
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{_e(title)}</title>",
        f'<text x="{left}" y="18" font-size="13" font-weight="bold">{_e(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="{MUTED}"/>',
    ]
    for frac in (0.5, 1.0):
        y = top + plot_h * (1 - frac)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{_e(_tick(vmax * frac))}</text>'
        )
    for i, (label, value) in enumerate(zip(labels, values)):
        h = plot_h * value / vmax
        x = left + i * step
        color = colors[i] if colors else BAR
        parts.append(
            f'<rect x="{x + step * 0.08:.1f}" y="{top + plot_h - h:.1f}" width="{step * 0.84:.1f}" height="{h:.1f}" '
            f'fill="{color}"><title>{_e(label)}: {_e(fmt_number(value))}</title></rect>'
        )
        if i % every == 0:
            parts.append(
                f'<text x="{x + step / 2:.1f}" y="{top + plot_h + 14}" font-size="10" text-anchor="middle">'
                f"{_e(label)}</text>"
            )
    if x_title:
        parts.append(
            f'<text x="{left + plot_w / 2}" y="{height - 8}" font-size="11" text-anchor="middle" fill="{MUTED}">'
            f"{_e(x_title)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(hist: dict[str, Any], title: str, x_title: str = "") -> str:
    """A chart of a :class:`Histogram` or :class:`CountHistogram` dict; out-of-range counts get their own bars."""
    if "values" in hist:
        labels = [str(v) for v in hist["values"]]
        values = list(hist["counts"])
        colors = None
    else:
        edges = hist["edges"]
        labels = [_edge_label(e) for e in edges[:-1]]
        values = list(hist["counts"])
        colors = [BAR] * len(values)
        if hist.get("underflow"):
            labels.insert(0, f"<{_edge_label(edges[0])}")
            values.insert(0, hist["underflow"])
            colors.insert(0, BAR_ALT)
        if hist.get("overflow"):
            labels.append(f">{_edge_label(edges[-1])}")
            values.append(hist["overflow"])
            colors.append(BAR_ALT)
    return column_chart(labels, values, title, x_title or hist.get("unit", ""), colors)


def bar_list(items: list[tuple[str, float]], title: str, total: float | None = None, max_label: int = 48) -> str:
    """Horizontal bars with their labels and values (and share of ``total`` when given)."""
    row_h, left, width = 20, 250, 600
    height = 30 + row_h * max(len(items), 1) + 6
    vmax = max((v for _, v in items), default=0) or 1
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{_e(title)}</title>",
        f'<text x="4" y="18" font-size="13" font-weight="bold">{_e(title)}</text>',
    ]
    for i, (label, value) in enumerate(items):
        y = 30 + i * row_h
        shown = label if len(label) <= max_label else label[: max_label - 1] + "…"
        w = (width - left - 110) * value / vmax
        note = fmt_number(value) + (f" ({100 * value / total:.1f}%)" if total else "")
        parts.append(
            f'<text x="{left - 6}" y="{y + 14}" font-size="11" text-anchor="end">{_e(shown)}'
            f"<title>{_e(label)}</title></text>"
        )
        parts.append(
            f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{BAR}">'
            f"<title>{_e(label)}: {_e(note)}</title></rect>"
        )
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 14}" font-size="11">{_e(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)
