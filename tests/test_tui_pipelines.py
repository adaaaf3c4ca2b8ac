"""The Pipelines screen through Pilot: runs, the DAG drawn with live step states, a step's
job log, retry and cancel behind a confirmation, and triggers listed and removed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.widgets import DataTable, Static

from appliance.core.context import Appliance
from appliance.core.pipeline_runs import get_run, run_pipeline, wait_run
from appliance.core.pipeline_triggers import list_triggers, schedule_pipeline
from appliance.tui.app import ApplianceApp
from appliance.tui.pipelines import dag_layers, draw_dag
from tests.pilot import until

STEP = """
import sys, time, pathlib
name, pause = sys.argv[1], float(sys.argv[2])
time.sleep(pause)
if pathlib.Path(f"fail-{name}").exists():
    print(f"{name} was told to fail", file=sys.stderr)
    sys.exit(3)
print(f"{name} done")
"""
PIPELINE = """
name: tui
params: {pause: 0}
steps:
  a: {script: step.py, args: [a, "${params.pause}"]}
  b: {script: step.py, args: [b, "${params.pause}"], after: a}
  c: {script: step.py, args: [c, 0], after: b}
  side: {script: step.py, args: [side, 0]}
"""


def test_the_dag_is_drawn_in_columns_with_state_glyphs() -> None:
    steps = [
        {"step": "prep", "after": [], "state": "cached", "duration_s": 0.0},
        {"step": "left", "after": ["prep"], "state": "succeeded", "duration_s": 1.25},
        {"step": "right", "after": ["prep"], "state": "running", "duration_s": 0.5},
        {"step": "join", "after": ["left", "right"], "state": "pending", "duration_s": None},
        {"step": "late", "after": ["prep", "join"], "state": "failed", "duration_s": 2.0},
    ]
    assert [[s["step"] for s in layer] for layer in dag_layers(steps)] == [
        ["prep"],
        ["left", "right"],
        ["join"],
        ["late"],
    ]
    lines = draw_dag(steps).plain.splitlines()
    assert lines[0].startswith("↺ prep 0.0s ──▶ ✓ left 1.2s")
    assert "──▶ ○ join ◂left,right" not in lines[0]  # join follows both: said only if not obvious
    assert "○ join" in lines[0] and "✗ late 2.0s ◂prep" in lines[0]
    assert "● right 0.5s" in lines[1]


def test_pipelines_screen_shows_the_dag_logs_retries_cancels_and_removes_triggers(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.tui.jobs import ConfirmScreen
    from appliance.tui.pipelines import PipelinesScreen, StepLogScreen

    project = tmp_path / "project"
    project.mkdir()
    (project / "step.py").write_text(STEP)
    (project / "pipeline.yaml").write_text(PIPELINE)
    (project / "fail-b").touch()
    failed = wait_run(app, run_pipeline(app, project / "pipeline.yaml")["id"], timeout=60)
    assert failed["state"] == "failed"
    schedule_pipeline(app, project / "pipeline.yaml", "0 3 * * *")

    async def scenario() -> None:
        tui = ApplianceApp(app)
        async with tui.run_test(size=(200, 60)) as pilot:
            await pilot.press("p")
            assert isinstance(tui.screen, PipelinesScreen)
            screen = tui.screen
            runs = screen.query_one("#runs", DataTable)
            steps = screen.query_one("#steps", DataTable)
            dag = screen.query_one("#dag", Static)
            triggers = screen.query_one("#triggers", DataTable)
            await until(pilot, lambda: runs.row_count == 1 and steps.row_count == 4, "run shown")
            await until(pilot, lambda: triggers.row_count == 1, "the schedule listed")
            text = str(dag.render())
            assert "✓ a" in text and "✗ b" in text and "○ c" in text and "✓ side" in text

            # the failed step's job log
            names = [s["step"] for s in screen.shown["steps_detail"]]  # in run order
            steps.move_cursor(row=names.index("b"))
            await pilot.press("l")
            await until(pilot, lambda: isinstance(tui.screen, StepLogScreen), "log open")
            log = tui.screen.query_one("#step-log", Static)
            await until(pilot, lambda: "b was told to fail" in str(log.render()), "log text")
            await pilot.press("escape")

            # retry behind a confirmation: the run goes on from b
            (project / "fail-b").unlink()
            await pilot.press("u")
            await until(pilot, lambda: isinstance(tui.screen, ConfirmScreen), "confirm retry")
            await pilot.press("y")
            await until(
                pilot,
                lambda: screen.shown is not None and screen.shown["state"] == "succeeded",
                "retried run succeeded",
                timeout=60,
            )
            await until(pilot, lambda: "✓ c" in str(dag.render()), "c drawn done")

            # cancel a running run behind a confirmation
            long = run_pipeline(app, project / "pipeline.yaml", ["pause=30"], no_cache=True)
            screen.selected = long["id"]
            await until(
                pilot,
                lambda: (
                    screen.shown is not None
                    and screen.shown["id"] == long["id"]
                    and "● a" in str(dag.render())
                ),
                "the long run's first step running",
                timeout=30,
            )
            await pilot.press("x")
            await until(pilot, lambda: isinstance(tui.screen, ConfirmScreen), "confirm cancel")
            await pilot.press("y")
            await until(
                pilot,
                lambda: get_run(app, long["id"])["state"] == "cancelled",
                "cancelled",
                timeout=30,
            )

            # remove the schedule behind a confirmation
            await pilot.press("delete")
            await until(pilot, lambda: isinstance(tui.screen, ConfirmScreen), "confirm remove")
            await pilot.press("y")
            await until(pilot, lambda: not list_triggers(app), "trigger removed")
            await until(pilot, lambda: triggers.row_count == 0, "triggers table empty")

    asyncio.run(scenario())
