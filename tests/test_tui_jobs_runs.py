"""The Jobs and Runs screens, driven by Pilot against real jobs and runs."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from textual.widgets import DataTable, Log, ProgressBar, Static

from appliance.core.context import Appliance
from appliance.core.jobs import JobSpec, get_job, submit_job, wait_job
from appliance.core.runs import runs_table
from appliance.tui.app import ApplianceApp
from appliance.tui.jobs import ConfirmScreen, JobsScreen, progress_cell
from appliance.tui.runs import RunsScreen
from tests.pilot import until

LONG_JOB = """
import json, sys, time
for step in range(1, 10_000):
    print(f"working on step {step}", flush=True)
    print(json.dumps({"type": "progress", "done": step, "total": 400}), flush=True)
    time.sleep(0.05)
"""


def _cells(table: DataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


def test_progress_cell_draws_a_bar() -> None:
    assert progress_cell(0.5, "running", width=10) == "█████░░░░░  50%"
    assert progress_cell(None, "queued") == ""
    assert progress_cell(7.0, "running", width=4) == "████ 100%"  # clamped


def test_jobs_screen_follows_a_running_job_and_cancels_it_after_confirming(home: Path) -> None:
    ctx = Appliance.open(home)
    hello = "print('the finished job says hi')"
    done = submit_job(ctx, JobSpec(kind="command", command=[sys.executable, "-c", hello]))
    wait_job(ctx, done["id"], timeout=60)
    running = submit_job(ctx, JobSpec(kind="command", command=[sys.executable, "-c", LONG_JOB]))

    async def scenario() -> None:
        app = ApplianceApp(ctx)
        async with app.run_test(size=(160, 45)) as pilot:
            await pilot.press("j")
            assert isinstance(app.screen, JobsScreen)
            screen = app.screen
            table = screen.query_one("#jobs", DataTable)
            await until(pilot, lambda: table.row_count == 2, "two jobs")
            await until(
                pilot,
                lambda: "█" in _cells(table)[0][4] and "running" in _cells(table)[0][3],
                "a progress bar in the running job's row",
            )
            assert screen.selected == running["id"]  # the newest job is highlighted
            bar = screen.query_one("#job-progress", ProgressBar)
            await until(pilot, lambda: (bar.progress or 0) > 0, "the progress widget")
            log = screen.query_one("#job-log", Log)
            await until(pilot, lambda: "working on step 3" in "\n".join(log.lines), "log tail")
            lines_before = len(log.lines)
            await until(pilot, lambda: len(log.lines) > lines_before + 5, "the log to follow")

            await pilot.press("c")
            assert isinstance(app.screen, ConfirmScreen)
            assert running["id"] in str(app.screen.query_one("#question", Static).render())
            await pilot.press("n")  # declined: nothing happens
            assert isinstance(app.screen, JobsScreen)
            await pilot.pause(0.3)
            assert get_job(ctx, running["id"])["state"] == "running"

            await pilot.press("c")
            await pilot.press("y")
            await until(
                pilot,
                lambda: get_job(ctx, running["id"])["state"] == "cancelled",
                "the job to be cancelled",
            )
            await until(
                pilot, lambda: "cancelled" in _cells(table)[0][3], "the row to say cancelled"
            )

            await pilot.press("down")  # the finished job: its log, and cancel refuses
            await until(pilot, lambda: screen.selected == done["id"], "the cursor to move")
            await until(
                pilot, lambda: "the finished job says hi" in "\n".join(log.lines), "its log"
            )
            await pilot.pause(2.5)  # refreshes come and go; the user's selection stays
            assert screen.selected == done["id"] and table.cursor_row == 1
            await pilot.press("c")
            assert isinstance(app.screen, JobsScreen)  # no confirmation for a finished job

            await pilot.press("escape")
            assert not isinstance(app.screen, JobsScreen)
            await pilot.press("q")

    asyncio.run(scenario())
    ctx.close()


def test_runs_screen_sorts_by_metric_compares_and_draws_curves(trained_home: Path) -> None:
    ctx = Appliance.open(trained_home)
    rows = runs_table(ctx)
    metric = next(
        k
        for k in rows[0]["metric_values"]
        if k.startswith("valid_") and rows[0]["metric_values"][k] != rows[1]["metric_values"][k]
    )
    best_first = [r["id"] for r in runs_table(ctx, sort=f"metric.{metric}")]
    worst_first = [r["id"] for r in runs_table(ctx, sort=f"-metric.{metric}")]

    async def scenario() -> None:
        app = ApplianceApp(ctx)
        async with app.run_test(size=(180, 50)) as pilot:
            await pilot.press("e")
            assert isinstance(app.screen, RunsScreen)
            screen = app.screen
            table = screen.query_one("#runs", DataTable)
            await until(pilot, lambda: table.row_count == 2, "two runs")

            await pilot.press("s", *metric, "enter")  # a bare name sorts by that metric
            await until(pilot, lambda: screen.sort == f"metric.{metric}", "the sort")
            await until(pilot, lambda: [r[1] for r in _cells(table)] == best_first, "order")
            columns = [str(c.label) for c in table.columns.values()]
            assert columns[5].startswith(metric.upper())  # the sorted metric comes first

            await pilot.press("s", *f"-metric.{metric}", "enter")
            await until(pilot, lambda: [r[1] for r in _cells(table)] == worst_first, "reversed")

            # Curves: the highlighted run's validation metric, one point per iteration.
            await until(pilot, lambda: bool(screen.series), "a metric curve")
            assert screen.metric is not None and screen.metric.startswith("valid")
            assert all(len(points) > 1 for points in screen.series.values())
            first_metric = screen.metric
            await pilot.press("m")
            await until(pilot, lambda: screen.metric != first_metric, "the next curve")

            await pilot.press("c")  # fewer than two runs: says so, compares nothing
            other = "up" if table.cursor_row == 1 else "down"
            await pilot.press("space", other, "space")
            await until(pilot, lambda: len(screen.series) == 2, "both runs' curves")
            await pilot.press("c")
            compare = screen.query_one("#compare", Static)
            await until(pilot, lambda: "metrics" in str(compare.render()), "the comparison")
            text = str(compare.render())
            assert "params" in text and metric in text

            await pilot.press("escape")
            assert not isinstance(app.screen, RunsScreen)
            await pilot.press("q")

    asyncio.run(scenario())
    ctx.close()


def test_models_screen_shows_versions_history_card_and_promotes(registry_home: str) -> None:
    from textual.widgets import Input, Markdown

    from appliance.core.registry import get_model_version, set_alias
    from appliance.tui.models import ModelsScreen, PromoteForm

    ctx = Appliance.open(registry_home)
    set_alias(ctx, "churn", "champion", 1, reason="first")

    async def scenario() -> None:
        app = ApplianceApp(ctx)
        async with app.run_test(size=(180, 50)) as pilot:
            await pilot.press("m")
            assert isinstance(app.screen, ModelsScreen)
            screen = app.screen
            versions = screen.query_one("#versions", DataTable)
            history = screen.query_one("#history", DataTable)
            await until(pilot, lambda: versions.row_count == 2, "the versions")
            assert _cells(versions)[0][:2] == ["1", "champion"]
            await until(pilot, lambda: history.row_count == 1, "the alias history")
            assert _cells(history)[0][:3] == ["champion", "", "1"]
            card = screen.query_one("#card", Markdown)
            await until(pilot, lambda: "churn version 2" in card.source, "the latest card")

            screen.query_one("#versions", DataTable).focus()
            await pilot.press("down")  # version 2
            await until(pilot, lambda: screen.version == 2, "version 2 highlighted")
            await pilot.press("p")
            assert isinstance(app.screen, PromoteForm)
            form = app.screen
            form.query_one("#dataset", Input).value = "churn@1"
            form.query_one("#gate", Input).value = "auc >= champion.auc - 0.05"
            form.query_one("#gate", Input).focus()
            await pilot.press("enter")
            await until(
                pilot,
                lambda: get_model_version(ctx, "churn@champion")["version"] == 2,
                "the promotion job to move the alias",
                timeout=60,
            )
            await until(pilot, lambda: history.row_count == 2, "the new history row")
            assert _cells(history)[0][:3] == ["champion", "1", "2"]
            assert screen.report is not None and screen.report["passed"] is True
            await pilot.press("escape")
            assert not isinstance(app.screen, ModelsScreen)
            await pilot.press("q")

    asyncio.run(scenario())
    ctx.close()
