"""Shared fixtures: temporary homes, a trained home reused by read-only tests, a CLI runner."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.cli.main import main
from appliance.core.context import Appliance


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own APPLIANCE_* settings must never leak into a test.
    for key in list(os.environ):
        if key.startswith("APPLIANCE_"):
            monkeypatch.delenv(key)
    # Agents started on demand by a test go away soon after its jobs end.
    monkeypatch.setenv("APPLIANCE_AGENT_IDLE_EXIT", "3")


def stop_studies_of(home: Path) -> None:
    """Stop the tuning studies a test left running (their drivers are processes of their own)."""
    if not (home / "metadata.db").exists():
        return
    from appliance.core.studies import list_studies, stop_study

    appliance = Appliance.open(home)
    try:
        for study in list_studies(appliance):
            if study["state"] in ("running", "stopping"):
                stop_study(appliance, study["id"])
    finally:
        appliance.close()


def stop_deployments(appliance: Appliance) -> None:
    """Stop the model servers a test's pipelines started (they outlive their jobs)."""
    from appliance.core.deployments import stop_deployment

    for row in appliance.db.rows(
        "SELECT name FROM deployments WHERE status = 'serving' AND backend = 'local'"
    ):
        stop_deployment(appliance, row["name"])


def stop_agent_of(home: Path) -> None:
    """Stop the agent a test's jobs started (its running jobs, if any, are cancelled first)."""
    stop_studies_of(home)
    if not (home / "agent.lock").exists():
        return
    from appliance.core.agent import stop_agent
    from appliance.core.jobs import ACTIVE_STATES, cancel_job

    appliance = Appliance.open(home)
    try:
        # runs first: a pipeline's next step must not be queued while its jobs are cancelled
        appliance.db.execute(
            "UPDATE pipeline_runs SET state = 'cancelled' WHERE state IN ('queued', 'running')"
        )
        appliance.db.execute("DELETE FROM pipeline_triggers")
        appliance.db.execute("DELETE FROM monitors")  # they keep an agent up, as triggers do
        for row in appliance.db.rows("SELECT id FROM jobs WHERE state IN (?, ?)", ACTIVE_STATES):
            cancel_job(appliance, row["id"])
        stop_agent(appliance)
        stop_deployments(appliance)
    finally:
        appliance.close()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "home"
    yield path
    stop_agent_of(path)


@pytest.fixture
def app(home: Path) -> Iterator[Appliance]:
    appliance = Appliance.open(home)
    yield appliance
    appliance.close()


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home after a full quickstart (dataset, two runs, two versions, a stopped deployment)."""
    from appliance.core.quickstart import run_quickstart

    home = tmp_path_factory.mktemp("trained") / "home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("APPLIANCE_AGENT_IDLE_EXIT", "3")
        appliance = Appliance.open(home)
        try:
            summary = run_quickstart(appliance)
        finally:
            appliance.close()
    (home / "summary.json").write_text(json.dumps(summary))
    yield home
    stop_agent_of(home)


@pytest.fixture
def registry_home(home: Path) -> str:
    """A home after the quickstart: churn@1 (served by deployment 'churn') and churn@2."""
    from appliance.core.quickstart import run_quickstart

    app = Appliance.open(home)
    try:
        run_quickstart(app)
    finally:
        app.close()
    return str(home)


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run `appliance ARGS...` in-process; returns exit code, stdout and stderr."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
