"""A sparkline with gaps: an interval with nothing to measure is drawn blank.

Textual's Sparkline scales every point between the data's lowest and highest value, so a
minute with no latency would have to be drawn as some latency (it was drawn as 0 ms, as if
fast), and its lowest point always gets a bar. Here bars rise from zero, a value of 0 (no
requests) is blank, and so is None (no p99 to show).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

BARS = "▁▂▃▄▅▆▇█"


def bars(values: Sequence[float | None], width: int, height: int) -> list[str]:
    """The chart as `height` lines of `width` characters, top line first, across the whole
    width: fewer values than columns are stretched (a blank right edge would read as quiet
    minutes), more are taken as the highest of each column's group (a spike stays
    visible), None where a whole group is None; a value that is not finite is drawn as
    None."""
    if width <= 0 or height <= 0:
        return []
    values = [v if v is not None and math.isfinite(v) else None for v in values]
    n = len(values)
    if n <= width:
        columns = [values[c * n // width] if n else None for c in range(width)]
    else:
        groups = [values[c * n // width : (c + 1) * n // width] for c in range(width)]
        columns = [max((v for v in g if v is not None), default=None) for g in groups]
    top = max((v for v in columns if v is not None), default=0.0)
    steps = len(BARS) * height
    levels = [
        0 if v is None or v <= 0 or top <= 0 else max(1, round(v / top * steps)) for v in columns
    ]
    lines = []
    for row in reversed(range(height)):
        low = row * len(BARS)
        lines.append(
            "".join(
                "█" if level - low >= len(BARS) else BARS[level - low - 1] if level > low else " "
                for level in levels
            )
        )
    return lines


class GapSparkline(Widget):
    """`data`: one value per interval, oldest first; None where there is nothing to draw."""

    DEFAULT_CSS = """
    GapSparkline { height: 3; color: $accent; }
    """
    data: reactive[list[float | None]] = reactive(list, layout=False)

    def render(self) -> Text:
        return Text("\n".join(bars(self.data, self.size.width, self.size.height)))
