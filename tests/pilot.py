"""Waiting in Pilot tests: screens fill from thread workers, so conditions arrive later."""

from __future__ import annotations

from collections.abc import Callable


async def until(pilot, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.05)):
        await pilot.pause(0.05)
        if condition():
            return
    raise AssertionError(f"timed out waiting for {what}")
