"""The dashboard, driven by Pilot: rows from the store, `:` jump, `/` filter, `?` help, `q`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.widgets import DataTable, Static

from appliance.core.context import Appliance
from appliance.tui.app import ApplianceApp, HelpScreen, ResourcesRefreshed


def _rows(app: ApplianceApp) -> list[list[str]]:
    table = app.query_one("#table", DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def _wait_for_refresh(app: ApplianceApp, pilot) -> None:  # type: ignore[no-untyped-def]
    for _ in range(100):
        await pilot.pause(0.05)
        if app.snapshot:
            return
    raise AssertionError("the refresh worker never delivered rows")


def test_dashboard_lists_resources_and_navigates(trained_home: Path) -> None:
    ctx = Appliance.open(trained_home)
    messages: list[object] = []

    async def scenario() -> None:
        app = ApplianceApp(ctx)
        async with app.run_test(size=(160, 40), message_hook=messages.append) as pilot:
            await _wait_for_refresh(app, pilot)
            assert any(isinstance(m, ResourcesRefreshed) for m in messages)
            summary = str(app.query_one("#summary", Static).render())
            for kind in ("datasets 1", "jobs 2", "runs 2", "models 1", "deployments"):
                assert kind in summary
            assert {r[2] for r in _rows(app)} == {"succeeded"}  # jobs view: the state column

            await pilot.press("colon", *"models", "enter")
            assert app.kind == "models"
            assert _rows(app)[0][0] == "churn"

            await pilot.press("colon", *"ds", "enter")  # aliases work like k9s
            assert app.kind == "datasets" and _rows(app)[0][0] == "churn"

            await pilot.press("colon", *"runs", "enter")
            assert len(_rows(app)) == 2
            await pilot.press("slash", *"churn-v2", "enter")
            assert [r[2] for r in _rows(app)] == ["churn-v2"]
            await pilot.press("escape")
            assert len(_rows(app)) == 2

            await pilot.press("colon", *"nonsense", "enter")
            assert app.kind == "runs"  # an unknown kind keeps the view and says why

            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            help_text = str(app.screen.query_one("#help-text", Static).render())
            assert "Filter" in help_text and ":deployments" in help_text
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)

            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())
    ctx.close()


def test_refresh_never_blocks_the_ui(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A slow store read happens in the worker; key presses are handled meanwhile."""
    import time

    import appliance.tui.app as tui

    def slow_list(ctx, kind):  # type: ignore[no-untyped-def]
        time.sleep(0.5)
        return tui.KINDS[kind].columns, []

    monkeypatch.setattr(tui, "list_resources", slow_list)
    ctx = Appliance.open(tmp_path / "h")

    async def scenario() -> None:
        app = ApplianceApp(ctx)
        async with app.run_test() as pilot:
            started = time.monotonic()
            await pilot.press("colon", *"models", "enter")
            assert app.kind == "models"
            assert time.monotonic() - started < 2.0  # one refresh pass sleeps 2.5 s
            await pilot.press("q")

    asyncio.run(scenario())
    ctx.close()
