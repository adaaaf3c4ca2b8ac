"""The Deployments screen through Pilot: live traffic, canary split, promote and rollback behind a
confirmation, against a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.widgets import DataTable, Static

from appliance.core import deployments
from appliance.core.context import Appliance
from appliance.tui.app import ApplianceApp
from tests.clients import predict
from tests.pilot import until


def _row(table: DataTable, key: str) -> list[str]:
    return [str(cell) for cell in table.get_row(key)]


def test_deployments_screen_shows_traffic_and_canary_then_promotes_and_rolls_back(
    trained_home: Path,
) -> None:
    from appliance.tui.deployments import DeploymentsScreen
    from appliance.tui.jobs import ConfirmScreen

    ctx = Appliance.open(trained_home)
    dep = deployments.create_deployment(ctx, "tui-dep", "churn@1")
    deployments.deploy_model(ctx, "churn@2", "tui-dep", canary=50)
    for i in range(40):
        predict(dep["url"], request_id=f"t{i}")

    async def scenario() -> None:
        app = ApplianceApp(ctx)
        async with app.run_test(size=(180, 50)) as pilot:
            await pilot.press("s")
            assert isinstance(app.screen, DeploymentsScreen)
            screen = app.screen
            table = screen.query_one("#deployments", DataTable)
            await until(pilot, lambda: "tui-dep" in [k.value for k in table.rows], "the row")
            row = _row(table, "tui-dep")
            assert row[1:5] == ["serving", "1", "1", "2 @ 50%"]
            table.move_cursor(row=[k.value for k in table.rows].index("tui-dep"))
            await until(pilot, lambda: screen.name_shown == "tui-dep", "tui-dep highlighted")
            traffic = screen.query_one("#traffic", Static)
            await until(
                pilot,
                lambda: "canary:" in str(traffic.render()) and "req/s" in str(traffic.render()),
                "the live traffic, stable and canary",
                timeout=15,
            )
            await pilot.press("p")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(
                pilot,
                lambda: deployments.get_deployment(ctx, "tui-dep")["canary_revision"] is None,
                "the promotion",
            )
            await until(pilot, lambda: _row(table, "tui-dep")[3] == "2", "version 2 listed")
            await pilot.press("b")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")  # declined: nothing changes
            assert deployments.get_deployment(ctx, "tui-dep")["model_version"] == 2
            await pilot.press("b", "y")
            await until(
                pilot,
                lambda: deployments.get_deployment(ctx, "tui-dep")["model_version"] == 1,
                "the rollback",
            )
            revisions = screen.query_one("#revisions", DataTable)
            await until(pilot, lambda: revisions.row_count == 3, "the rollback revision")
            assert predict(dep["url"]) == "1"
            await pilot.press("escape")
            assert not isinstance(app.screen, DeploymentsScreen)
            await pilot.press("q")

    try:
        asyncio.run(scenario())
    finally:
        deployments.stop_deployment(ctx, "tui-dep")
        ctx.close()
