"""The Features screen through Pilot: definitions with every version, freshness against the
ttl, a view's profile, the online lookup form, and materialize behind a confirmation."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.widgets import DataTable, Input, Static

from appliance.core import datasets, features
from appliance.core.context import Appliance
from appliance.tui.app import ApplianceApp
from tests.pilot import until

STATS = """driver_id,event_ts,conv_rate
1,2026-01-01 09:00:00,0.1
1,2026-01-01 10:00:00,0.2
2,2026-01-01 09:30:00,0.5
"""
DEFINITIONS = """
entities:
  - {name: driver, join_keys: [driver_id]}
feature_views:
  - {name: driver_stats, entities: [driver], source: driver_stats, timestamp: event_ts,
     ttl: TTL, features: [{name: conv_rate, type: float64}]}
feature_services:
  - {name: driver_model, features: ["driver_stats:conv_rate"]}
"""


def _cells(table: DataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row(key)] for key in table.rows]


def test_features_screen_lists_versions_freshness_profile_and_looks_up(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.tui.features import FeaturesScreen
    from appliance.tui.jobs import ConfirmScreen

    csv = tmp_path / "driver_stats.csv"
    csv.write_text(STATS)
    datasets.import_csv(app, csv, "driver_stats")
    defs = tmp_path / "defs"
    defs.mkdir()
    for ttl in ("1h", "100000d"):  # two versions of the view (and of the service)
        (defs / "features.yaml").write_text(DEFINITIONS.replace("TTL", ttl))
        features.apply(app, defs)

    async def scenario() -> None:
        tui = ApplianceApp(app)
        async with tui.run_test(size=(200, 50)) as pilot:
            await pilot.press("f")
            assert isinstance(tui.screen, FeaturesScreen)
            screen = tui.screen
            table = screen.query_one("#definitions", DataTable)
            await until(pilot, lambda: table.row_count == 5, "entity, 2 views, 2 services")
            rows = _cells(table)
            assert [r[:3] for r in rows] == [
                ["entity", "driver", "1"],
                ["service", "driver_model", "2"],
                ["service", "driver_model", "1"],
                ["view", "driver_stats", "2"],
                ["view", "driver_stats", "1"],
            ]
            assert "driver_stats · 100000.0d · conv_rate" in rows[3][3]
            fresh = screen.query_one("#freshness", DataTable)
            assert [r[:2] for r in _cells(fresh)] == [
                ["driver_stats@2", "not materialized"],
                ["driver_stats@1", "not materialized"],
            ]
            profile = screen.query_one("#profile", DataTable)
            await until(pilot, lambda: profile.row_count == 3, "the view's profile")
            assert [r[0] for r in _cells(profile)] == ["driver_id", "event_ts", "conv_rate"]

            # materialize the highlighted view (the latest version) behind a confirmation
            table.move_cursor(row=3)
            await until(pilot, lambda: screen.view_shown == "driver_stats@2", "view 2 shown")
            await pilot.press("m")
            assert isinstance(tui.screen, ConfirmScreen)
            await pilot.press("y")
            await until(
                pilot,
                lambda: _cells(fresh)[0][1] == "fresh" and _cells(fresh)[0][5] == "2",
                "view 2 materialized and fresh",
            )

            # the lookup form: service and entity, Enter looks up
            table.move_cursor(row=1)
            await until(
                pilot,
                lambda: screen.query_one("#service", Input).value == "driver_model@2",
                "the highlighted service in the form",
            )
            await pilot.press("l")
            for key in "driver_id=1":
                await pilot.press(key)
            await pilot.press("enter")
            lookup = screen.query_one("#lookup", DataTable)
            await until(pilot, lambda: lookup.row_count == 2, "the lookup result")
            assert _cells(lookup)[1][:3] == ["conv_rate", "0.2", "PRESENT"]

            # bad input: a key the service does not take is named, nothing else changes
            entity = screen.query_one("#entity", Input)
            entity.value = "rider=3"
            await pilot.press("enter")
            status = screen.query_one("#features-status", Static)
            await until(pilot, lambda: "entity key 'rider'" in str(status.render()), "the error")
            assert lookup.row_count == 0

    asyncio.run(scenario())
