"""The quickstart end to end, as a user runs it: the real CLI in a fresh temporary home."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.core.context import Appliance
from appliance.core.deployments import get_deployment, list_revisions
from appliance.core.lineage import lineage


@pytest.mark.slow
def test_quickstart_cli_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "fresh"
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "--home", str(home), "quickstart", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [m["ref"] for m in summary["models"]] == ["churn@1", "churn@2"]
    assert all(m["auc"] > 0.9 for m in summary["models"])
    assert summary["served_versions"] == ["1", "2", "1"]
    assert summary["rollback_ok"] is True
    assert summary["url"].startswith("http://127.0.0.1:")
    assert summary["serving"] is False
    assert sum(summary["timings"].values()) < 60
    for step in range(1, 8):  # progress is shown on stderr
        assert f"[{step}/7]" in result.stderr

    app = Appliance.open(home)
    dep = get_deployment(app, "churn")
    assert dep["status"] == "stopped"  # not left running without --keep-serving
    assert [r["action"] for r in list_revisions(app, "churn")] == ["deploy", "deploy", "rollback"]
    graph = lineage(app, "deployment:churn")
    upstream = {n["ref"] for n in graph["upstream"]}
    assert {"model:churn@1", "dataset:churn@1", f"run:{summary['models'][0]['run_id']}"} <= upstream
    app.close()


def test_quickstart_summary_in_shared_home(trained_home: Path) -> None:
    summary = json.loads((trained_home / "summary.json").read_text())
    assert summary["rollback_ok"] and all(m["auc"] > 0.9 for m in summary["models"])


@pytest.mark.slow
def test_quickstart_keep_serving_then_rerun(tmp_path: Path) -> None:
    from appliance.core.deployments import stop_deployment
    from appliance.core.quickstart import run_quickstart

    app = Appliance.open(tmp_path / "h")
    first = run_quickstart(app, keep_serving=True)
    try:
        assert get_deployment(app, "churn")["status"] == "serving"
        second = run_quickstart(app, keep_serving=True)  # reuses dataset, adds versions 3 and 4
        assert second["dataset"] == first["dataset"] == "churn@1"
        assert [m["ref"] for m in second["models"]] == ["churn@3", "churn@4"]
        assert second["served_versions"] == ["3", "4", "3"]
        assert second["url"] == first["url"]  # the same server followed the new revisions
    finally:
        stop_deployment(app, "churn")
        app.close()


@pytest.mark.slow
def test_a_failing_quickstart_leaves_no_server(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import appliance.core.quickstart as qs
    from appliance.core.processes import alive

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("network hiccup")

    monkeypatch.setattr(qs, "predict_v2", broken)
    app = Appliance.open(tmp_path / "h")
    with pytest.raises(RuntimeError):
        qs.run_quickstart(app)
    assert get_deployment(app, "churn")["status"] == "stopped"
    pid = app.db.scalar("SELECT pid FROM deployments WHERE name = 'churn'")
    assert pid is None or not alive(pid)
    app.close()
