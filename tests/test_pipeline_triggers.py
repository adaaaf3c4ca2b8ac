"""Pipeline triggers: cron schedules (missed times run once), new dataset versions (the run
gets the version as its parameter), the concurrency policy, and the agent firing them."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.core.context import Appliance
from appliance.core.cron import parse_cron
from appliance.core.pipeline_runs import get_run, wait_run
from appliance.core.pipeline_triggers import (
    fire_triggers,
    list_triggers,
    on_new_version,
    remove_trigger,
    schedule_pipeline,
)
from appliance.errors import InvalidInput, NotFound

PIPELINE = """
name: nightly
params: {data: sales, note: x}
steps:
  look: {script: step.py, args: ["${params.data}"]}
"""
STEP = "import sys, pathlib\npathlib.Path('seen.log').open('a').write(sys.argv[1] + '\\n')\n"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "step.py").write_text(STEP)
    (root / "pipeline.yaml").write_text(PIPELINE)
    return root


@pytest.fixture
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test fires triggers itself: no agent may fire them (or run the runs) meanwhile."""
    import appliance.core.agent

    monkeypatch.setattr(appliance.core.agent, "ensure_agent", lambda app: None)


def _runs(app: Appliance) -> list[dict[str, Any]]:
    return app.db.rows("SELECT id, state, trigger, params_json FROM pipeline_runs ORDER BY rowid")


def _import(app: Appliance, tmp_path: Path, name: str, rows: int) -> str:
    from appliance.core.datasets import import_csv

    path = tmp_path / f"{name}-{rows}.csv"
    path.write_text("a,b\n" + "".join(f"{i},{i * 2}\n" for i in range(rows)))
    return str(import_csv(app, path, name)["ref"])


@pytest.mark.parametrize(
    ("text", "after", "expected"),
    [
        ("0 3 * * *", "2026-11-27 03:00", "2026-11-28 03:00"),
        ("*/15 * * * *", "2026-11-27 10:07", "2026-11-27 10:15"),
        ("30 9 * * mon-fri", "2026-11-27 10:00", "2026-11-30 09:30"),  # Friday -> Monday
        ("0 0 1 jan *", "2026-11-27 00:00", "2027-01-01 00:00"),
        ("0 12 13 * 5", "2026-11-27 13:00", "2026-12-04 12:00"),  # day 13 OR a Friday
        ("@daily", "2026-11-27 00:00", "2026-11-28 00:00"),
        ("0 0 29 2 *", "2026-03-01 00:00", "2028-02-29 00:00"),
        ("5 4 * * 7", "2026-11-27 00:00", "2026-11-29 04:05"),  # 7 is Sunday too
        ("0 0 */2 * 1", "2026-11-27 00:00", "2026-12-07 00:00"),  # a starred day: AND
    ],
)
def test_cron_expressions_find_their_next_time(text: str, after: str, expected: str) -> None:
    start = datetime.strptime(after, "%Y-%m-%d %H:%M")
    assert parse_cron(text).next_after(start) == datetime.strptime(expected, "%Y-%m-%d %H:%M")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 3 * *", "expected five fields"),
        ("61 * * * *", "minute: '61' is outside 0-59"),
        ("0 25 * * *", "hour: '25' is outside 0-23"),
        ("0 0 * * fun", "day of week: 'fun' is not a number"),
        ("*/0 * * * *", "minute: step '0' must be a positive number"),
        ("0 0 31 2 *", "never matches"),
    ],
)
def test_a_bad_cron_expression_names_its_field(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_cron(text).next_after(datetime(2026, 1, 1))


def test_a_schedule_missed_during_downtime_runs_once(
    app: Appliance, project: Path, no_agent: None
) -> None:
    trigger = schedule_pipeline(app, project / "pipeline.yaml", "0 3 * * *")
    assert list_triggers(app)[0]["when"] == "cron 0 3 * * *"
    # the agent was down for three nights: the first pass fires once, not three times
    three_days_ago = (datetime.now() - timedelta(days=3)).timestamp()
    app.db.execute(
        "UPDATE pipeline_triggers SET last_fired_at = ? WHERE id = ?",
        (three_days_ago, trigger["id"]),
    )
    started = fire_triggers(app)
    assert len(started) == 1
    assert fire_triggers(app) == []
    app.db.execute("UPDATE pipeline_runs SET state = 'succeeded'")
    upcoming = parse_cron("0 3 * * *").next_after(datetime.now()).timestamp()
    assert fire_triggers(app, now=upcoming - 60) == []
    assert len(fire_triggers(app, now=upcoming + 1)) == 1
    run = _runs(app)[0]
    assert run["trigger"] == f"schedule:{trigger['id']}"
    shown = list_triggers(app)[0]
    assert shown["last_run"] == _runs(app)[-1]["id"] != started[0]
    assert "started run" in shown["last_message"]
    remove_trigger(app, trigger["id"])
    assert list_triggers(app) == []
    with pytest.raises(NotFound):
        remove_trigger(app, trigger["id"])


def test_a_new_dataset_version_starts_one_run_with_it(
    app: Appliance, project: Path, no_agent: None, tmp_path: Path
) -> None:
    _import(app, tmp_path, "sales", 5)
    trigger = on_new_version(app, project / "pipeline.yaml", "sales")
    assert trigger["when"] == "new version of sales -> data"
    assert fire_triggers(app) == []  # versions that existed do not fire it
    _import(app, tmp_path, "sales", 6)
    _import(app, tmp_path, "sales", 7)  # two land before the agent looks: one run, newest
    started = fire_triggers(app)
    assert len(started) == 1
    assert get_run(app, started[0])["params"] == {"data": "sales@3", "note": "x"}
    assert fire_triggers(app) == []


def test_a_trigger_needs_a_parameter_for_the_version(
    app: Appliance, project: Path, no_agent: None
) -> None:
    with pytest.raises(InvalidInput, match="--param-name: say which parameter"):
        on_new_version(app, project / "pipeline.yaml", "orders")
    with pytest.raises(InvalidInput, match="--param-name 'nope': the pipeline has no such"):
        on_new_version(app, project / "pipeline.yaml", "orders", param="nope")
    with pytest.raises(InvalidInput, match="--policy 'race'"):
        schedule_pipeline(app, project / "pipeline.yaml", "@daily", policy="race")
    with pytest.raises(InvalidInput, match="minute"):
        schedule_pipeline(app, project / "pipeline.yaml", "99 * * * *")
    assert list_triggers(app) == []


def test_a_trigger_firing_while_a_run_goes_on_queues_one_or_skips(
    app: Appliance, project: Path, no_agent: None, tmp_path: Path
) -> None:
    """Policy `queue`: one run waits behind the running one, later firings fold into it
    (taking the newest version); policy `skip`: the firing is recorded as skipped. Either
    way two runs of one pipeline never run at once."""
    _import(app, tmp_path, "sales", 5)
    queued = on_new_version(app, project / "pipeline.yaml", "sales")
    app.db.execute(  # a run of this pipeline is going on
        "INSERT INTO pipeline_runs (id, pipeline, definition_json, source, params_json, state, "
        "created_at) VALUES ('aaaaaaaaaaaa', 'nightly', '{}', 'x', '{}', 'running', '2026')"
    )
    _import(app, tmp_path, "sales", 6)
    first = fire_triggers(app)
    assert len(first) == 1 and get_run(app, first[0])["state"] == "queued"
    _import(app, tmp_path, "sales", 7)
    assert fire_triggers(app) == []
    assert "folded into run" in list_triggers(app)[0]["last_message"]
    assert get_run(app, first[0])["params"]["data"] == "sales@3"  # the newest, once
    remove_trigger(app, queued["id"])

    skipping = schedule_pipeline(app, project / "pipeline.yaml", "* * * * *", policy="skip")
    assert fire_triggers(app, now=time.time() + 120) == []
    assert "skipped: run aaaaaaaaaaaa is running" in list_triggers(app)[0]["last_message"]
    remove_trigger(app, skipping["id"])
    app.db.execute("DELETE FROM pipeline_steps WHERE run_id = ?", (first[0],))
    app.db.execute("UPDATE pipeline_runs SET state = 'cancelled'")


def test_the_agent_fires_a_dataset_trigger_and_the_run_reads_the_new_version(
    app: Appliance, project: Path, tmp_path: Path, cli: Any
) -> None:
    _import(app, tmp_path, "sales", 5)
    home = str(app.settings.home)
    made = cli(
        "--home",
        home,
        "pipelines",
        "on-new-version",
        str(project / "pipeline.yaml"),
        "--dataset",
        "sales",
        "--json",
    )
    assert made.code == 0, made.err
    listed = cli("--home", home, "pipelines", "triggers").out
    assert "new version of sales -> data" in listed
    _import(app, tmp_path, "sales", 9)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _runs(app):
        time.sleep(0.1)
    runs = _runs(app)
    assert len(runs) == 1, "the agent did not fire the trigger"
    done = wait_run(app, runs[0]["id"], timeout=60)
    assert done["state"] == "succeeded"
    assert (project / "seen.log").read_text().split() == ["sales@2"]
    removed = cli("--home", home, "pipelines", "remove-trigger", made.json()["id"])
    assert removed.code == 0
