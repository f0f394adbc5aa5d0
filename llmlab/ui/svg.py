"""Small inline SVG charts (line and bar): cheap to redraw on every poll, and readable from Python.

>>> svg = line_chart({"train": [(1, 2.0), (2, 1.0)]}, title="loss")
>>> svg.startswith("<svg") and "polyline" in svg
True
>>> bar_chart(["a", "b"], [1.0, 3.0]).count("<rect")
3
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from llmlab.ui._base import esc

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 48, 12, 24, 28


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _frame(width: int, height: int, title: str, body: list[str], css_class: str) -> str:
    return (
        f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>'
        f'<text x="{width / 2:.0f}" y="15" text-anchor="middle" font-weight="bold">{esc(title)}</text>'
        + "".join(body)
        + "</svg>"
    )


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str = "",
    xlabel: str = "",
    width: int = 420,
    height: int = 220,
) -> str:
    """An SVG line chart of named (x, y) series; non-finite points are dropped; a legend names each series."""
    clean = {
        name: [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
        for name, points in series.items()
    }
    clean = {name: points for name, points in clean.items() if points}
    body: list[str] = []
    if not clean:
        body.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">no data yet</text>')
        return _frame(width, height, title, body, "llmlab-line-chart")
    xs = [x for points in clean.values() for x, _ in points]
    ys = [y for points in clean.values() for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    plot_w, plot_h = width - _PAD_LEFT - _PAD_RIGHT, height - _PAD_TOP - _PAD_BOTTOM

    def px(x: float) -> float:
        return _PAD_LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return _PAD_TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    bottom, left = _PAD_TOP + plot_h, _PAD_LEFT
    body.append(
        f'<path d="M{left},{_PAD_TOP} V{bottom} H{left + plot_w}" stroke="#888" fill="none"/>'
        f'<text x="{left - 4}" y="{_PAD_TOP + 4}" text-anchor="end">{_fmt(y1)}</text>'
        f'<text x="{left - 4}" y="{bottom}" text-anchor="end">{_fmt(y0)}</text>'
        f'<text x="{left}" y="{bottom + 14}" text-anchor="middle">{_fmt(x0)}</text>'
        f'<text x="{left + plot_w}" y="{bottom + 14}" text-anchor="end">{_fmt(x1)}</text>'
        f'<text x="{left + plot_w / 2:.0f}" y="{bottom + 24}" text-anchor="middle">{esc(xlabel)}</text>'
    )
    for i, (name, points) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        body.append(
            f'<polyline data-series="{esc(name)}" points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"/>'
        )
        if len(points) == 1:
            body.append(
                f'<circle cx="{px(points[0][0]):.1f}" cy="{py(points[0][1]):.1f}" r="3" fill="{color}"/>'
            )
        legend_y = _PAD_TOP + 12 + 14 * i
        last = points[-1][1]
        body.append(
            f'<text x="{left + plot_w - 4}" y="{legend_y}" text-anchor="end" fill="{color}">'
            f"{esc(name)} {_fmt(last)}</text>"
        )
    return _frame(width, height, title, body, "llmlab-line-chart")


def bar_chart(
    labels: Sequence[str], values: Sequence[float], *, title: str = "", width: int = 420, bar_height: int = 20
) -> str:
    """An SVG horizontal bar chart, one labelled bar per value (missing values are shown as "n/a")."""
    height = _PAD_TOP + bar_height * len(labels) + 8
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = max([abs(v) for v in finite] + [1e-12])
    label_w, value_w = 130, 56
    plot_w = width - label_w - value_w
    body = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = _PAD_TOP + i * bar_height
        ok = value is not None and math.isfinite(value)
        length = abs(value) / top * plot_w if ok else 0
        body.append(
            f'<text x="{label_w - 6}" y="{y + bar_height * 0.7:.0f}" text-anchor="end">{esc(label)}</text>'
            f'<rect data-label="{esc(label)}" x="{label_w}" y="{y + 3}" width="{length:.1f}" '
            f'height="{bar_height - 6}" fill="{COLORS[i % len(COLORS)]}"/>'
            f'<text x="{label_w + length + 4:.1f}" y="{y + bar_height * 0.7:.0f}">'
            f"{_fmt(value) if ok else 'n/a'}</text>"
        )
    return _frame(width, height, title, body, "llmlab-bar-chart")
