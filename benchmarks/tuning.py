"""Tuning speed and quality against bare hyperopt, measured in one run.

    .venv/bin/python benchmarks/tuning.py [--trivial 300] [--job-trials 40] \
        [--lgbm-trials 40] [--rows 50000]

(a) a trivial objective (a quadratic in 3 parameters) for TRIVIAL trials, TPE, sequential:
    bare `hyperopt.fmin` vs a study whose trials run in process (ms per trial, and the
    ratio); then JOB_TRIALS trials run as jobs (a forked `tune-function` body, and a script
    run as a command), one at a time: wall time per trial and its orchestration overhead
    (minus the in-process time per trial).
(b) LGBM_TRIALS trials tuning LightGBM (num_leaves, learning_rate, min_data_in_leaf,
    feature_fraction; 1 thread per trial) on ROWS x 20 synthetic rows: parallel_trials 2 vs 1
    (wall time, speed-up), and the best validation AUC of each vs bare sequential hyperopt
    with the same budget (the bare loop reuses one Dataset, so it needs
    feature_pre_filter=False while min_data_in_leaf varies).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

QUADRATIC = """
def quadratic(p):
    return (p["x"] - 1) ** 2 + (p["y"] + 2) ** 2 + p["z"] ** 2
"""
SCRIPT = """
from appliance import sdk
p = sdk.params()
sdk.log_metric("loss", (p["x"] - 1) ** 2 + (p["y"] + 2) ** 2 + p["z"] ** 2)
"""
XYZ = {"x": {"uniform": [-5, 5]}, "y": {"uniform": [-5, 5]}, "z": {"uniform": [-5, 5]}}
LGBM_SPACE = {
    "num_leaves": {"randint": [8, 128]},
    "learning_rate": {"loguniform": [0.01, 0.3]},
    "min_data_in_leaf": {"quniform": [5, 100, 5]},
    "feature_fraction": {"uniform": [0.5, 1.0]},
}


def bare_trivial(trials: int) -> float:
    """ms per trial of hyperopt.fmin alone."""
    from hyperopt import Trials, fmin, hp, tpe

    space = {k: hp.uniform(k, *v["uniform"]) for k, v in XYZ.items()}

    def objective(p: dict[str, float]) -> float:
        return (p["x"] - 1) ** 2 + (p["y"] + 2) ** 2 + p["z"] ** 2

    started = time.perf_counter()
    fmin(
        objective,
        space,
        tpe.suggest,
        trials,
        trials=Trials(),
        rstate=np.random.default_rng(0),
        show_progressbar=False,
    )
    return (time.perf_counter() - started) / trials * 1000


def study_ms_per_trial(app: Any, spec: dict[str, Any], wait: bool) -> tuple[float, dict]:
    """ms per trial of a study, timed by its driver (its own start is not a trial's)."""
    from appliance.core import studies

    if wait:
        study = studies.create_study(app, spec)
        done = studies.wait_study(app, study["id"], timeout=900)
    else:
        study = studies.create_study(app, spec, start=False)
        studies.drive_study(app, study["id"])
        done = studies.get_study(app, study["id"])
    assert done["state"] == "succeeded", done
    return done["elapsed_s"] / done["trials"] * 1000, done


def lgbm_data(rows: int, tmp: Path, app: Any) -> tuple[Any, ...]:
    from appliance.core import datasets

    rng = np.random.default_rng(7)
    x = rng.normal(size=(rows, 20))
    signal = x[:, 0] + 0.8 * x[:, 1] * x[:, 2] - 0.6 * x[:, 3] ** 2 + 0.4 * np.sin(3 * x[:, 4])
    y = (signal + rng.normal(scale=0.8, size=rows) > 0).astype(int)
    cut = int(rows * 0.8)
    names = [f"f{i}" for i in range(20)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, sl in (("bench_train", slice(0, cut)), ("bench_valid", slice(cut, rows))):
        table = pa.table({**{n: x[sl, i] for i, n in enumerate(names)}, "label": y[sl]})
        path = tmp / f"{name}.parquet"
        pq.write_table(table, path)
        datasets.import_data(app, name, path)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def bare_lgbm(data: tuple[Any, ...], trials: int) -> float:
    """Best validation AUC of sequential hyperopt over LightGBM with the same space."""
    import warnings

    import lightgbm as lgb
    from hyperopt import Trials, fmin, hp, tpe

    warnings.filterwarnings("ignore", message="Overriding the parameters from Reference")

    x_train, y_train, x_valid, y_valid = data
    # One Dataset for every trial: without feature_pre_filter=False, a trial asking for a
    # smaller min_data_in_leaf than the one the Dataset was built with fails.
    train_set = lgb.Dataset(x_train, y_train, params={"feature_pre_filter": False})
    valid_set = lgb.Dataset(x_valid, y_valid, reference=train_set)
    space = {
        "num_leaves": hp.randint("num_leaves", 8, 129),
        "learning_rate": hp.loguniform("learning_rate", np.log(0.01), np.log(0.3)),
        "min_data_in_leaf": hp.quniform("min_data_in_leaf", 5, 100, 5),
        "feature_fraction": hp.uniform("feature_fraction", 0.5, 1.0),
    }

    def objective(p: dict[str, Any]) -> float:
        params = {
            "objective": "binary",
            "metric": ["binary_logloss", "auc"],
            "verbosity": -1,
            "num_threads": 1,
            "seed": 42,
            "num_leaves": int(p["num_leaves"]),
            "learning_rate": p["learning_rate"],
            "min_data_in_leaf": int(p["min_data_in_leaf"]),
            "feature_fraction": p["feature_fraction"],
        }
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=200,
            valid_sets=[valid_set],
            callbacks=[lgb.early_stopping(20, first_metric_only=True, verbose=False)],
        )
        # the kept iteration's AUC, as the appliance's trainer reports it
        return -float(booster.best_score["valid_0"]["auc"])

    trials_obj = Trials()
    fmin(
        objective,
        space,
        tpe.suggest,
        trials,
        trials=trials_obj,
        rstate=np.random.default_rng(0),
        show_progressbar=False,
    )
    return -min(trials_obj.losses())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trivial", type=int, default=300)
    parser.add_argument("--job-trials", type=int, default=40)
    parser.add_argument("--lgbm-trials", type=int, default=40)
    parser.add_argument("--rows", type=int, default=50_000)
    args = parser.parse_args()
    os.environ["APPLIANCE_AGENT_IDLE_EXIT"] = "600"  # stays up between parts; stopped at the end

    import hyperopt.tpe  # noqa: F401  (imported once, as a driver would have it)

    from appliance.core.agent import agent_status, ensure_agent, stop_agent
    from appliance.core.context import Appliance
    from appliance.core.tuning import parse_study

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "quadratic.py").write_text(QUADRATIC)
        (tmp / "script.py").write_text(SCRIPT)
        app = Appliance.open(tmp / "home")
        try:
            print(f"(a) trivial objective, TPE, {args.trivial} trials, sequential")
            bare = bare_trivial(args.trivial)

            def trivial(name: str, train: dict[str, Any], trials: int) -> dict[str, Any]:
                return parse_study(
                    app,
                    {
                        "name": name,
                        "train": train,
                        "objective": {"metric": "loss", "direction": "minimize"},
                        "space": XYZ,
                        "max_trials": trials,
                    },
                )

            ensure_agent(app)  # running, as it is as a service: its start is not a trial's cost
            while not agent_status(app)["running"]:
                time.sleep(0.05)
            function = {"script": str(tmp / "quadratic.py"), "function": "quadratic"}
            inproc, _ = study_ms_per_trial(
                app, trivial("inproc", {**function, "in_process": True}, args.trivial), False
            )
            print(f"  bare hyperopt.fmin         {bare:8.2f} ms/trial")
            print(f"  appliance tune, in process {inproc:8.2f} ms/trial")
            print(f"  ratio in-process / bare: {inproc / bare:.2f}x (target <= 2x)")
            for label, train in (
                ("function job (forked)", function),
                ("script job (command)", {"script": str(tmp / "script.py")}),
            ):
                per_trial, _ = study_ms_per_trial(
                    app, trivial(label.split()[0], train, args.job_trials), True
                )
                print(
                    f"  {label:<26} {per_trial:8.2f} ms/trial over {args.job_trials} trials; "
                    f"orchestration overhead {per_trial - inproc:.0f} ms/trial (target < 150)"
                )

            print(
                f"(b) LightGBM, {args.lgbm_trials} trials, {args.rows:,} x 20 rows, "
                "1 thread per trial"
            )
            data = lgbm_data(args.rows, tmp, app)
            results = {}
            for parallel in (1, 2):
                spec = parse_study(
                    app,
                    {
                        "name": f"lgbm-p{parallel}",
                        "train": {
                            "trainer": "lightgbm",
                            "train": "bench_train",
                            "valid": "bench_valid",
                            "label": "label",
                        },
                        "objective": {"metric": "valid_auc", "direction": "maximize"},
                        "space": LGBM_SPACE,
                        "max_trials": args.lgbm_trials,
                        "parallel_trials": parallel,
                    },
                )
                started = time.perf_counter()
                _, done = study_ms_per_trial(app, spec, True)
                results[parallel] = (time.perf_counter() - started, done["best_value"])
                print(
                    f"  parallel_trials {parallel}: {results[parallel][0]:7.1f} s wall, "
                    f"best valid AUC {done['best_value']:.4f}"
                )
            started = time.perf_counter()
            bare_auc = bare_lgbm(data, args.lgbm_trials)
            print(
                f"  bare sequential hyperopt:   {time.perf_counter() - started:7.1f} s wall, "
                f"best valid AUC {bare_auc:.4f}"
            )
            print(
                f"  speed-up parallel 2 vs 1: {results[1][0] / results[2][0]:.2f}x (target >= 1.6x)"
            )
            for parallel in (1, 2):
                gap = bare_auc - results[parallel][1]
                print(f"  AUC gap to bare, parallel {parallel}: {gap:+.4f} (target <= 0.002)")
        finally:
            stop_agent(app)
            app.close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
