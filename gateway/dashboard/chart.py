"""The budget burn-down chart as inline SVG (pure; no script, no external assets).

One step series over time: the privacy filter's use at its best order, the share of the
dataset's budget that limits admission (``ledger.burndown``), with a dot per job and the
100 % line. Both axes are labelled. The sum of the jobs' ε is deliberately not drawn: it
does not measure the budget under RDP composition, yet it was read as the budget.
Every text is escaped; styling comes from the page's stylesheet through class names.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from html import escape

from ledger.burndown import BurnDown

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 72, 20, 14, 44
Y_LABEL = "filter used (best order)"
MAX_SHOWN = 3.0  # values above 300 % are drawn at the top edge (and named in the tooltips)

Scale = Callable[[float], float]


def burn_down_svg(chart: BurnDown, *, now: float) -> str:
    """The chart of ``chart`` from the dataset's registration until ``now``."""
    times = [p.time for p in chart.points]
    start = min([chart.start, *times])
    end = max([now, start + 60.0, *times])
    filter_values = [p.filter_used for p in chart.points]
    top = _axis_top(max([1.0, *filter_values]))

    def x(t: float) -> float:
        return LEFT + (t - start) / (end - start) * (WIDTH - LEFT - RIGHT)

    def y(v: float) -> float:
        return TOP + (1.0 - min(v, top) / top) * (HEIGHT - TOP - BOTTOM)

    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(_description(chart))}">',
             f"<title>{escape(_description(chart))}</title>"]
    parts += _y_axis(top, y)
    parts += _x_axis(start, end, x)
    parts.append(f'<line class="limit" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(1.0):.1f}" '
                 f'y2="{y(1.0):.1f}"/>')
    parts.append(_step_path("series-filter", times, filter_values, start, end, x, y))
    parts.append(f'<text class="limit-label" x="{LEFT + 6}" y="{y(1.0) - 6:.1f}">budget: '
                 f"ε_total = {chart.epsilon_total:g}, δ = {chart.delta:g}</text>")
    for point in chart.points:
        order = f"α = {point.best_order:g}" if point.best_order is not None else "no order"
        tip = (f"{point.job_id} ({point.budget_state}) by {point.researcher}: job ε {point.epsilon:.3g}; "
               f"filter {point.filter_used:.1%} used ({order})")
        parts.append(f'<circle class="marker {escape(point.budget_state)}" cx="{x(point.time):.1f}" '
                     f'cy="{y(point.filter_used):.1f}" r="4"><title>{escape(tip)}</title></circle>')
    if not chart.points:
        parts.append(f'<text class="empty" x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" '
                     f'y="{y(0.5):.0f}" text-anchor="middle">no budget charged yet</text>')
    parts.append("</svg>")
    return "".join(parts)


def _description(chart: BurnDown) -> str:
    return (f"Budget use of dataset {chart.dataset}: privacy filter "
            f"{chart.current.fraction:.1%} used; {len(chart.points)} jobs charged")


def _axis_top(largest: float) -> float:
    """A round top for the y axis a little above ``largest``: a multiple of its tick step,
    at most MAX_SHOWN."""
    if not math.isfinite(largest) or largest >= MAX_SHOWN:
        return MAX_SHOWN
    step = _y_step(largest * 1.05)
    return min(MAX_SHOWN, math.ceil(largest * 1.05 / step) * step)


def _y_step(top: float) -> float:
    return 0.25 if top <= 1.5 else 0.5


def _y_axis(top: float, y: Scale) -> list[str]:
    step = _y_step(top)
    parts = []
    for i in range(round(top / step) + 1):
        value = i * step
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" '
                     f'y2="{y(value):.1f}"/>')
        parts.append(f'<text class="tick" x="{LEFT - 8}" y="{y(value) + 4:.1f}" '
                     f'text-anchor="end">{value:.0%}</text>')
    middle = (TOP + HEIGHT - BOTTOM) / 2
    parts.append(f'<text class="axis-label y-label" x="14" y="{middle:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {middle:.0f})">{Y_LABEL}</text>')
    return parts


def _x_axis(start: float, end: float, x: Scale) -> list[str]:
    span = end - start
    fmt = "%Y-%m-%d" if span >= 30 * 86400 else "%m-%d %H:%M" if span >= 600 else "%H:%M:%S"
    baseline = HEIGHT - BOTTOM
    parts = [f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{baseline}" y2="{baseline}"/>']
    for i in range(5):
        t = start + span * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        label = dt.datetime.fromtimestamp(t, dt.UTC).strftime(fmt)
        parts.append(f'<line class="axis" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{baseline}" '
                     f'y2="{baseline + 5}"/>')
        parts.append(f'<text class="tick" x="{x(t):.1f}" y="{baseline + 18}" '
                     f'text-anchor="{anchor}">{label}</text>')
    parts.append(f'<text class="axis-label x-label" x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" '
                 f'y="{HEIGHT - 4}" text-anchor="middle">time (UTC) · one dot per job</text>')
    return parts


def _step_path(css_class: str, times: Sequence[float], values: Sequence[float], start: float,
               end: float, x: Scale, y: Scale) -> str:
    """A step line: 0 from ``start``, jumping to each value at its time, held until ``end``."""
    points = [f"M{x(start):.1f},{y(0.0):.1f}"]
    for t, v in zip(times, values, strict=True):
        points.append(f"H{x(t):.1f}V{y(v):.1f}")
    points.append(f"H{x(end):.1f}")
    return f'<path class="{css_class}" d="{"".join(points)}"/>'
