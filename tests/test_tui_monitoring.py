"""The Monitoring screen through Pilot: traffic sparklines from the request log, drift
computed on `d` with the worst features first, monitors and the alert a rollback left."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from textual.widgets import DataTable, Static

from appliance.core.context import Appliance
from appliance.core.drift import drift_history
from appliance.tui.app import ApplianceApp
from appliance.tui.sparkline import GapSparkline, bars
from tests.pilot import until
from tests.test_monitoring import _log, _refuse, _train_model


def test_monitoring_screen_shows_traffic_drift_monitors_and_alerts(
    app: Appliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from appliance.core import prediction_log
    from appliance.core.deployments import create_deployment
    from appliance.core.monitors import add_monitor, check_monitors, list_monitors
    from appliance.tui.monitoring import MonitoringScreen

    # the training job's agent never checks the monitor itself: this test does (its check
    # would otherwise find the monitor already checked)
    monkeypatch.setenv("APPLIANCE_SHIP_SECONDS", "inf")
    create_deployment(app, "syn", _train_model(app, tmp_path), start=False)
    rng = np.random.default_rng(5)
    shifted = {
        "a": rng.normal(2, 1, 300),
        "b": rng.normal(0, 1, 300),
        "c": np.array(rng.choice(["x", "y", "z"], 300, p=[0.5, 0.3, 0.2]), dtype=object),
    }
    _log(app, "syn", [{k: v[i : i + 30] for k, v in shifted.items()} for i in range(0, 300, 30)])
    add_monitor(app, "a-drift", "syn", "psi(a) > 0.2", "1h", {})
    assert check_monitors(app)[0]["state"] == "firing"

    async def scenario() -> None:
        tui = ApplianceApp(app)
        async with tui.run_test(size=(200, 60)) as pilot:
            await pilot.press("o")
            assert isinstance(tui.screen, MonitoringScreen)
            screen = tui.screen
            drift = screen.query_one("#drift", DataTable)
            monitors = screen.query_one("#monitors", DataTable)
            alerts = screen.query_one("#alerts", DataTable)
            await until(pilot, lambda: monitors.row_count == 1 and alerts.row_count == 1, "rows")
            checked = list_monitors(app)[0]["checked_at"]  # when, as `monitor list` says it
            assert monitors.get_row_at(0)[4] == time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(checked)
            )
            spark = screen.query_one("#requests-spark", GapSparkline)
            assert sum(v or 0 for v in spark.data) == 10  # ten logged requests in the last hour
            assert len(spark.data) == 61  # every minute of the hour, the quiet ones as 0
            latency = screen.query_one("#latency-spark", GapSparkline)
            assert None in latency.data  # a quiet minute has no p99, not one of 0 ms
            drawn = str(spark.render()).splitlines()
            assert len(drawn) == 3 and "█" in drawn[0] and " " in drawn[-1]  # the quiet minutes
            # the monitor's check stored a drift result: shown worst first
            await until(pilot, lambda: drift.row_count == 3, "drift rows")
            assert drift.get_row_at(0)[0].plain == "a"
            before = len(drift_history(app, "syn"))
            await pilot.press("d")
            await until(pilot, lambda: len(drift_history(app, "syn")) == before + 1, "drift now")
            # logs the shipper holds past the reader's wait: the drift line says so
            monkeypatch.setattr(prediction_log, "FRESH_WAIT", 0.2)
            plog = prediction_log.PredictionLog(app.settings.home, "syn", sample=1.0)
            cols = {k: v[:5] for k, v in shifted.items()}
            plog.record("late", 1, 1, "stable", 200, 0.001, 5, cols, np.full(5, 0.5))
            plog.flush()
            status = screen.query_one("#monitoring-status", Static)
            lock = prediction_log.spool_dir(app.settings.home, "syn") / ".ship.lock"
            with lock.open("a") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                await pilot.press("d")
                # kept in the status line past the reload that follows a drift
                await until(
                    pilot, lambda: "last drift: 1 log file of " in str(status.render()), "note"
                )
            assert "not shipped yet" in str(status.render())
            # a monitor checked while the store is away says what it went without
            monkeypatch.setattr(app.objects, "put_file", _refuse)
            check_monitors(app, force=True)
            await pilot.press("r")
            await until(
                pilot,
                lambda: "judged without them" in str(monitors.get_row_at(0)[-1]),
                "monitor note",
            )

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("values", "width", "height", "drawn"),
    [
        ([], 4, 1, ["    "]),
        ([None, None], 4, 1, ["    "]),  # nothing measured: nothing drawn
        ([8, 0, None, 4], 4, 1, ["█  ▄"]),  # 0 and None blank, bars from zero
        ([1, 100], 2, 1, ["▁█"]),  # the smallest value still shows
        ([2, 4], 4, 1, ["▄▄██"]),  # fewer values than columns: stretched over them all
        ([1, 2, 4], 4, 1, ["▂▂▄█"]),
        ([2, None, 4, 8], 2, 1, ["▂█"]),  # more: the highest of each group
        ([None, None, 1, None], 2, 1, [" █"]),  # a group all None stays blank
        ([16, 8, 1], 3, 2, ["█  ", "██▁"]),  # two lines: 16 steps, 8 fill the lower one
        ([float("nan"), 1, float("inf")], 3, 1, [" █ "]),  # not a number: nothing drawn
        ([float("nan"), 4, None, None], 2, 1, ["█ "]),  # ... nor hiding a number beside it
    ],
)
def test_a_gap_sparkline_draws_bars_from_zero_and_blank_gaps(
    values: list[float | None], width: int, height: int, drawn: list[str]
) -> None:
    assert bars(values, width, height) == drawn
