"""How stored times read to people: one form for the report, the CLI, the TUI and the
messages of drift and the prediction log, so the same moment never reads two ways."""

from __future__ import annotations

import time


def clock(ts: float | None, seconds: bool = False) -> str:
    """Seconds since the epoch as local time, to the minute (or second); "" for none."""
    form = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    return "" if ts is None else time.strftime(form, time.localtime(ts))
