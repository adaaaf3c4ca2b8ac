"""The Tuning screen through Pilot: studies, the live trial table, the best-so-far curve and
the objective-vs-parameter scatter, and stop and resume behind a confirmation."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.widgets import DataTable, Static

from appliance.core import studies
from appliance.core.context import Appliance
from appliance.core.tuning import parse_study
from appliance.tui.app import ApplianceApp
from tests.pilot import until

OBJECTIVES = """
import time

def quadratic(p):
    return (p["x"] - 1) ** 2 + (0 if p["kind"] == "a" else 1)

def slow(p):
    time.sleep(0.2)
    return (p["x"] - 1) ** 2
"""


def _spec(app: Appliance, script: Path, name: str, function: str, trials: int) -> dict:
    space = {"x": {"uniform": [-3, 3]}}
    if function == "quadratic":
        space["kind"] = {"choice": ["a", "b"]}
    return parse_study(
        app,
        {
            "name": name,
            "train": {"script": str(script), "function": function, "in_process": True},
            "objective": {"metric": "loss", "direction": "minimize"},
            "space": space,
            "max_trials": trials,
        },
    )


def test_tuning_screen_shows_trials_plots_and_stops_and_resumes(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.tui.jobs import ConfirmScreen
    from appliance.tui.tuning import TuningScreen, scatter_points

    script = tmp_path / "objectives.py"
    script.write_text(OBJECTIVES)
    done = studies.create_study(app, _spec(app, script, "done", "quadratic", 12), start=False)
    studies.drive_study(app, done["id"])
    live = studies.create_study(app, _spec(app, script, "live", "slow", 400))  # newest: on top

    async def scenario() -> None:
        tui = ApplianceApp(app)
        async with tui.run_test(size=(200, 60)) as pilot:
            await pilot.press("t")
            assert isinstance(tui.screen, TuningScreen)
            screen = tui.screen
            table = screen.query_one("#studies", DataTable)
            trials = screen.query_one("#trials", DataTable)
            await until(pilot, lambda: table.row_count == 2, "both studies")
            # the live study's trial table grows while it runs
            await until(pilot, lambda: trials.row_count >= 2, "live trials")
            first = trials.row_count
            await until(pilot, lambda: trials.row_count > first, "more live trials")
            assert screen.selected == live["id"]

            # stop it behind a confirmation
            await pilot.press("x")
            await until(pilot, lambda: isinstance(tui.screen, ConfirmScreen), "confirm stop")
            await pilot.press("y")
            await until(
                pilot, lambda: studies.get_study(app, live["id"])["state"] == "stopped", "stopped"
            )
            await until(pilot, lambda: screen.shown and screen.shown["state"] == "stopped", "shown")

            # the finished study: its trials, plots and importance
            table.move_cursor(row=1)
            await until(pilot, lambda: screen.selected == done["id"], "done selected")
            await until(
                pilot,
                lambda: screen.shown is not None and screen.shown["id"] == done["id"],
                "done shown",
            )
            await until(pilot, lambda: trials.row_count == 12, "12 trials")
            status = str(screen.query_one("#tuning-status", Static).render())
            assert "12/12 trials" in status and "importance" in status
            assert "study live" not in status  # the stop's answer was about the other study
            assert screen.param == "kind"  # the first parameter; p cycles
            await pilot.press("p")
            assert screen.param == "x"
            rows = screen.shown["trial_rows"]
            xs, ys = scatter_points(rows, "x")
            assert len(xs) == len(ys) == 12 and ys == [t["objective"] for t in rows]
            levels, _ = scatter_points(rows, "kind")
            assert set(levels) <= {"a", "b"}
            best = [v for _, v in studies.best_curve(rows, maximize=False)]
            assert best == sorted(best, reverse=True) and best[-1] == screen.shown["best_value"]

            # a finished study: the core refuses, and the screen says why
            await pilot.press("u")
            await until(pilot, lambda: isinstance(tui.screen, ConfirmScreen), "confirm resume")
            await pilot.press("y")
            status_line = screen.query_one("#tuning-status", Static)
            await until(
                pilot, lambda: "already finished" in str(status_line.render()), "refusal shown"
            )
            assert studies.get_study(app, done["id"])["state"] == "succeeded"

            # resume the stopped one
            table.move_cursor(row=0)
            await until(pilot, lambda: screen.selected == live["id"], "live selected")
            await pilot.press("u")
            await until(pilot, lambda: isinstance(tui.screen, ConfirmScreen), "confirm resume")
            await pilot.press("y")
            await until(
                pilot, lambda: studies.get_study(app, live["id"])["state"] == "running", "resumed"
            )
        studies.stop_study(app, live["id"])

    asyncio.run(scenario())
