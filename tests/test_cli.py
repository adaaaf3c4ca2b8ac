"""CLI `--json` outputs are machine-readable and carry the fields scripts rely on."""

from __future__ import annotations

from pathlib import Path


def test_listings_as_json(cli, trained_home: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(trained_home)
    datasets = cli("data", "list", "--home", home, "--json").json()
    assert datasets[0]["name"] == "churn" and datasets[0]["rows"] == 5000
    jobs = cli("jobs", "list", "--home", home, "--json").json()
    assert {j["state"] for j in jobs} == {"succeeded"} and len(jobs) == 2
    runs = cli("runs", "list", "--home", home, "--json").json()
    assert {r["experiment"] for r in runs} == {"quickstart"}
    models = cli("models", "list", "--home", home, "--json").json()
    assert models[0]["name"] == "churn" and models[0]["versions"] == 2
    deps = cli("deployments", "list", "--home", home, "--json").json()
    assert "churn" in {d["name"] for d in deps}


def test_show_commands_as_json(cli, trained_home: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(trained_home)
    version = cli("data", "show", "churn@1", "--home", home, "--json").json()
    assert {c["name"] for c in version["schema"]} >= {"churned", "tenure_months"}
    assert len(version["sha256"]) == 64
    model = cli("models", "show", "churn@2", "--home", home, "--json").json()
    assert model["version"] == 2 and model["dataset"] == "churn@1"
    assert model["metrics"]["auc"] > 0.9 and len(model["sha256"]) == 64
    assert model["signature"]["signature"][0]["name"] == "tenure_months"
    run = cli("runs", "show", model["run_id"][:6], "--home", home, "--json").json()
    assert run["id"] == model["run_id"] and run["params"]["num_leaves"] == 31
    assert run["outputs"][0]["name"] == "model"
    job = cli("jobs", "show", run["job_id"], "--home", home, "--json").json()
    assert job["state"] == "succeeded"
    history = cli("runs", "metrics", run["id"], "valid_auc", "--home", home, "--json").json()
    # One point per round until early stopping, then the kept round's value restated and the
    # final evaluation, both at the best iteration: the latest value is the saved model's.
    best = run["params"]["best_iteration"]
    steps = [h["step"] for h in history]
    rounds = len(steps) - 2
    assert steps[:rounds] == list(range(1, rounds + 1)) and steps[rounds:] == [best, best]
    assert best < rounds <= 200
    loss = cli("runs", "metrics", run["id"], "valid_binary_logloss", "--home", home, "--json")
    loss_history = loss.json()
    assert loss_history[-1]["value"] == loss_history[best - 1]["value"]
    assert run["metrics"]["valid_binary_logloss"] == loss_history[best - 1]["value"]
    dep = cli("deployments", "show", "churn", "--home", home, "--json").json()
    assert [r["action"] for r in dep["revisions"]][:3] == ["deploy", "deploy", "rollback"]
    doctor = cli("doctor", "--home", home, "--json").json()
    assert doctor["ok"] and doctor["checks"] == {"metadata": "ok", "object_store": "ok"}


def test_lineage_upstream_and_downstream(cli, trained_home: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(trained_home)
    graph = cli("lineage", "model:churn@1", "--home", home, "--json").json()
    up = [n["ref"] for n in graph["upstream"]]
    assert up[0] == "register:churn@1" and "dataset:churn@1" in up
    assert any(n["ref"].startswith("deployment:churn#") for n in graph["downstream"])
    dataset = cli("lineage", "dataset:churn@1", "--home", home, "--json").json()
    assert {"model:churn@1", "model:churn@2"} <= {n["ref"] for n in dataset["downstream"]}
    run_id = graph["upstream"][2]["ref"].removeprefix("run:")
    run_graph = cli("lineage", f"run:{run_id}", "--home", home, "--json").json()
    assert run_graph["type"] == "Train"
    text = cli("lineage", "deployment:churn", "--home", home)
    assert text.code == 0 and "<- model:churn@1" in text.out


def test_table_output_and_version(cli, trained_home: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("models", "list", "--home", str(trained_home))
    assert result.code == 0 and result.out.splitlines()[0].startswith("NAME")
    assert cli("version").out.strip() == "0.1.0"


def test_home_flag_on_group_or_command(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("--home", str(tmp_path / "a"), "data", "list", "--json").json() == []
    assert cli("data", "list", "--home", str(tmp_path / "b"), "--json").json() == []
    assert (tmp_path / "a" / "metadata.db").exists() and (tmp_path / "b" / "metadata.db").exists()


def test_train_with_wait_shows_progress_and_logs(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from appliance.core.quickstart import sample_csv

    home = str(tmp_path / "h")
    assert cli("data", "import", "c", str(sample_csv()), "--home", home).code == 0
    result = cli(
        "jobs",
        "train",
        "--dataset",
        "c",
        "--target",
        "churned",
        "--param",
        "num_boost_round=20",
        "--cpus",
        "2",
        "--wait",
        "--json",
        "--home",
        home,
    )
    assert result.code == 0, result.err
    job = result.json()
    assert job["state"] == "succeeded"
    assert "100%" in result.err  # the progress bar reached the end
    run = cli("runs", "show", job["run_id"], "--home", home, "--json").json()
    assert run["params"]["num_boost_round"] == 20 and run["metrics"]["auc"] > 0.85
    logs = cli("jobs", "logs", job["id"], "--home", home)
    assert logs.code == 0
    failing = cli(
        "jobs", "run", "--wait", "--home", home, "--", "python3", "-c", "import sys; sys.exit(3)"
    )
    assert failing.code == 1 and "exit code 3" in failing.out


def test_runs_sort_compare_and_delete(cli, trained_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(trained_home)
    by_auc = cli("runs", "list", "--sort", "-metric.auc", "--json", "--home", home).json()
    aucs = [r["metric_values"]["auc"] for r in by_auc]
    assert aucs == sorted(aucs, reverse=True)
    by_leaves = cli("runs", "list", "--sort", "param.num_leaves", "--json", "--home", home).json()
    assert [r["name"] for r in by_leaves] == ["churn-v1", "churn-v2"]
    assert cli("runs", "list", "--sort", "nonsense", "--home", home).code == 2

    ids = [r["id"] for r in by_leaves]
    result = cli("runs", "compare", *ids, "--json", "--home", home).json()
    params = {p["param"]: p for p in result["params"]}
    assert params["num_leaves"]["differs"] and params["num_leaves"]["values"] == [15, 31]
    assert not params["label"]["differs"]
    metrics = {m["metric"]: m for m in result["metrics"]}
    assert metrics["auc"]["better"] == "max" and metrics["valid_binary_logloss"]["better"] == "min"
    assert metrics["auc"]["leader"] == by_auc[0]["id"]
    text = cli("runs", "compare", *ids, "--home", home)
    assert "* num_leaves" in text.out

    refused = cli("runs", "delete", ids[0], "--home", home)
    assert refused.code == 4 and "churn@" in refused.err

    other = str(tmp_path / "h")
    job = cli("jobs", "run", "--wait", "--json", "--home", other, "--", "python3", "-c", "print(1)")
    run_id = job.json()["run_id"]
    assert cli("runs", "delete", run_id, "--home", other).code == 0
    assert cli("runs", "show", run_id, "--home", other).code == 3
