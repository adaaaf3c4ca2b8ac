"""Monitoring: the prediction log (bounded, off the request path, shipped as Parquet, kept
in the spool while the store is away), drift on synthetic data with a known shift, feedback
and live quality, monitors and the rollback they can trigger, and the report."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.core.context import Appliance
from appliance.core.prediction_log import PredictionLog, log_files, ship_logs, spool_dir
from appliance.errors import InvalidInput

N_TRAIN = 4000


@pytest.fixture(autouse=True)
def _checks_are_the_tests_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agents these tests start (a training job's) never ship or check monitors on their
    own: each test ships and checks itself, and an agent's check just before the test's own
    would take the monitor it means to check. A test of the agent's passes sets its own."""
    monkeypatch.setenv("APPLIANCE_SHIP_SECONDS", "inf")


def _train_model(app: Appliance, tmp_path: Path) -> str:
    """A model over a, b (numbers) and c (a category), trained on known distributions."""
    from appliance.core.datasets import import_csv
    from appliance.core.jobs import wait_job
    from appliance.core.registry import register_model
    from appliance.core.training import submit_training

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, N_TRAIN), rng.normal(0, 1, N_TRAIN)
    c = rng.choice(["x", "y", "z"], N_TRAIN, p=[0.5, 0.3, 0.2])
    y = ((a + b + (c == "x")) + rng.normal(0, 0.5, N_TRAIN) > 0.5).astype(int)
    path = tmp_path / "train.csv"
    path.write_text("a,b,c,y\n" + "".join(f"{a[i]},{b[i]},{c[i]},{y[i]}\n" for i in range(N_TRAIN)))
    import_csv(app, path, "synthetic")
    job = submit_training(app, "synthetic", "y", params={"num_boost_round": 20})
    done = wait_job(app, job["id"], 120)
    assert done["state"] == "succeeded", done["error"]
    return str(register_model(app, "syn", done["run_id"])["ref"])


def _another_version(app: Appliance, rounds: int = 5) -> str:
    """Another registered version of syn, trained on the same dataset with `rounds` trees."""
    from appliance.core.jobs import wait_job
    from appliance.core.registry import register_model
    from appliance.core.training import submit_training

    job = submit_training(app, "synthetic", "y", params={"num_boost_round": rounds})
    done = wait_job(app, job["id"], 120)
    assert done["state"] == "succeeded", done["error"]
    return str(register_model(app, "syn", done["run_id"])["ref"])


@contextlib.contextmanager
def _live_log(app: Appliance, deployment: str) -> Iterator[PredictionLog]:
    """A live worker's log: its writer thread writes what is recorded within 0.2 s, to a
    file it keeps open for ROTATE_SECONDS (not shippable until then)."""
    import threading

    plog = PredictionLog(app.settings.home, deployment, sample=1.0)
    stop = threading.Event()
    writer = threading.Thread(target=plog.run, args=(stop,), daemon=True)
    writer.start()
    try:
        yield plog
    finally:
        stop.set()
        writer.join(10)


def _written(plog: PredictionLog, count: int) -> None:
    """Until the writer has written `count` requests, to a file still open."""
    deadline = time.monotonic() + 10
    while plog.written < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert plog.written == count and list(plog.directory.glob("*.part"))


@contextlib.contextmanager
def _closed_after_first_look(
    monkeypatch: pytest.MonkeyPatch, target: Any, name: str, plog: PredictionLog
) -> Iterator[list[dict[str, Any]]]:
    """A reader's look (`target.name`) after which the worker's open file closes, as it does
    every ROTATE_SECONDS: no file is open by the time the reader waits. Yields each look's
    keywords."""
    real = getattr(target, name)
    looks: list[dict[str, Any]] = []

    def look_then_rotate(*args: Any, **kw: Any) -> Any:
        looks.append(kw)
        found = real(*args, **kw)
        if plog.files:
            plog.flush()
        return found

    monkeypatch.setattr(target, name, look_then_rotate)
    try:
        yield looks
    finally:
        monkeypatch.setattr(target, name, real)


def _one_row() -> dict[str, Any]:
    """One logged request's inputs: a and b zero, c "x"."""
    return {"a": np.zeros(1), "b": np.zeros(1), "c": np.array(["x"], dtype=object)}


def _closed(directory: Path) -> list[Path]:
    """The spool's files ready to ship, of either format."""
    return [*directory.glob("*.frames"), *directory.glob("*.jsonl")]


def _log(app: Appliance, deployment: str, batches: list[dict[str, Any]], version: int = 1) -> None:
    """Requests as a worker logs them: through PredictionLog, then shipped by the agent."""
    plog = PredictionLog(app.settings.home, deployment, sample=1.0)
    for i, cols in enumerate(batches):
        n = len(next(iter(cols.values())))
        plog.record(f"req{i}", version, 1, "stable", 200, 0.001, n, cols, np.full(n, 0.5))
    plog.flush()
    assert ship_logs(app, deployment)["failed"] == 0


def test_tensor_and_column_requests_log_one_row_per_predicted_row(app: Appliance) -> None:
    import duckdb

    names = ["a", "b"]
    plog = PredictionLog(app.settings.home, "t", sample=1.0)
    plog.record("one", 1, 1, "stable", 200, 0.001, 1, (names, np.array([[1.0, 2.0]])), np.ones(1))
    plog.record(
        "two",
        1,
        1,
        "stable",
        200,
        0.001,
        2,
        (names, np.array([[3.0, 4.0], [5.0, 6.0]])),
        np.array([0.2, 0.3]),
    )
    empty = (names, np.empty((0, 2)))  # no rows: nothing to log but its metadata
    plog.record("none", 1, 1, "stable", 200, 0.001, 0, empty, np.empty(0))
    other = (["a", "c"], np.array([[1.5, np.nan]]))  # a canary's model: other features
    plog.record("canary", 3, 1, "canary", 200, 0.001, 1, other, np.array([0.7]))
    plog.flush()  # a batch of tensors only: binary frames, one per model
    assert sorted(p.name.split("-")[0] + p.suffix for p in _closed(plog.directory)) == [
        "inputs.frames",
        "requests.frames",
    ]
    plog.record("three", 2, 1, "stable", 200, 0.001, 1, (names, np.array([[7.0, 8.0]])), np.ones(1))
    plog.record("four", 2, 1, "stable", 200, 0.001, 1, {"b": [9.0]}, np.zeros(1))
    text = (names, np.array([["x", 1]], dtype=object))
    plog.record("five", 2, 1, "stable", 200, 0.001, 1, text, np.zeros(1))
    plog.flush()  # named columns, and a tensor of text: JSON lines, which DuckDB unifies
    kinds = sorted(p.name.split("-")[0] + p.suffix for p in _closed(plog.directory))
    assert kinds == [*["inputs.frames"] * 2, "inputs.jsonl", *["requests.frames"] * 2]
    assert ship_logs(app, "t") == {
        "shipped": 5,
        "failed": 0,
        "busy": 0,
        "error": None,
        "errors": {},
        "held": [],
    }
    files = ", ".join(f"'{f}'" for f in log_files(app, "t", "inputs"))
    rows = duckdb.sql(
        f"SELECT request_id, row, version, x_a, x_b, x_c, prediction "
        f"FROM read_parquet([{files}], union_by_name = true) ORDER BY ts, row"
    ).fetchall()
    assert rows == [
        ("one", 0, 1, "1.0", 2.0, None, 1.0),  # a: text in one file, so text in all
        ("two", 0, 1, "3.0", 4.0, None, 0.2),
        ("two", 1, 1, "5.0", 6.0, None, 0.3),
        ("canary", 0, 3, "1.5", None, None, 0.7),  # NaN is missing, as in a JSON line
        ("three", 0, 2, "7.0", 8.0, None, 1.0),
        ("four", 0, 2, None, 9.0, None, 0.0),
        ("five", 0, 2, "x", 1.0, None, 0.0),
    ]
    requests = ", ".join(f"'{f}'" for f in log_files(app, "t", "requests"))
    assert duckdb.sql(
        f"SELECT request_id, version, role, status, rows FROM read_parquet([{requests}]) "
        "WHERE request_id IN ('none', 'canary') ORDER BY ts"
    ).fetchall() == [("none", 1, "stable", 200, 0), ("canary", 3, "canary", 200, 1)]


@pytest.fixture
def deployed(app: Appliance, tmp_path: Path) -> str:
    from appliance.core.deployments import create_deployment

    ref = _train_model(app, tmp_path)
    create_deployment(app, "syn", ref, start=False)
    return ref


def test_a_full_queue_drops_samples_never_requests_and_counts_them(tmp_path: Path) -> None:
    plog = PredictionLog(tmp_path, "d", sample=1.0, queue_size=3)
    for i in range(10):  # the writer is not running: the queue fills
        plog.record(f"r{i}", 1, 1, "stable", 200, 0.001, 1, {"a": [1.0]}, np.array([0.5]))
    assert plog.counters() == {
        "queued": 3,
        "dropped": 7,
        "written": 0,
        "error": "the queue is full (the writer is behind)",
    }
    plog.flush()
    assert plog.counters() == {
        "queued": 0,
        "dropped": 7,
        "written": 3,
        "error": "the queue is full (the writer is behind)",
    }
    names = sorted(p.name.split("-")[0] for p in spool_dir(tmp_path, "d").iterdir())
    assert names == ["inputs", "requests"]
    # a full spool: what does not fit is dropped and counted, nothing blocks
    tight = PredictionLog(tmp_path, "d", sample=1.0, spool_limit=1)
    tight.measured = 0.0
    tight.record("x", 1, 1, "stable", 200, 0.001, 1, {"a": [1.0]}, np.array([0.5]))
    tight.flush()
    assert tight.counters()["dropped"] == 1
    assert tight.counters()["error"] == "the spool is full (1 bytes)"  # said, not only counted


def test_the_request_path_appends_to_buffers_and_the_writer_thread_frames_them(
    tmp_path: Path,
) -> None:
    """Code that runs once per batch runs cold, and a second thread that encodes takes the
    interpreter from the serving loop: so a request appends its metadata and tensor to
    column buffers as it is logged (the tensor by reference), the writer frames and writes
    them, and only inputs of other shapes are queued, for the loop to encode between
    requests."""
    plog = PredictionLog(tmp_path, "d", sample=1.0)
    names = ["a"]
    for i in range(3):
        plog.record(f"t{i}", 1, 1, "stable", 200, 0.001, 1, (names, np.ones((1, 1))), np.ones(1))
    hour = plog.hour
    assert hour is not None and hour.items == 3 and list(hour.ids) == ["t0", "t1", "t2"]
    group = hour.tensors[id(names)]
    assert group.xbytes == 3 * 8 and [len(p) for p in group.pieces] == [3 * 8]  # one buffer
    assert not plog.pending and not plog.encoded
    plog.next_encode = time.monotonic() + 60
    plog.record("c0", 1, 1, "stable", 200, 0.001, 1, {"a": [1.0]}, np.ones(1))  # not due
    assert (len(plog.pending), len(plog.encoded), hour.items) == (1, 0, 3)
    assert plog._drain() == 3  # the loop is not quiet: the writer writes the buffers only
    assert plog.hour is None and plog.counters() == {
        "queued": 1,
        "dropped": 0,
        "written": 3,
        "error": None,
    }
    plog.next_encode = time.monotonic() - 1  # quiet for a while: the writer encodes c0 too
    assert plog._drain() == 1 and plog.counters()["written"] == 4
    plog.next_encode = time.monotonic() - 1
    plog.record("c1", 1, 1, "stable", 200, 0.001, 1, {"a": [1.0]}, np.ones(1))  # due: at once
    assert (len(plog.pending), len(plog.encoded)) == (0, 1)
    plog.flush()
    assert plog.counters()["queued"] == 0 and plog.counters()["written"] == 5
    # float32 is widened as JSON would give it; integers after floats go to the queue
    plog.record("f4", 1, 1, "stable", 200, 0.001, 1, (names, np.ones((1, 1), "f4")), np.ones(1))
    plog.record("i8", 1, 1, "stable", 200, 0.001, 1, (names, np.ones((1, 1), "i8")), np.ones(1))
    assert plog.hour is not None and plog.hour.tensors[id(names)].xbytes == 8
    assert bytes(plog.hour.tensors[id(names)].pieces[0]) == np.ones((1, 1)).tobytes()
    assert [item[1] for item in plog.pending] == ["i8"]
    plog.hour.end = time.time() // 3600 * 3600  # as if the hour turned: a new one starts
    plog.record("h", 1, 1, "stable", 200, 0.001, 1, (names, np.ones((1, 1))), np.ones(1))
    assert len(plog.sealed) == 1 and plog.hour.items == 1
    plog.flush()
    hours = {p.name.split("-")[1] for p in _closed(plog.directory) if "requests" in p.name}
    assert len(hours) == 2 and plog.counters()["written"] == 8
    # a value the buffers do not take costs that sample, and the columns stay aligned
    plog.requests = False  # the tensor's columns first: its version fails half-way
    plog.record("bad", "v", 1, "stable", 200, 0.001, 1, (names, np.ones((1, 1))), np.ones(1))
    plog.requests = True
    plog.record("bad", 1, 1, "stable", 200, "s", 1, (names, np.ones((1, 1))), np.ones(1))
    plog.record("ok", 1, 1, "stable", 200, 0.001, 1, (names, np.ones((1, 1))), np.ones(1))
    counters = plog.counters()
    assert counters["dropped"] == 2 and counters["queued"] == 1
    assert "TypeError" in counters["error"]
    assert plog.hour is not None and list(plog.hour.ids) == ["ok"]
    assert list(plog.hour.tensors[id(names)].ids) == ["ok"]
    assert [len(p) for p in plog.hour.tensors[id(names)].pieces] == [8]
    # one failing between two in the same buffer: its row is cut from it, the rest ships
    plog.requests = False
    plog.record("bad", "v", 1, "stable", 200, 0.001, 1, (names, np.full((1, 1), 9.0)), np.ones(1))
    plog.requests = True
    plog.record("ok2", 1, 1, "stable", 200, 0.001, 1, (names, np.full((1, 1), 2.0)), np.ones(1))
    group = plog.hour.tensors[id(names)]
    assert list(group.ids) == ["ok", "ok2"] and group.xbytes == 16
    assert bytes(group.pieces[0]) == np.array([1.0, 2.0]).tobytes()
    plog.next_encode = time.monotonic() - 1  # inputs orjson cannot write: counted once
    plog.record("obj", 1, 1, "stable", 200, 0.001, 1, {"a": [object()]}, np.ones(1))
    assert plog.counters()["dropped"] == 4 and plog.counters()["queued"] == 2


def test_a_batch_is_logged_from_its_own_matrix_and_ships_row_for_row(
    app: Appliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1,000-row request's inputs (160 KB) are neither copied on the request path nor
    joined by the writer: the frame's parts are views of the requests' own matrices (on two
    cores, copying 50 MB/s of batches cost the serving worker about a fifth of its
    throughput). What ships is row for row what came, small requests between them too, and
    a batch that failed half-way is left out whole."""
    import duckdb

    from appliance.core import prediction_log

    names = [f"f{i}" for i in range(20)]
    rng = np.random.default_rng(8)
    sent = [
        rng.normal(size=(1000, 20)),
        rng.normal(size=(2, 20)),  # a small one between: its bytes, not a view
        rng.normal(size=(1000, 20)),
        np.asfortranarray(rng.normal(size=(1000, 20))),  # not C-ordered: made so first
    ]
    written: list[Any] = []
    real = prediction_log._SpoolFile.write

    def write(self: Any, data: Any) -> None:
        written.append(data)
        real(self, data)

    monkeypatch.setattr(prediction_log._SpoolFile, "write", write)
    plog = PredictionLog(app.settings.home, "batch", sample=1.0)
    for i, x in enumerate(sent):
        plog.record(f"b{i}", 1, 1, "stable", 200, 0.01, len(x), (names, x), x[:, 0] * 2)
        if i == 1:  # a batch whose version the buffers refuse, after its matrix went in
            plog.requests = False
            bad = rng.normal(size=(1000, 20))
            plog.record("bad", "v", 1, "stable", 200, 0.01, 1000, (names, bad), bad[:, 0])
            plog.requests = True
    assert plog.hour is not None and plog.counters()["dropped"] == 1
    pieces = plog.hour.tensors[id(names)].pieces
    assert [getattr(p, "obj", None) is x for p, x in zip(pieces, sent, strict=True)] == [
        True,
        False,  # the small one: its bytes, in a buffer of their own
        True,
        False,  # made C-ordered first
    ]
    plog.flush()
    views = [part for data in written for part in data if isinstance(part, memoryview)]
    assert len(views) == 3  # the three large matrices, each from its own buffer
    assert bytes(views[0]) == sent[0].tobytes() and bytes(views[2]) == sent[3].tobytes()
    assert ship_logs(app, "batch")["failed"] == 0
    (inputs,) = log_files(app, "batch", "inputs")
    columns = ", ".join(f"x_{n}" for n in names)
    got = duckdb.sql(
        f"SELECT request_id, row, {columns}, prediction FROM read_parquet('{inputs}') "
        "ORDER BY request_id, row"
    ).fetchall()
    expected = np.concatenate(sent)
    assert [r[0] for r in got] == [f"b{i}" for i, x in enumerate(sent) for _ in range(len(x))]
    assert np.array_equal(np.array([r[2:-1] for r in got]), expected)
    assert np.array_equal(np.array([r[-1] for r in got]), expected[:, 0] * 2)


def test_logs_ship_as_parquet_and_wait_in_the_spool_while_the_store_is_away(
    app: Appliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    import duckdb

    plog = PredictionLog(app.settings.home, "d", sample=1.0)
    plog.record(
        "r1",
        2,
        5,
        "canary",
        200,
        0.002,
        2,
        {"a": np.array([1.0, 2.0]), "c": np.array(["x", None], dtype=object)},
        np.array([0.1, 0.9]),
    )
    plog.record("r2", 2, 5, "canary", 400, 0.001, 0, None, None)
    plog.flush()
    real = app.objects.put_file

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise OSError("connection refused")

    monkeypatch.setattr(app.objects, "put_file", unreachable)
    shipped = ship_logs(app)
    assert shipped["shipped"] == 0 and shipped["failed"] == 2
    assert "connection refused" in shipped["error"]
    assert len(_closed(spool_dir(app.settings.home, "d"))) == 2  # kept
    monkeypatch.setattr(app.objects, "put_file", real)
    assert ship_logs(app)["shipped"] == 2
    assert _closed(spool_dir(app.settings.home, "d")) == []
    inputs = log_files(app, "d", "inputs")
    rows = duckdb.sql(
        f"SELECT request_id, row, version, x_a, x_c, prediction FROM read_parquet('{inputs[0]}') "
        "ORDER BY row"
    ).fetchall()
    assert rows == [("r1", 0, 2, 1.0, "x", 0.1), ("r1", 1, 2, 2.0, None, 0.9)]
    (logged,) = log_files(app, "d", "requests")
    requests = duckdb.sql(
        f"SELECT request_id, status, role, rows FROM read_parquet('{logged}') ORDER BY request_id"
    ).fetchall()
    assert requests == [("r1", 200, "canary", 2), ("r2", 400, "canary", 0)]


def test_drift_flags_the_shifted_features_and_not_the_others(app: Appliance, deployed: str) -> None:
    from appliance.core.drift import drift, drift_history

    rng = np.random.default_rng(1)
    n = 2000
    shifted = {
        "a": rng.normal(1.0, 1, n),  # mean moved by one standard deviation
        "b": rng.normal(0, 1, n),  # unchanged
        "c": np.array(rng.choice(["x", "y", "z", "w"], n, p=[0.2, 0.3, 0.2, 0.3]), dtype=object),
    }
    _log(app, "syn", [{k: v[i : i + 100] for k, v in shifted.items()} for i in range(0, n, 100)])
    report = drift(app, "syn", window=3600)
    (served,) = report["versions"]
    assert served["reference"] == "synthetic@1" and served["rows"] == n
    by_name = {f["feature"]: f for f in served["features"]}
    assert by_name["a"]["psi"] > 0.2 and by_name["a"]["p_value"] < 1e-6
    assert by_name["b"]["psi"] < 0.05 and by_name["b"]["p_value"] > 0.001
    assert by_name["c"]["psi"] > 0.2 and by_name["c"]["unseen"] == ["w"]
    assert 0.25 < by_name["c"]["unseen_share"] < 0.35
    assert served["features"][0]["feature"] in ("a", "c")  # worst first
    assert served["prediction"]["psi"] is not None
    assert drift_history(app, "syn")[0]["worst_feature"] == served["features"][0]["feature"]


def test_drift_statistics_are_the_textbook_ones() -> None:
    """Each statistic as scipy computes it on the same values (KS, its asymptotic p-value,
    chi-square) or as its definition gives it by hand (PSI, missing rates, unseen): a
    threshold a user copies from elsewhere means the same here."""
    from scipy import stats

    from appliance.core.drift import KS_LIMIT_N, categorical_drift, numeric_drift, psi

    def by_hand(ref: Any, cur: Any, edges: Any) -> float:
        """PSI over `edges` (a value on an edge goes above it), from its definition."""
        bins = [-np.inf, *edges, np.inf]
        shares = [np.histogram(v, bins)[0] / v.size for v in (ref, cur)]
        e, a = (np.maximum(s, 1e-4) for s in shares)
        return float(np.sum((a - e) * np.log(a / e)))

    rng = np.random.default_rng(7)
    cases = ((5000, 3000, 0.0), (5000, 3000, 0.1), (5000, 3000, -0.1), (60, 45, 0.5))
    for n, m, shift in (*cases, (2000, 2000, 0.05)):
        ref, cur = rng.normal(0, 1, n), rng.normal(shift, 1, m)
        ref[:10], ref[10:12], cur[:3] = np.nan, -np.inf, np.inf  # none a value: all missing
        got = numeric_drift(ref, cur)
        want = stats.ks_2samp(ref[12:], cur[3:], method="asymp")
        assert got["ks"] == pytest.approx(want.statistic, abs=1e-12)
        assert got["p_value"] == pytest.approx(want.pvalue, rel=1e-9)
        assert got["missing_ref"] == pytest.approx(12 / n)
        assert got["missing"] == pytest.approx(3 / m) and got["rows"] == m
        deciles = np.quantile(ref[12:], np.linspace(0.1, 0.9, 9))
        assert got["psi"] == pytest.approx(by_hand(ref[12:], cur[3:], deciles), rel=1e-9)
    # past KS_LIMIT_N the p-value is Kolmogorov's limit: within 2% of scipy's here
    ref, cur = rng.normal(0, 1, 3 * KS_LIMIT_N), rng.normal(0.02, 1, 3 * KS_LIMIT_N)
    got, want = numeric_drift(ref, cur), stats.ks_2samp(ref, cur, method="asymp")
    assert 1e-6 < want.pvalue < 0.5 and got["ks"] == pytest.approx(want.statistic)
    assert want.pvalue <= got["p_value"] < want.pvalue * 1.02
    limit = stats.kstwobign.sf(want.statistic * np.sqrt(1.5 * KS_LIMIT_N))  # n = m*n/(m+n)
    assert got["p_value"] == pytest.approx(limit, rel=1e-12)  # milliseconds, not seconds
    # ties (a number-coded category): KS reads the CDFs' gap at every value, and a value
    # on a decile edge counts above it
    ref, cur = rng.integers(0, 5, 1000).astype(float), rng.integers(0, 6, 800).astype(float)
    got = numeric_drift(ref, cur)
    assert got["ks"] == pytest.approx(stats.ks_2samp(ref, cur).statistic)
    deciles = np.unique(np.quantile(ref, np.linspace(0.1, 0.9, 9)))
    assert got["psi"] == pytest.approx(by_hand(ref, cur, deciles), rel=1e-9)
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * np.log(1.8) - 0.4 * np.log(0.2))

    ref_c = ["a"] * 500 + ["b"] * 300 + ["c"] * 200
    cur_c = ["a"] * 400 + ["b"] * 300 + ["c"] * 200 + ["d"] * 100
    cur_c += [None] * 40 + [float("nan")] * 10  # missing, as a JSON null or a NaN
    got = categorical_drift(ref_c, cur_c)
    want = stats.chisquare([400, 300, 200], [0.5 * 900, 0.3 * 900, 0.2 * 900])
    assert got["chi2"] == pytest.approx(want.statistic)
    assert got["p_value"] == pytest.approx(want.pvalue)
    e = np.maximum([0.5, 0.3, 0.2, 0.0], 1e-4)
    a = np.array([400, 300, 200, 100]) / 1000
    assert got["psi"] == pytest.approx(float(np.sum((a - e) * np.log(a / e))))
    assert got["unseen"] == ["d"] and got["unseen_share"] == pytest.approx(0.1)
    assert got["missing"] == pytest.approx(50 / 1050) and got["missing_ref"] == 0.0
    assert got["rows"] == 1050
    # a category the reference holds once in 20,001 rows is expected at least 1e-4 of the
    # window (no division by a near-zero share), the expectations scaled back to its size
    ref_c = ["a"] * 12000 + ["b"] * 8000 + ["rare"]
    cur_c = ["a"] * 600 + ["b"] * 380 + ["rare"] * 20
    got = categorical_drift(ref_c, cur_c)
    expected = np.array([12000 / 20001, 8000 / 20001, 1e-4])
    want = stats.chisquare([600, 380, 20], expected / expected.sum() * 1000)
    assert got["chi2"] == pytest.approx(want.statistic) and got["p_value"] == pytest.approx(
        want.pvalue
    )


def test_drift_needs_logs_and_a_training_lineage(
    app: Appliance, deployed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import prediction_log
    from appliance.core.deployments import set_logging
    from appliance.core.drift import drift

    with pytest.raises(InvalidInput, match=r"no logged inputs between .*--sample 0.1'"):
        drift(app, "syn", window=60)  # it logs no inputs: how to log them
    set_logging(app, "syn", sample=1.0)
    with pytest.raises(InvalidInput, match=r"it logs inputs \(--sample 1\); none was logged"):
        drift(app, "syn", window=60)  # not told to do what it does
    with pytest.raises(InvalidInput, match=r"--window"):
        drift(app, "syn", window=0)
    # inputs logged moments ago, still in a worker's open file: drift waits for it
    monkeypatch.setattr(prediction_log, "ROTATE_SECONDS", 1.0)
    with _live_log(app, "syn") as plog:
        rng = np.random.default_rng(2)
        for i in range(250):
            cols = {"a": rng.normal(0, 1, 1), "b": rng.normal(0, 1, 1), "c": np.array(["x"])}
            plog.record(f"now{i}", 1, 1, "stable", 200, 0.001, 1, cols, np.full(1, 0.5))
        _written(plog, 250)
        report = drift(app, "syn", window=60)
    assert report["versions"][0]["rows"] == 250
    for bad in ("0", "-1", "thirty", "nan"):  # how long results stay: named, not a traceback
        monkeypatch.setenv("APPLIANCE_DRIFT_KEEP_DAYS", bad)
        with pytest.raises(InvalidInput, match=rf"APPLIANCE_DRIFT_KEEP_DAYS='{bad}': expected"):
            drift(app, "syn", window=60)
    stored = app.db.scalar("SELECT count(*) FROM drift_results")
    for good in ("", "inf"):  # the default; every result kept
        monkeypatch.setenv("APPLIANCE_DRIFT_KEEP_DAYS", good)
        drift(app, "syn", window=60)
    assert app.db.scalar("SELECT count(*) FROM drift_results") == stored + 2
    # ... or in one that closes just after drift's first look: no file is open any more
    with _live_log(app, "syn") as plog:
        after = time.time()  # a window of these rows alone
        for i in range(220):
            cols = {"a": rng.normal(0, 1, 1), "b": rng.normal(0, 1, 1), "c": np.array(["x"])}
            plog.record(f"late{i}", 1, 1, "stable", 200, 0.001, 1, cols, np.full(1, 0.5))
        _written(plog, 220)
        with _closed_after_first_look(monkeypatch, prediction_log, "log_files", plog):
            report = drift(app, "syn", window=60, end=after + 60)
    assert report["versions"][0]["rows"] == 220
    # a version registered with no training data in its lineage has nothing to compare with
    _log(app, "syn", [{"a": np.zeros(3), "b": np.zeros(3), "c": np.array(["x"] * 3, dtype=object)}])
    app.db.execute("UPDATE model_versions SET dataset_version_id = NULL")
    with pytest.raises(InvalidInput, match=r"syn@1: no training dataset in its lineage"):
        drift(app, "syn", window=3600)


def test_a_row_labelled_twice_in_one_post_is_counted_and_spooled_once(tmp_path: Path) -> None:
    """`POST /feedback` says what `monitor feedback` says of a file: a row labelled twice is
    a duplicate, and its last label the one kept."""
    from appliance.core.feedback import spool_feedback
    from appliance.core.prediction_log import spool_dir

    items = [("a", 0), ("b", 1), ("a", 1), ("b", 1)]
    body = {"feedback": [{"request_id": r, "label": label} for r, label in items]}
    assert spool_feedback(tmp_path, "d", body, "binary", [0, 1]) == {
        "accepted": 4,
        "duplicates": 2,
    }
    (spooled,) = spool_dir(tmp_path, "d").glob("feedback-*.jsonl")
    stored = [json.loads(line) for line in spooled.read_text().splitlines()]
    assert [(s["request_id"], s["row"], s["label"]) for s in stored] == [
        ("a", 0, "1"),
        ("b", 0, "1"),
    ]


def test_feedback_joins_labels_and_quality_is_computed_per_version(
    app: Appliance, deployed: str, tmp_path: Path
) -> None:
    from appliance.core.feedback import add_feedback, quality

    rng = np.random.default_rng(2)
    batches = [
        {"a": rng.normal(0, 1, 1), "b": rng.normal(0, 1, 1), "c": np.array(["x"], dtype=object)}
        for _ in range(40)
    ]
    _log(app, "syn", batches)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "request_id,label\n" + "".join(f"req{i},{i % 2}\n" for i in range(40)) + "ghost,1\n"
    )
    added = add_feedback(app, "syn", labels)
    assert added == {
        "deployment": "syn",
        "labels": 41,
        "stored": 40,
        "duplicates": 0,
        "unmatched": 1,
        "unknown_request_ids": 1,
        "unknown_rows": 0,
    }
    twice = tmp_path / "twice.csv"  # one prediction labelled twice: counted, the last kept
    twice.write_text("request_id,label\nreq3,0\nreq3,1\n")
    added = add_feedback(app, "syn", twice)
    assert (added["labels"], added["stored"], added["duplicates"]) == (2, 1, 1)
    assert app.db.scalar("SELECT label FROM monitor_feedback WHERE request_id = 'req3'") == "1"
    beyond = tmp_path / "rows.csv"  # req0 predicted one row: there is no row 5 to judge
    beyond.write_text("request_id,label,row\nreq0,0,0\nreq0,0,5\nreq0,1,5\nghost,1,0\nghost,0,0\n")
    added = add_feedback(app, "syn", beyond)
    # each label once: stored, a duplicate, or unmatched (of an unknown id or row)
    assert {k: v for k, v in added.items() if k != "deployment"} == {
        "labels": 5,
        "stored": 1,
        "duplicates": 2,
        "unmatched": 2,
        "unknown_request_ids": 1,
        "unknown_rows": 1,
    }
    assert app.db.scalar("SELECT count(*) FROM monitor_feedback WHERE row = 5") == 0
    result = quality(app, "syn", window=3600)
    assert result["matched"] == 40
    (window,) = result["windows"]
    assert window["version"] == 1 and window["labelled"] == 40
    assert window["accuracy"] == 0.5 and 0 <= window["auc"] <= 1  # every prediction 0.5

    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,label\nreq1,1\nreq2,maybe\n")
    with pytest.raises(InvalidInput, match=r"bad.csv:3: label 'maybe': not a class"):
        add_feedback(app, "syn", bad)
    missing = tmp_path / "m.csv"
    missing.write_text("id,label\n1,1\n")
    with pytest.raises(InvalidInput, match=r"m.csv: the header needs request_id"):
        add_feedback(app, "syn", missing)
    assert app.db.scalar("SELECT count(*) FROM monitor_feedback") == 40  # nothing half-stored


def test_a_canary_is_judged_on_its_own_rows_and_a_rollback_acts_on_the_version_that_fired(
    app: Appliance, deployed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from appliance.core.deployments import deploy, deploy_canary, get_deployment
    from appliance.core.monitors import (
        MIN_ROWS,
        Judged,
        _rollback_waits,
        add_monitor,
        check_monitors,
        list_alerts,
    )

    rng = np.random.default_rng(9)

    def rows(n: int, a: float = 0.0, b: float = 0.0) -> dict[str, Any]:
        return {
            "a": rng.normal(a, 1, n),
            "b": rng.normal(b, 1, n),
            "c": np.array(rng.choice(["x", "y", "z"], n, p=[0.5, 0.3, 0.2]), dtype=object),
        }

    _log(app, "syn", [rows(1000)], version=1)
    deploy(app, "syn", _another_version(app))  # revision 2 serves syn@2, whose a has drifted
    _log(app, "syn", [rows(MIN_ROWS, a=3.0)], version=2)
    deploy_canary(app, "syn", _another_version(app), 10)  # syn@3 on 10%, whose b drifts
    _log(app, "syn", [rows(50, b=3.0)], version=3)
    add_monitor(app, "b-drift", "syn", "psi(b) > 0.2 over 1h", "1m", {})
    (few,) = check_monitors(app)  # 50 rows are too few to judge: the stable one is judged
    assert (few["state"], few["version"]) == ("ok", 2)
    assert few["error"] == f"version 3: 50 rows in the window, judged from {MIN_ROWS}"
    _log(app, "syn", [rows(MIN_ROWS - 50, b=3.0)], version=3)
    # a canary with no lineage does not stop the stable version's monitor
    dataset = app.db.scalar("SELECT dataset_version_id FROM model_versions WHERE version = 3")
    app.db.execute("UPDATE model_versions SET dataset_version_id = NULL WHERE version = 3")
    (unknown,) = check_monitors(app, force=True)
    assert (unknown["state"], unknown["version"]) == ("ok", 2)
    assert unknown["error"].startswith("version 3: syn@3: no training dataset in its lineage")
    app.db.execute("UPDATE model_versions SET dataset_version_id = ? WHERE version = 3", (dataset,))
    add_monitor(app, "a-back", "syn", "psi(a) > 0.2 over 1h", "1m", {"rollback": True})
    said = tmp_path / "version.txt"
    script = f"import os; open({str(said)!r}, 'w').write(os.environ['MONITOR_VERSION'])"
    command = {"command": [sys.executable, "-c", script]}
    add_monitor(app, "a-cmd", "syn", "psi(b) > 0.2 over 1h", "1m", command)
    add_monitor(app, "b-back", "syn", "psi(b) > 0.2 over 1h", "1m", {"rollback": True})
    outcomes = {o["monitor"]: o for o in check_monitors(app, force=True)}
    assert outcomes["a-cmd"]["action_result"].startswith("command exited 0")
    assert said.read_text() == "3"  # the command is told whose value fired
    stable = outcomes["a-back"]  # checked first: the stable version fired, not the canary
    assert (stable["state"], stable["version"]) == ("firing", 2)
    assert stable["action_result"] == (
        "waiting: not rolled back: the stable version 2 fired while version 3 is a canary, "
        "and a rollback would only end the canary; tried again if it is aborted (a promotion "
        "leaves it to you)"
    )
    assert outcomes["b-back"]["version"] == 3  # the canary fired: the rollback ends it
    assert outcomes["b-back"]["action_result"] == (
        "rolled back: ended the canary of version 3; revision 2 serves version 2"
    )
    assert get_deployment(app, "syn")["canary_version"] is None
    # checked after b-back in the same pass: the canary had ended, so syn@2 alone is judged
    assert (outcomes["b-drift"]["state"], outcomes["b-drift"]["version"]) == ("ok", 2)
    # the next pass: the canary has ended, so a-back's waiting rollback is tried again
    outcomes = {o["monitor"]: o for o in check_monitors(app, force=True)}
    assert (outcomes["a-back"]["state"], outcomes["a-back"]["version"]) == ("firing", 2)
    assert outcomes["a-back"]["action_result"] == "rolled back: revision 4 serves version 1"
    (alert,) = [a for a in list_alerts(app, "syn") if a["monitor"] == "a-back"]
    assert alert["action_result"] == outcomes["a-back"]["action_result"]  # the same alert
    # checked after a-back in the same pass: syn@1 is judged, on its own rows
    assert (outcomes["b-drift"]["state"], outcomes["b-drift"]["version"]) == ("ok", 1)
    assert check_monitors(app, "a-back", force=True)[0]["state"] == "ok"  # and it resolves
    # the canary and the stable version both fire: the canary ends, the stable one waits
    deploy_canary(app, "syn", _another_version(app), 10)  # syn@4, beside syn@1
    _log(app, "syn", [rows(MIN_ROWS)], version=4)
    add_monitor(app, "output", "syn", "prediction_psi >= 0 over 1h", "1m", {"rollback": True})
    from appliance.core import deployments
    from appliance.errors import ApplianceError

    def slow_workers(*args: Any, **kwargs: Any) -> Any:
        raise ApplianceError("revision 4 recorded, but a worker did not adopt it")

    real_wait_served = deployments.wait_served
    monkeypatch.setattr(deployments, "wait_served", slow_workers)  # ended, then not adopted
    (both,) = check_monitors(app, "output")
    monkeypatch.setattr(deployments, "wait_served", real_wait_served)
    assert both["action_result"] == (
        "waiting: ended the canary of version 4 (revision 4 serves version 1; not yet served "
        "by every worker: revision 4 recorded, but a worker did not adopt it); the stable "
        "version 1 fires too: tried again"
    )
    (again,) = check_monitors(app, "output", force=True)
    assert again["action_result"] == "rolled back: revision 6 serves version 2"
    # what the rollback does, for each way it can fire
    row = {"rule": "psi(a) > 0.2 over 1h"}
    canary_on = {"model_version": 2, "canary_version": 3}
    both = Judged(6.9, 2, {2: 6.9, 3: 0.5}, [])  # the stable one is worse; the canary fires too
    assert _rollback_waits(row, both, canary_on) is None
    assert "traffic together fired" in str(_rollback_waits(row, Judged(5, None, {}, []), canary_on))
    gone = Judged(0.9, 3, {3: 0.9}, [])  # the canary ended meanwhile, by its own rule
    assert "version 3, which fired, is no longer served" in str(
        _rollback_waits(row, gone, {"model_version": 2, "canary_version": None})
    )
    assert (
        _rollback_waits(row, Judged(0.9, 2, {2: 0.9}, []), {**canary_on, "canary_version": None})
        is None
    )


def test_a_rollback_is_never_run_twice_for_one_alert(
    app: Appliance, deployed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import deployments
    from appliance.core.deployments import deploy, get_deployment
    from appliance.core.monitors import add_monitor, check_monitors, list_alerts

    for rounds in (5, 6):  # syn@2 then syn@3, each served in turn
        deploy(app, "syn", _another_version(app, rounds))
    add_monitor(app, "calls", "syn", "rps > 0 over 1h", "1m", {"rollback": True})
    one = _one_row()
    _log(app, "syn", [one], version=2)  # traffic of both: the rule fires whichever serves
    _log(app, "syn", [one], version=3)
    # the rollback commits, then its wait for the workers fails
    real = deployments.wait_served

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("workers")

    monkeypatch.setattr(deployments, "wait_served", broken)
    (first,) = check_monitors(app)
    assert first["action_result"].startswith("waiting: the action failed (KeyError")
    assert get_deployment(app, "syn")["current_revision"] == 4  # it did roll back
    monkeypatch.setattr(deployments, "wait_served", real)
    (second,) = check_monitors(app, force=True)  # tried again: the deployment has moved
    assert second["action_result"] == (
        "not run: the deployment went from revision 3 to 4 since the alert fired (a deploy, a "
        "promotion, a rollback, or this one before it failed); see to it by hand"
    )
    assert get_deployment(app, "syn")["current_revision"] == 4  # not twice
    assert check_monitors(app, force=True)[0].get("alert") is None  # and never again
    # a checker that died while acting: its claim is taken over once it is old, not before
    (alert,) = list_alerts(app, "syn")
    app.db.execute(
        "UPDATE monitor_alerts SET action_result = NULL, claimed_at = ?, from_revision = 4 "
        "WHERE id = ?",
        (time.time() - 60, alert["id"]),
    )
    assert check_monitors(app, force=True)[0].get("alert") is None
    app.db.execute(
        "UPDATE monitor_alerts SET claimed_at = ? WHERE id = ?", (time.time() - 700, alert["id"])
    )
    (taken,) = check_monitors(app, force=True)
    assert taken["action_result"] == "rolled back: revision 5 serves version 3"


def test_a_rollback_with_nowhere_to_go_fails_once_and_one_overtaken_is_not_run(
    app: Appliance, deployed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import monitors
    from appliance.core.deployments import deploy, get_deployment

    one = _one_row()
    _log(app, "syn", [one], version=1)
    monitors.add_monitor(app, "calls", "syn", "rps > 0 over 1h", "1m", {"rollback": True})
    (first,) = monitors.check_monitors(app)
    assert (
        first["action_result"] == "failed: deployment 'syn' has no earlier revision to roll back to"
    )
    assert monitors.check_monitors(app, force=True)[0].get("alert") is None  # final
    monitors.remove_monitor(app, "calls")
    # a version deployed between the judgement and the action: the rollback is not run
    second = _another_version(app)
    real = monitors.judge

    def deployed_meanwhile(*args: Any, **kwargs: Any) -> Any:
        judged = real(*args, **kwargs)
        deploy(app, "syn", second)  # revision 2, after syn@1's traffic was judged
        return judged

    monkeypatch.setattr(monitors, "judge", deployed_meanwhile)
    monitors.add_monitor(app, "calls-2", "syn", "rps > 0 over 1h", "1m", {"rollback": True})
    (overtaken,) = monitors.check_monitors(app)
    assert overtaken["action_result"].startswith(
        "not run: the deployment went from revision 1 to 2 since the alert fired"
    )
    assert get_deployment(app, "syn")["current_revision"] == 2  # the fresh deploy stays


def test_a_rollback_judged_at_one_revision_refuses_another(
    app: Appliance, deployed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import deployments
    from appliance.core.deployments import deploy, deploy_canary, get_deployment, rollback
    from appliance.errors import Changed

    refs = [_another_version(app, rounds) for rounds in (5, 6)]
    deploy(app, "syn", refs[0])  # revision 2 serves syn@2
    # a canary started while the rollback checks its target: refused, the canary kept
    real = deployments._deployable
    started: list[int] = []

    def canary_meanwhile(app_: Appliance, ref: str) -> Any:
        mv = real(app_, ref)
        if not started:
            started.append(1)
            deploy_canary(app, "syn", refs[1], 10)  # revision 3
        return mv

    real__deployable = deployments._deployable
    monkeypatch.setattr(deployments, "_deployable", canary_meanwhile)
    with pytest.raises(Changed):
        rollback(app, "syn", expected=(2, None))
    monkeypatch.setattr(deployments, "_deployable", real__deployable)
    dep = get_deployment(app, "syn")
    assert (dep["current_revision"], dep["canary_revision"]) == (2, 3)
    # the canary promoted while the rollback ends it: refused, not said to be done
    real_end = deployments.end_canary

    def promoted_meanwhile(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("expected") is not None:  # the rollback's call, not the promotion's
            real_end(app, "syn", "promoted", None, None)
        return real_end(*args, **kwargs)

    real_end_canary = deployments.end_canary
    monkeypatch.setattr(deployments, "end_canary", promoted_meanwhile)
    with pytest.raises(Changed):
        rollback(app, "syn", expected=(2, 3))
    monkeypatch.setattr(deployments, "end_canary", real_end_canary)
    dep = get_deployment(app, "syn")
    assert (dep["current_revision"], dep["canary_revision"], dep["model_version"]) == (3, None, 3)


def test_a_monitor_removed_while_it_is_measured_fires_nothing(
    app: Appliance, deployed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import monitors
    from appliance.core.deployments import get_deployment

    monitors.add_monitor(app, "gone", "syn", "rps > 0 over 1h", "1m", {"rollback": True})
    _log(app, "syn", [_one_row()])
    real = monitors.judge

    def judged_while_removed(*args: Any, **kwargs: Any) -> Any:
        monitors.remove_monitor(app, "gone")  # `monitor remove` meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(monitors, "judge", judged_while_removed)
    (outcome,) = monitors.check_monitors(app)
    assert outcome["state"] == "firing" and "alert" not in outcome
    assert monitors.list_alerts(app) == [] and monitors.list_monitors(app) == []
    assert get_deployment(app, "syn")["current_revision"] == 1  # no rollback for it


def test_an_alert_resolved_while_its_action_waits_says_so_and_thresholds_are_checked(
    app: Appliance, deployed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core.monitors import add_monitor, check_monitors, list_alerts

    monitor = add_monitor(app, "calm", "syn", "rps > 1000 over 1h", "1m", {"rollback": True})
    app.db.execute(
        "INSERT INTO monitor_alerts (monitor_id, monitor, deployment, rule, value, fired_at, "
        "action, action_result) VALUES (?, 'calm', 'syn', 'rps > 1000 over 1h', 2000, "
        "'2026-01-01T00:00:00Z', 'rollback', 'waiting: not rolled back: the canary')",
        (monitor["id"],),
    )
    _log(app, "syn", [_one_row()])
    assert check_monitors(app)[0]["state"] == "ok"
    (alert,) = list_alerts(app)
    assert alert["resolved_at"] is not None
    assert alert["action_result"] == "resolved while waiting: not rolled back: the canary"
    add_monitor(app, "drift", "syn", "psi(a) > 0.2 over 1h", "1m", {})
    monkeypatch.setenv("APPLIANCE_MONITOR_MIN_ROWS", "200.0")
    (bad,) = check_monitors(app, "drift")
    assert bad["state"] == "no_data"
    assert bad["error"] == "APPLIANCE_MONITOR_MIN_ROWS='200.0': expected a whole number, 0 or more"
    # a rule stored before `monitor add` refused thresholds no float holds is still read
    app.db.execute("UPDATE monitors SET rule = 'rps > 1e309 over 1h' WHERE name = 'calm'")
    outcomes = {o["monitor"]: o for o in check_monitors(app, force=True)}
    assert outcomes.keys() == {"calm", "drift"} and outcomes["calm"]["state"] == "ok"
    assert len(list_alerts(app)) == 1  # the one resolved above: nothing new fired


def test_monitor_check_exits_non_zero_when_one_fires_and_strict_when_one_is_blind(
    app: Appliance, deployed: str, cli: Any
) -> None:
    home = ("--home", str(app.settings.home))
    _log(app, "syn", [_one_row()])  # one request in the last hour
    for name, rule in [("calm", "rps > 1000 over 1h"), ("blind", "psi(a) > 0.2 over 1h")]:
        said = cli("monitor", "add", name, "--deployment", "syn", "--rule", rule, *home)
        assert said.code == 0, said.err
    said = cli("monitor", "check", *home)  # ok, and no data (200 rows needed): a pass
    assert said.code == 0 and "failing" not in said.err
    said = cli("monitor", "check", "--strict", *home)
    assert said.code == 1 and "failing: blind" in said.err and "calm" not in said.err
    assert cli("monitor", "check", "calm", "--strict", *home).code == 0  # the one named only
    said = cli("monitor", "add", "busy", "--deployment", "syn", "--rule", "rps > 0", *home)
    assert said.code == 0, said.err
    said = cli("monitor", "check", "--json", *home)
    assert said.code == 1 and "failing: busy" in said.err and "blind" not in said.err
    states = {r["monitor"]: r["state"] for r in said.json()}  # the table still comes whole
    assert states == {"blind": "no_data", "busy": "firing", "calm": "ok"}


@pytest.mark.parametrize(
    "state, error, fails, strict_fails",
    [
        ("ok", None, False, False),
        ("ok", "version 2: 40 rows in the window, judged from 200", False, True),  # a note
        ("no_data", None, False, True),
        ("no_data", "no logged inputs", False, True),
        ("firing", None, True, True),
        ("firing", "failed: not rolled back", True, True),
    ],
)
def test_a_check_fails_on_a_firing_monitor_and_strictly_on_one_not_measured_whole(
    state: str, error: str | None, fails: bool, strict_fails: bool
) -> None:
    from appliance.core.monitors import failing

    checked = [{"monitor": "m", "state": state, "error": error}]
    assert failing(checked) == (["m"] if fails else [])
    assert failing(checked, strict=True) == (["m"] if strict_fails else [])


def test_the_cli_names_the_flag_it_refuses(
    app: Appliance, deployed: str, tmp_path: Path, cli: Any
) -> None:
    home = ("--home", str(app.settings.home))
    add = ("monitor", "add", "m", "--deployment", "syn", "--rule", "rps > 1", *home)
    for line, message in [
        ("", "expected a command line"),
        ('say "hi', "No closing quotation"),
        ("env | grep M", "'|' needs a shell, and the command runs without one"),
        ('test "$MONITOR_VALUE" -gt 1', "'$' needs a shell"),  # passed as it is, unexpanded
        ("notify ops # paged", "'#' needs a shell"),
    ]:
        said = cli(*add, "--command", line)
        assert said.code != 0 and "--command" in said.err and message in said.err
    said = cli("deployments", "logging", "syn", "--sample", "1.5", *home)
    assert said.code != 0 and "--sample" in said.err and "--log-sample" not in said.err
    said = cli("monitor", "report", "syn", "--html", str(tmp_path / "nodir" / "r.html"), *home)
    assert said.code == 2 and "--html" in said.err and "no directory" in said.err
    assert cli("monitor", "list", *home, "--json").json() == []  # nothing was added
    said = cli("deploy", deployed, "--name", "syn", "--log-sample", "0.1", *home)
    assert said.code == 0 and "note: deployment syn is stopped; it serves revision" in said.err
    # monitors that no agent checks are said to be so: when it stops, and when they are listed
    said = cli(*add, "--command", "find /nowhere -name '*.tmp' -exec rm {} \\; -o -name 'a|b'")
    assert said.code == 0, said.err
    # the live counters' note: what the running workers' logs dropped
    from appliance.core.serving import state_dir
    from appliance.core.traffic import write_snapshot

    workers = state_dir(app, "syn")
    workers.mkdir(parents=True, exist_ok=True)
    log = {"queued": 0, "dropped": 3, "written": 9, "error": "the spool is full (1 bytes)"}
    write_snapshot(workers / "worker-1.json", {"pid": os.getpid(), "log": log})
    said = cli("deployments", "traffic", "syn", *home)
    assert said.code == 0 and "prediction logs dropped 3 samples" in said.err
    assert cli("deployments", "traffic", "syn", "--json", *home).json()["log"]["dropped"] == 3
    (workers / "worker-1.json").unlink()
    assert cli("agent", "start", *home).code == 0  # the agent the monitor woke, up for sure
    said = cli("agent", "stop", *home)
    assert said.code == 0 and "note: 1 monitor(s) go unchecked while no agent runs" in said.err
    said = cli("monitor", "list", *home)
    assert said.code == 0 and "note: no agent runs, so nothing checks these monitors" in said.err
    assert "CHECKED" in said.out.splitlines()[0]
    assert cli("monitor", "check", "m", *home).code == 0
    checked = cli("monitor", "list", *home, "--json").json()[0]["checked_at"]
    shown = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(checked))
    assert shown in cli("monitor", "list", *home).out  # when it was last checked, to the second


def test_feedback_finds_requests_just_answered_and_reads_files_as_people_write_them(
    app: Appliance, deployed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import prediction_log
    from appliance.core.feedback import _check_label, add_feedback

    monkeypatch.setattr(prediction_log, "ROTATE_SECONDS", 3.0)
    with _live_log(app, "syn") as plog:
        cols = _one_row()
        for i in range(20):
            plog.record(f"now{i}", 1, 1, "stable", 200, 0.001, 1, cols, np.full(1, 0.5))
        _written(plog, 20)  # to a file open for 3 s: not shippable yet
        labels = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
        labels.write_bytes(
            b"\xef\xbb\xbfrequest_id,label\n"
            + b"".join(f"now{i},{i % 2}.0\n".encode() for i in range(20))  # 1.0 is class 1
            + b"ghost,1\n"
        )
        added = add_feedback(app, "syn", labels)
    assert (added["stored"], added["unknown_request_ids"]) == (20, 1)
    stored = {
        r["request_id"]: r["label"]
        for r in app.db.rows("SELECT request_id, label FROM monitor_feedback")
    }
    assert stored["now1"] == "1" and stored["now2"] == "0"
    # a JSON file holding the body POST /feedback takes
    body = tmp_path / "labels.json"
    body.write_text(json.dumps({"feedback": [{"request_id": "now3", "label": 0}]}))
    assert add_feedback(app, "syn", body)["stored"] == 1
    one = tmp_path / "one.json"  # one label, as a person writes it
    one.write_text('{\n  "request_id": "now4",\n  "label": 0\n}\n')
    assert add_feedback(app, "syn", one)["stored"] == 1
    assert app.db.scalar("SELECT label FROM monitor_feedback WHERE request_id = 'now3'") == "0"
    refused = [
        (b"request_id,label\nnow1,1\nnow2,\xff\n", "latin.csv", r"latin.csv:3: not UTF-8"),
        (b"request_id,label\nnow1,1\nnow2,1,extra\n", "wide.csv", r"wide.csv:3: 3 values, "),
        (b'{"request_id": "now1", "label": true}\n', "t.jsonl", r"t.jsonl:1: label True: exp"),
        (b'{"feedback": [{"request_id": "now1", "label": 7}]}', "b.json", r"b.json: feedback\[0\]"),
        (b'{"feedback": []}', "none.json", r"none.json: no labels in it"),
        (b"request_id,label\n", "header.csv", r"header.csv: no labels in it"),
        (b"", "empty.csv", r"empty.csv: no labels in it \(the file is empty\)"),
        (b" \n\n", "blank.csv", r"blank.csv: no labels in it"),
        (b"\n\n", "blank.jsonl", r"blank.jsonl: no labels in it"),
        (b'{"feedback": null}', "null.json", r"null.json: feedback: expected a list"),
        (
            b'{\n "feedback": [\n  {"request_id": "x" "label": 1}\n ]\n}',
            "pretty.json",
            r"pretty.json:3: not JSON",
        ),
        (
            b'{\n "feedback": [{"label": ' + b"1" * 5000 + b"}]\n}",
            "huge.json",
            r"huge.json: not JSON we",
        ),
        (b'{"request_id": "now1", "label": ' + b"1" * 5000 + b"}\n", "big.jsonl", r"big.jsonl:1"),
        (b"\xef\xbb\xbfrequest_id,label\nnow1,1\n\xff\n", "bom.csv", r"bom.csv:3: not UTF-8 text"),
    ]
    for content, name, message in refused:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InvalidInput, match=message):
            add_feedback(app, "syn", tmp_path / name)
    assert app.db.scalar("SELECT count(*) FROM monitor_feedback") == 20  # nothing half-stored
    for label, message in [("nan", "a finite number"), (float("inf"), "a finite number")]:
        with pytest.raises(InvalidInput, match=rf"f.csv:2: label .*: expected {message}"):
            _check_label(label, "regression", [], "f.csv:2")
    with pytest.raises(InvalidInput, match="expected a number, not true or false"):
        _check_label(True, "regression", [], "f.csv:2")
    assert _check_label("2.5", "regression", [], "f.csv:2") == "2.5"
    with pytest.raises(InvalidInput, match="expected a number"):
        _check_label(10**400, "regression", [], "f.jsonl:2")  # no float holds it
    # a 3-row batch whose file closes (rotates) just after the first look found nothing of
    # it: no file is open any more, and the look after the wait finds it all the same
    from appliance.core import feedback as feedback_module

    with _live_log(app, "syn") as plog:
        three = {k: np.repeat(v, 3) for k, v in cols.items()}
        plog.record("batch", 1, 1, "stable", 200, 0.001, 3, three, np.full(3, 0.5))
        _written(plog, 1)
        batch = tmp_path / "batch.csv"
        batch.write_text("request_id,row,label\nbatch,0,0\nbatch,1,1\nbatch,2,0\n")
        mark = prediction_log.shipped_mark(app)
        with _closed_after_first_look(monkeypatch, feedback_module, "_logged_ids", plog) as looks:
            added = add_feedback(app, "syn", batch)
    assert (added["stored"], added["unmatched"]) == (3, 0)
    assert looks == [{}, {"after": mark}] and mark > 0  # the second reads what was shipped since
    since = prediction_log.log_files(app, "syn", "inputs", after=mark)
    assert len(since) == 1 < len(prediction_log.log_files(app, "syn", "inputs"))


def test_a_command_line_that_needs_a_shell_is_found_as_typed() -> None:
    """A monitor's command runs without a shell: what only a shell acts on is refused when
    the monitor is added, unless quoted or escaped; a shell's own line too, as no shell
    reads it before the inner one."""
    from appliance.core.monitors import needs_shell

    for line, found in [
        ("env | grep M", "|"),
        ("env|grep M", "|"),
        ("notify a && notify b", "&"),
        ("echo hi >/tmp/o", ">"),
        ('test "$MONITOR_VALUE" -gt 1', "$"),  # passed as it is, never expanded
        ("echo $1", "$"),
        ("LOG=debug notify.sh", "="),  # a program named LOG=debug
        ("cp a ~/x", "~"),
        ("echo `date`", "`"),
        ("sh -c notify $MONITOR_VALUE", "$"),  # the quotes forgotten: not the shell's
        ("sh -c 'notify \"$MONITOR_VALUE\"' >> /var/log/m.log", ">"),  # the outer line's
        ("notify a # says a", "#"),  # a comment, handed to notify as two words
        ("#notify a", "#"),
        ("(cd /srv && make)", "("),
        ("notify a\nnotify b", "\n"),  # two commands, run as one with four words
        ("curl -s \\\n  http://127.0.0.1:9000/hook", "\n"),  # a shell joins the lines
        ("echo x )", ")"),
        ("cp a b=~/x", "~"),  # bash expands it, an argument too
        ("env PATH=/usr/bin:~/bin notify", "~"),  # after a `:` of one as well
        ("cp conf{,.bak}", "{"),  # brace expansion: two words
        ("notify {'a',b}", "{"),
        ("notify $'a\\tb'", "$"),  # a tab to bash, a backslash and a t without it
        ('notify-send "cost \\$5"', "\\"),  # bash drops that backslash, the split keeps it
        ("notify $[1+2]", "$"),
        ("notify {b,{c}}", "{"),  # braces as bash nests them
        ("notify a{b}c,d}", "{"),
        ("a+=b notify", "="),
        ("a[1]=b notify", "="),
        ("notify a+=~/x", "~"),
        ("notify 'a'\r'b'", "\r"),  # one word to bash, two to the split
        ("! notify", "!"),  # keywords, no program's name
        ("[[ -f /tmp/x ]]", "[["),
        ("time notify ops", "time"),  # bash's own: a program only where one is installed
        ('sh -c "kill \\$(cat /run/app.pid)"', "\\"),  # the outer shell hands on $(...)
        ("bash -c $'notify a\\nnotify b'", "$"),
        ("sh -c notify{,-send}", "{"),  # the outer shell's to expand, unquoted
        ('sh -c "notify $MONITOR_VALUE"', "$"),  # no outer shell: the inner gets `$X` as is
        ("sh -c \"printf '%s' '$MONITOR_NAME fired'\"", "$"),  # and there it is in quotes
    ]:
        assert needs_shell(line) == found, line
    for line in [
        "cut -d ';' -f1 /tmp/x",
        "awk -F '|' '{print $1}' f",
        "find /var/tmp/x -name '*.tmp' -exec rm {} \\;",
        'grep "a$" f',
        "notify --msg 'a & b' --to=ops",
        "sh -c 'notify --value \"$MONITOR_VALUE\" | logger'",  # the inner shell's to expand
        "/bin/bash -c 'a > \"$HOME/b\"'",
        '"LOG=debug" notify.sh',  # quoted: meant as it is
        "notify x~y --dir a~ --dir=~/y",  # bash leaves an option's ~ as it is
        "notify 'a # b' a#b \\#c",
        "find /srv -name '*.log' \\( -size +1M \\)",
        "curl -s http://127.0.0.1:9000/hook?level=warn",  # a glob no file matches: as it is
        "notify 'two\nlines'",
        "notify ops\n",  # a line break at the end separates nothing
        "xargs -I{} cp {} a,b",
        "notify '{a,b}' \\{a,b} {a} v1.2..3",
        "notify \"$'x'\" a\xa0#b",  # bash splits words at blanks and tabs only
        "notify ops\r\n",  # a line pasted from elsewhere
        "notify 'cost \\$5' \"cost $ 5\" 'if' iffy",
        "/usr/bin/time notify ops",
    ]:
        assert needs_shell(line) is None, line


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("psi(a) >> 0.2", "expected METRIC"),
        ("psi > 0.2", "psi needs a feature"),
        ("auc(a) < 0.8", "auc takes no feature"),
        ("lift < 2", "unknown metric 'lift'"),
        ("auc < 0.8 over soon", "over"),
    ],
)
def test_a_rule_that_does_not_parse_is_refused(rule: str, message: str) -> None:
    from appliance.core.monitors import parse_rule

    with pytest.raises(InvalidInput, match=message):
        parse_rule(rule)


def test_a_firing_monitor_records_an_alert_and_rolls_the_deployment_back(
    app: Appliance, deployed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import deployments
    from appliance.core.deployments import deploy, get_deployment, list_revisions
    from appliance.core.monitors import add_monitor, check_monitors, list_alerts, list_monitors

    second = _another_version(app)
    deploy(app, "syn", second)  # revision 2 serves syn@2
    rng = np.random.default_rng(3)
    drifted = {
        "a": rng.normal(3, 1, 500),
        "b": rng.normal(0, 1, 500),
        "c": np.array(["x"] * 500, dtype=object),
    }
    _log(app, "syn", [drifted], version=2)
    add_monitor(app, "a-drift", "syn", "psi(a) > 0.2 over 1h", "1m", {"rollback": True})
    with pytest.raises(InvalidInput, match="only a loopback, private or link-local address"):
        add_monitor(app, "hook", "syn", "auc < 0.5", "1m", {"webhook": "http://8.8.8.8/x"})
    # refused now what could only fail, for good, once the monitor fires
    for never in ("http://user:pw@127.0.0.1:8080/h", "http://127.0.0.1:99999/h", "http://[::1]:0/"):
        with pytest.raises(InvalidInput, match="expected http://HOST"):
            add_monitor(app, "hook", "syn", "auc < 0.5", "1m", {"webhook": never})
    with pytest.raises(InvalidInput, match="the threshold is not a finite number"):
        add_monitor(app, "never", "syn", "psi(a) > 1e309", "1m", {})  # no float holds it

    # a rollback that raises (a locked registry, say) is tried again, not lost
    def locked(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    real_rollback = deployments.rollback
    monkeypatch.setattr(deployments, "rollback", locked)
    (failed,) = check_monitors(app)  # said, and the other monitors are still checked
    assert failed["action_result"] == (
        "waiting: the action failed (OperationalError: database is locked); tried again"
    )
    assert failed["error"] == failed["action_result"]
    (alert,) = list_alerts(app, "syn")
    assert alert["action_result"] == failed["action_result"]
    monkeypatch.setattr(deployments, "rollback", real_rollback)
    (outcome,) = check_monitors(app, force=True)
    assert outcome["state"] == "firing" and outcome["value"] > 0.2
    dep = get_deployment(app, "syn")
    assert (dep["current_revision"], dep["model_version"]) == (3, 1)  # back to syn@1
    (alert,) = list_alerts(app, "syn")
    assert alert["action_result"] == "rolled back: revision 3 serves version 1"
    history = {r["revision"]: r for r in list_revisions(app, "syn")}
    assert history[3]["action"] == "rollback"
    assert history[3]["reason"].startswith("monitor a-drift: psi(a) > 0.2 over 1h (value ")
    # syn@2 is no longer served, so its rows are not judged: no data from syn@1 yet, and
    # the alert stays open through the gap; no second alert, no second rollback
    assert check_monitors(app, force=True)[0]["state"] == "no_data"
    assert len(list_alerts(app, "syn")) == 1 and get_deployment(app, "syn")["current_revision"] == 3
    assert list_monitors(app)[0]["state"] == "no_data"
    assert list_alerts(app, "syn")[0]["resolved_at"] is None
    usual = {
        "a": rng.normal(0, 1, 500),
        "b": rng.normal(0, 1, 500),
        "c": np.array(rng.choice(["x", "y", "z"], 500, p=[0.5, 0.3, 0.2]), dtype=object),
    }
    _log(app, "syn", [usual], version=1)  # the version rolled back to, as it was trained
    (outcome,) = check_monitors(app, force=True)
    assert outcome["state"] == "ok" and outcome["value"] < 0.2
    assert list_alerts(app, "syn")[0]["resolved_at"] is not None
    assert get_deployment(app, "syn")["current_revision"] == 3


def test_monitors_judge_the_versions_served_now_and_refuse_rules_never_measured(
    app: Appliance, deployed: str
) -> None:
    from appliance.core.deployments import deploy
    from appliance.core.monitors import add_monitor, check_monitors, list_alerts, remove_monitor

    rng = np.random.default_rng(8)

    def rows(n: int, shift: float) -> dict[str, Any]:
        return {
            "a": rng.normal(shift, 1, n),
            "b": rng.normal(0, 1, n),
            "c": np.array(rng.choice(["x", "y", "z"], n, p=[0.5, 0.3, 0.2]), dtype=object),
        }

    _log(app, "syn", [rows(1500, 0.0)], version=1)  # the old version: most of the window
    deploy(app, "syn", _another_version(app))  # serves syn@2
    _log(app, "syn", [rows(200, 3.0)], version=2)  # the new one drifts from its first rows
    add_monitor(app, "a-drift", "syn", "psi(a) > 0.2 over 1h", "1m", {})
    add_monitor(app, "b-drift", "syn", "psi(b) > 0.2 over 1h", "1m", {})
    add_monitor(app, "requests", "syn", "rps > 0.4 over 1h", "1m", {})
    outcomes = {o["monitor"]: o for o in check_monitors(app)}
    assert outcomes["a-drift"]["state"] == "firing" and outcomes["a-drift"]["value"] > 1
    assert outcomes["b-drift"]["state"] == "ok"
    # traffic of the versions served: syn@2's request (200 rows), not syn@1's
    assert outcomes["requests"]["value"] == pytest.approx(1 / 3600)
    # a monitor removed while firing leaves no alert open for ever
    (alert,) = [a for a in list_alerts(app, "syn") if a["monitor"] == "a-drift"]
    assert alert["resolved_at"] is None
    remove_monitor(app, "a-drift")
    (alert,) = [a for a in list_alerts(app, "syn") if a["monitor"] == "a-drift"]
    assert alert["resolved_at"] is not None
    # rules the served model could never give a value for
    for rule, message in [
        ("ks(c) > 0.1", r"ks is measured on numeric features; 'c' is categorical in syn@2"),
        ("unseen(a) > 0.01", r"unseen is measured on categorical features; 'a' is numeric"),
        ("rmse > 1", r"syn@2 is a binary model, with no rmse \(it has accuracy, auc, f1"),
        ("r2 < 0.5", r"a binary model, with no r2"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            add_monitor(app, "never", "syn", rule, "1m", {})
    # no request at all is a rate of 0 while the deployment serves (the fixture's is not
    # started: it is marked serving here, with a live pid)
    add_monitor(app, "stopped", "syn", "rps < 1 over 1m", "1m", {})
    later = time.time() + 7200  # nothing logged in the window
    assert check_monitors(app, "stopped", now=later)[0]["state"] == "no_data"
    server = subprocess.Popen(["sleep", "60"])  # a live pid, never signalled as ours
    try:
        app.db.execute(
            "UPDATE deployments SET status = 'serving', pid = ?, port = 1 WHERE name = 'syn'",
            (server.pid,),
        )
        stopped = check_monitors(app, "stopped", now=later, force=True)[0]
        assert (stopped["state"], stopped["value"]) == ("firing", 0.0)
        # a k3s deployment's pods keep their counters: no request logged is no data there
        app.db.execute("UPDATE deployments SET backend = 'k3s' WHERE name = 'syn'")
        assert check_monitors(app, "stopped", now=later, force=True)[0]["state"] == "no_data"
    finally:
        app.db.execute(
            "UPDATE deployments SET backend = 'local', status = 'stopped', pid = NULL "
            "WHERE name = 'syn'"
        )
        server.kill()
        server.wait()


def test_monitors_of_one_deployment_share_each_drift_and_old_results_are_removed(
    app: Appliance, deployed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import drift as drift_module
    from appliance.core import feedback as feedback_module
    from appliance.core.monitors import add_monitor, check_monitors

    rng = np.random.default_rng(5)
    shifted = {
        "a": rng.normal(3, 1, 500),
        "b": rng.normal(0, 1, 500),
        "c": np.array(rng.choice(["x", "y", "z"], 500, p=[0.5, 0.3, 0.2]), dtype=object),
    }
    _log(app, "syn", [shifted])
    computed = []
    real = drift_module.drift

    def counted(app: Appliance, deployment: str, window: float, *args: Any, **kw: Any) -> Any:
        computed.append(window)
        return real(app, deployment, window, *args, **kw)

    monkeypatch.setattr(drift_module, "drift", counted)
    judged = []
    real_quality = feedback_module.quality

    def quality(app: Appliance, deployment: str, *args: Any, **kw: Any) -> Any:
        judged.append(kw["since"])
        return real_quality(app, deployment, *args, **kw)

    monkeypatch.setattr(feedback_module, "quality", quality)
    add_monitor(app, "auc", "syn", "auc < 0.5 over 1h", "1m", {})
    add_monitor(app, "accuracy", "syn", "accuracy < 0.5 over 1h", "1m", {})
    add_monitor(app, "a-hour", "syn", "psi(a) > 0.2 over 1h", "1m", {})
    add_monitor(app, "b-hour", "syn", "psi(b) > 0.2 over 1h", "1m", {})
    add_monitor(app, "output", "syn", "prediction_psi > 100 over 1h", "1m", {})
    add_monitor(app, "a-day", "syn", "psi(a) > 0.2 over 1d", "1m", {})
    computed.clear()  # adding a monitor checks its feature against the model, not the logs
    # a result of a window that ended long ago, and one of another deployment's
    old = time.time() - (drift_module.keep_days() + 1) * 86400
    for deployment in ("syn", "other"):
        app.db.execute(
            "INSERT INTO drift_results (deployment, version, reference, window_start, "
            "window_end, rows, results_json, computed_at) VALUES (?, 1, 'synthetic@1', ?, ?, "
            "1, '{}', '2026-01-01T00:00:00Z')",
            (deployment, old - 3600, old),
        )
    outcomes = {o["monitor"]: o for o in check_monitors(app)}
    # four drift monitors, two windows: two computations, two results stored
    assert sorted(computed) == [3600, 86400]
    assert len(judged) == 1  # two quality monitors over one window: one computation
    assert {name: o["state"] for name, o in outcomes.items()} == {
        "a-day": "firing",
        "a-hour": "firing",
        "accuracy": "no_data",  # no labels
        "auc": "no_data",
        "b-hour": "ok",
        "output": "ok",
    }
    assert outcomes["a-hour"]["value"] == outcomes["a-day"]["value"] > 0.2  # the same rows
    assert outcomes["b-hour"]["value"] < 0.2
    stored = app.db.rows("SELECT deployment, window_end FROM drift_results ORDER BY id")
    # both old ones gone: another deployment's too, which nothing may check any more
    assert [r["deployment"] for r in stored] == ["syn", "syn"]
    assert all(r["window_end"] > old for r in stored)
    plan = app.db.rows("EXPLAIN QUERY PLAN DELETE FROM drift_results WHERE window_end < ?", (old,))
    assert any("drift_results_by_end" in r["detail"] for r in plan)  # no scan of the table
    # a failure is computed once too, and each monitor says it
    app.db.execute("UPDATE model_versions SET dataset_version_id = NULL")
    computed.clear()
    outcomes = {o["monitor"]: o for o in check_monitors(app, force=True)}
    assert sorted(computed) == [3600, 86400]
    assert all(
        "no training dataset in its lineage" in o["error"]
        for name, o in outcomes.items()
        if name not in ("auc", "accuracy")
    )


def test_a_monitor_with_no_data_is_not_firing_and_commands_get_the_alert(
    app: Appliance, deployed: str, tmp_path: Path
) -> None:
    import sys

    from appliance.core.monitors import add_monitor, check_monitors, list_alerts

    add_monitor(app, "quiet", "syn", "p99_ms > 1", "1m", {})
    assert check_monitors(app)[0]["state"] == "no_data"
    out = tmp_path / "alert.txt"
    script = f"import os; open({str(out)!r}, 'w').write(os.environ['MONITOR_RULE'])"
    add_monitor(
        app, "cmd", "syn", "rps > 0 over 1h", "1m", {"command": [sys.executable, "-c", script]}
    )
    _log(app, "syn", [_one_row()])
    fired = {o["monitor"]: o for o in check_monitors(app, force=True)}
    assert fired["cmd"]["state"] == "firing"
    assert fired["cmd"]["action_result"].startswith("command exited 0")
    assert out.read_text() == "rps > 0 over 1h"
    assert [a["monitor"] for a in list_alerts(app)] == ["cmd"]


def test_the_traffic_series_has_every_interval_and_a_quiet_one_is_a_gap(
    app: Appliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A minute with no requests is 0 requests and no p99, a minute of refusals only has no
    p99: the Monitoring screen and the report draw them as gaps, not as 0 ms."""
    from appliance.core import prediction_log
    from appliance.core.monitor_report import render_html, traffic_series
    from appliance.core.traffic import UNROUTED

    now = time.time()
    plog = PredictionLog(app.settings.home, "gaps")  # request metadata only, as by default
    for ago, version, role, status in [
        (50, 1, "stable", 200),
        (50, 1, "stable", 200),
        (20, *UNROUTED, 400),  # refused before a version was chosen
        (2, 1, "stable", 500),
        (-1, 1, "stable", 200),  # ahead of now (a clock stepped back): not drawn yet
    ]:
        monkeypatch.setattr(prediction_log.time, "time", lambda ago=ago: now - ago * 60)
        plog.record(f"r{ago}", version, 1, role, status, 0.004, 1, None, None)
    monkeypatch.undo()
    plog.flush()
    assert ship_logs(app, "gaps")["failed"] == 0
    series = traffic_series(app, "gaps", 3600, 60)
    assert len(series) == 61  # the window's first, partial, minute to this one
    assert sum(s["requests"] for s in series) == 4
    assert [s["t"] for s in series] == [series[0]["t"] + 60 * i for i in range(61)]
    by_minute = {round((now - s["t"]) // 60): s for s in series}
    assert by_minute[50]["requests"] == 2 and by_minute[50]["p99_ms"] == pytest.approx(4.0)
    assert by_minute[20]["requests"] == 1 and by_minute[20]["p99_ms"] is None
    assert by_minute[2]["errors"] == 1 and by_minute[2]["p99_ms"] == pytest.approx(4.0)
    quiet = [s for m, s in by_minute.items() if m not in (50, 20, 2)]
    assert len(quiet) == 58 and all(s["requests"] == s["errors"] == 0 for s in quiet)
    assert all(s["p99_ms"] is None for s in quiet)
    assert traffic_series(app, "never-logged", 3600, 60) == []
    # the page's p99 line breaks at the gaps: two lone points, each a dot and no line
    report = {
        "deployment": "gaps",
        "model": "m",
        "version": 1,
        "revision": 1,
        "status": "serving",
        "window_s": 3600,
        "generated_at": now,
        "versions": [],
        "series": series,
        "drift": None,
        "quality": {"labels": 0, "windows": []},
        "alerts": [],
    }
    page = render_html(report, tmp_path / "gaps.html").read_text()
    latency = page[page.index("p99 latency</figcaption>") :].split("</figure>")[0]
    assert latency.count("<circle") == 2
    assert all(len(p.split()) == 1 for p in re.findall(r'<polyline[^>]*points="([^"]*)"', latency))


def test_the_report_is_text_and_one_self_contained_page(
    app: Appliance, deployed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import prediction_log
    from appliance.core.monitor_report import build_report, render_html, render_text

    # requests answered moments ago, still in a worker's open file: the report waits for them
    monkeypatch.setattr(prediction_log, "ROTATE_SECONDS", 1.0)
    with _live_log(app, "syn") as plog:
        for i in range(20):
            plog.record(f"now{i}", 1, 1, "stable", 200, 0.001, 1, _one_row(), np.full(1, 0.5))
        _written(plog, 20)
        assert build_report(app, "syn", 3600)["versions"][0]["requests"] == 20
    # ... or in one that closes just after its first look: it looks again all the same. The
    # record of what was shipped is forgotten first, so that the first look finds nothing
    app.db.execute("DELETE FROM prediction_logs WHERE deployment = 'syn'")
    with _live_log(app, "syn") as plog:
        for i in range(20):
            plog.record(f"now{i}", 1, 1, "stable", 200, 0.001, 1, _one_row(), np.full(1, 0.5))
        _written(plog, 20)
        with _closed_after_first_look(monkeypatch, prediction_log, "log_files", plog):
            assert build_report(app, "syn", 3600)["versions"][0]["requests"] == 20
    rng = np.random.default_rng(4)
    _log(
        app,
        "syn",
        [
            {
                "a": rng.normal(0, 1, 50),
                "b": rng.normal(0, 1, 50),
                "c": np.array(["y"] * 50, dtype=object),
            }
        ],
    )
    report = build_report(app, "syn", 3600)
    assert report["versions"][0]["requests"] == 21 and report["versions"][0]["rows"] == 70
    text = render_text(report)
    assert "traffic by version" in text and "drift of version 1 against synthetic@1" in text
    assert "), last 1 h" in text
    assert "), last 30 s" in render_text({**report, "window_s": 30})  # not 0.00833333 h
    # samples the workers' logs dropped are said beside the counts that leave them out, and
    # quality is drawn a line per version
    dropped = {"queued": 0, "dropped": 235, "written": 65, "error": "the spool is full (9 bytes)"}
    windows = [
        {"version": v, "window_start": report["generated_at"] - 60, "labelled": 40, "auc": auc}
        for v, auc in ((1, 0.7), (2, 0.8))
    ]
    alert = {"monitor": "m", "rule": "psi(a) > 0.2", "value": 0.3, "action_result": "alert only"}
    alert |= {"fired_at": "2026-01-01T00:00:00Z", "resolved_at": "2026-01-01T01:00:00Z"}
    other = {**report, "log": dropped, "quality": {**report["quality"], "windows": windows}}
    other["alerts"] = [alert]
    said = "logs dropped 235 samples since they started (the first reason a worker gave: the spool"
    assert said in render_text(other)
    assert "RESOLVED_AT" in render_text(other)  # an alert over is not shown as open
    assert "2026-01-01T01:00:00Z" in render_text(other)
    page = render_html(other, tmp_path / "other.html").read_text()
    assert said in page and ">auc, version 1<" in page and ">auc, version 2<" in page
    page = render_html(report, tmp_path / "r.html").read_text()
    assert "<svg" in page and "<table>" in page
    assert "src=" not in page and "http://" not in page and "https://" not in page
    assert "<circle" in page  # one logged request: a dot, where a line needs two points
    json.dumps(report)  # --json prints it as it is
    # a path it cannot write: the error names it, and nothing is left beside it
    for bad, message in [
        (tmp_path / "nodir" / "r.html", "no directory"),
        (tmp_path, "a directory; name the file"),
    ]:
        with pytest.raises(InvalidInput, match=f"--html {re.escape(str(bad))}: {message}"):
            render_html(report, bad)
    # a page that cannot be put in place (a full disk): the earlier report stays whole, and
    # no temporary file is left beside it
    (tmp_path / "r.html").write_bytes(b"the earlier report")

    def full(self: Path, target: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(Path, "replace", full)
        with pytest.raises(InvalidInput, match="r.html: cannot write it: No space left on"):
            render_html(report, tmp_path / "r.html")
    assert (tmp_path / "r.html").read_bytes() == b"the earlier report"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.slow
def test_a_served_deployment_logs_takes_feedback_and_the_agent_ships(
    app: Appliance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any
) -> None:
    """End to end on a real server: request ids come back in `x-request-id`, inputs are
    logged at the sampled share, `POST /feedback` needs the token, and the agent ships the
    spool and stores the labels; quality then joins them."""
    import urllib.error
    import urllib.request

    import duckdb

    from appliance.core.deployments import create_deployment, set_logging, stop_deployment
    from appliance.core.feedback import feedback_token, quality
    from appliance.core.monitor_report import build_report, render_text
    from appliance.core.monitors import add_monitor, check_monitors

    monkeypatch.setenv("APPLIANCE_SHIP_SECONDS", "0.5")
    monkeypatch.setenv("APPLIANCE_LOG_ROTATE_SECONDS", "0.5")
    ref = _train_model(app, tmp_path)
    dep = create_deployment(app, "live", ref)
    try:
        url = dep["url"]
        assert set_logging(app, "live", sample=1.0)["log_sample"] == 1.0
        with pytest.raises(InvalidInput, match="--log-sample"):
            set_logging(app, "live", sample=1.5)
        time.sleep(0.2)  # the workers follow within 20 ms

        def post(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
            request = urllib.request.Request(
                url + path,
                json.dumps(body).encode(),
                {"Content-Type": "application/json", **(headers or {})},
            )
            return urllib.request.urlopen(request, timeout=10)

        ids = []
        for i in range(20):
            body = {
                "inputs": [
                    {"name": "a", "shape": [1], "datatype": "FP64", "data": [float(i % 3)]},
                    {"name": "b", "shape": [1], "datatype": "FP64", "data": [0.5]},
                    {"name": "c", "shape": [1], "datatype": "BYTES", "data": ["x"]},
                ]
            }
            with post("/v2/models/syn/infer", body) as response:
                ids.append(response.headers["x-request-id"])
        assert len(set(ids)) == 20
        with pytest.raises(urllib.error.HTTPError) as refused:
            post("/feedback", {"request_id": ids[0], "label": 1})
        assert refused.value.code == 401
        token = feedback_token(app.settings.home)
        auth = {"Authorization": f"Bearer {token}"}
        with pytest.raises(urllib.error.HTTPError) as bad:
            post("/feedback", {"feedback": [{"request_id": ids[0]}]}, auth)
        assert bad.value.code == 400 and b"feedback[0]: label" in bad.value.read()
        with pytest.raises(urllib.error.HTTPError) as wrong:
            post("/feedback", {"request_id": ids[0], "label": "banana"}, auth)
        assert wrong.value.code == 400 and b"not a class of the model" in wrong.value.read()
        labels = [{"request_id": r, "label": i % 2} for i, r in enumerate(ids)]
        with post("/feedback", {"feedback": labels}, auth) as response:
            assert response.status == 202 and json.loads(response.read()) == {
                "accepted": 20,
                "duplicates": 0,
            }
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stored = app.db.scalar("SELECT count(*) FROM monitor_feedback")
            shipped = app.db.scalar("SELECT count(*) FROM prediction_logs WHERE kind = 'inputs'")
            if stored == 20 and shipped:
                break
            time.sleep(0.2)
        assert (stored, bool(shipped)) == (20, True), "the agent did not ship"
        result = quality(app, "live", window=3600)
        assert result["matched"] == 20 and result["windows"][0]["labelled"] == 20
        shown = cli("--home", str(app.settings.home), "monitor", "quality", "live")
        assert shown.code == 0 and "20 labels, 20 matched" in shown.out
        # refused before a version is chosen: logged too, as version 0, "unrouted"
        with pytest.raises(urllib.error.HTTPError) as malformed:
            urllib.request.urlopen(
                urllib.request.Request(
                    url + "/v2/models/syn/infer",
                    b"{not json",
                    {"Content-Type": "application/json", "x-request-id": "broken"},
                ),
                timeout=10,
            )
        assert malformed.value.code == 400
        with pytest.raises(urllib.error.HTTPError) as unserved:
            post("/v2/models/syn/versions/9/infer", body)
        assert unserved.value.code == 404
        # a stop is graceful for the log too: what was answered just before reaches it
        for i in range(5):
            post("/v2/models/syn/infer", body, {"x-request-id": f"last-{i}"}).close()
    finally:
        stop_deployment(app, "live")
    ship_logs(app, "live")
    files = ", ".join(f"'{f}'" for f in log_files(app, "live", "requests"))
    logged = duckdb.sql(
        f"SELECT request_id FROM read_parquet([{files}]) WHERE request_id LIKE 'last-%'"
    ).fetchall()
    assert sorted(r[0] for r in logged) == [f"last-{i}" for i in range(5)]
    unrouted = duckdb.sql(
        f"SELECT request_id, version, revision, role, status, rows FROM read_parquet([{files}]) "
        "WHERE role = 'unrouted' ORDER BY status"
    ).fetchall()
    assert unrouted == [("broken", 0, 1, "unrouted", 400, 0), ("", 0, 1, "unrouted", 404, 0)]
    # so a client's errors reach the monitors and the report judged on the log
    add_monitor(app, "clients", "live", "client_error_rate > 0.05 over 1h", "1m", {})
    (outcome,) = check_monitors(app, "clients")
    assert outcome["state"] == "firing" and outcome["value"] == pytest.approx(2 / 27)
    report = build_report(app, "live")
    assert [(v["version"], v["requests"]) for v in report["versions"]] == [(0, 2), (1, 25)]
    assert "\n  unrouted " in render_text(report)


def test_webhook_and_pipeline_actions(app: Appliance, deployed: str, tmp_path: Path) -> None:
    """A firing monitor POSTs its alert to a local webhook, or starts a pipeline run."""
    import http.server
    import threading

    from appliance.core.monitors import add_monitor, check_monitors

    received: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the handler's API)
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "step.py").write_text("print('retrain')\n")
    (tmp_path / "retrain.yaml").write_text("name: retrain\nsteps:\n  s: {script: step.py}\n")
    try:
        url = f"http://127.0.0.1:{server.server_port}/alerts"
        add_monitor(app, "hook", "syn", "rps > 0 over 1h", "1m", {"webhook": url})
        add_monitor(
            app,
            "again",
            "syn",
            "rps > 0 over 1h",
            "1m",
            {"pipeline": str(tmp_path / "retrain.yaml")},
        )
        _log(app, "syn", [_one_row()])
        results = {o["monitor"]: o for o in check_monitors(app)}
    finally:
        server.shutdown()
    assert results["hook"]["action_result"] == "webhook answered 204"
    assert received == [
        {
            "monitor_name": "hook",
            "monitor_deployment": "syn",
            "monitor_rule": "rps > 0 over 1h",
            "monitor_value": repr(results["hook"]["value"]),
            "monitor_version": "",  # traffic pools the versions served
        }
    ]
    assert results["again"]["action_result"].startswith("started pipeline run ")
    assert app.db.rows("SELECT pipeline, trigger FROM pipeline_runs") == [
        {"pipeline": "retrain", "trigger": "monitor:again"}  # who started it, for the audit
    ]


def test_review_faults_missing_categories_bad_files_and_dead_workers(
    app: Appliance, deployed: str
) -> None:
    """A missing category at the start of a spool file is missing (not a category and not
    JSON text); a line cut short sets its file aside; a dead worker's open file ships."""
    import duckdb

    from appliance.core.drift import drift
    from appliance.core.prediction_log import _frame_parts

    rng = np.random.default_rng(6)
    first = {
        "a": rng.normal(0, 1, 1),
        "b": rng.normal(0, 1, 1),
        "c": np.array([None], dtype=object),
    }
    rest = {
        "a": rng.normal(0, 1, 400),
        "b": rng.normal(0, 1, 400),
        "c": np.array(rng.choice(["x", "y", "z"], 400, p=[0.5, 0.3, 0.2]), dtype=object),
    }
    _log(app, "syn", [first, rest])
    (served,) = drift(app, "syn", 3600)["versions"]
    c = next(f for f in served["features"] if f["feature"] == "c")
    assert c["unseen"] == [] and c["psi"] < 0.1
    assert c["missing"] == pytest.approx(1 / 401)

    directory = spool_dir(app.settings.home, "syn")
    (directory / "inputs-2026010100-1-1bad.jsonl").write_text('{"ts": [1.0], "x": {"a": [1')
    shipped = ship_logs(app)
    assert shipped["failed"] == 1 and "moved to rejected/" in shipped["error"]
    assert (directory / "rejected" / "inputs-2026010100-1-1bad.jsonl").exists()
    assert ship_logs(app)["failed"] == 0  # not tried again

    orphan = directory / "requests-2026010100-999999-7dead.jsonl.part"
    line = json.dumps(
        {
            "ts": [1.0],
            "request_id": ["o"],
            "version": [1],
            "revision": [1],
            "role": ["stable"],
            "status": [200],
            "latency_ms": [1.0],
            "rows": [1],
        }
    )
    orphan.write_text(line + "\n" + line[:20])  # the last line was cut when it died
    stuck = directory / "requests-2026010100-999999-6dead.jsonl.part"
    stuck.mkdir()  # an open file that cannot be read (taken first) holds up none of the others
    shipped = ship_logs(app)
    assert shipped["shipped"] == 1 and "6dead.jsonl.part not adopted" in shipped["error"]
    assert (
        app.db.scalar("SELECT rows FROM prediction_logs WHERE spool_name = ?", (orphan.name[:-5],))
        == 1
    )

    # the same for binary frames: a dead worker's whole frames ship, a cut one does not; a
    # file of frames that cannot be read is set aside
    plog = PredictionLog(app.settings.home, "syn", sample=1.0)
    tensor = (["a", "b"], np.array([[0.1, 0.2]]))
    for name in ("f1", "f2"):
        plog.record(name, 1, 1, "stable", 200, 0.001, 1, tensor, np.array([0.5]))
        plog.flush()
    frames = sorted(directory.glob("inputs-*.frames"))
    data = frames[0].read_bytes() + frames[1].read_bytes()[:-3]
    for path in directory.glob("*.frames"):
        path.unlink()
    orphan = directory / "inputs-2026010100-999999-8dead.frames.part"
    orphan.write_bytes(data)
    (directory / "inputs-2026010100-1-2bad.frames").write_bytes(data[:30] + b"\x00" * 40)
    one = np.ones(1, dtype=np.int64)
    miscounted = _frame_parts(  # whole, but says 2 rows for 1
        [("ts", np.zeros(1)), ("request_id", ["r"]), ("version", one), ("revision", one)]
        + [("count", one * 2), ("x", np.zeros((1, 2))), ("y", np.zeros(1))],
        features=["a", "b"],
    )
    (directory / "inputs-2026010100-1-3bad.frames").write_bytes(b"".join(miscounted))
    shipped = ship_logs(app)
    assert shipped["shipped"] == 1 and shipped["failed"] == 2
    # a file that fails to ship is said before the open file still stuck
    assert "inputs-2026010100-1-2bad.frames: unreadable" in shipped["error"]
    for bad in ("2bad", "3bad"):
        assert (directory / "rejected" / f"inputs-2026010100-1-{bad}.frames").exists()
    adopted = app.db.scalar(
        "SELECT sha256 FROM prediction_logs WHERE spool_name = ?", (orphan.name[:-5],)
    )
    shipped_file = app.objects.get_file(adopted)
    rows = duckdb.sql(
        f"SELECT request_id, x_a, x_b, prediction FROM read_parquet('{shipped_file}')"
    ).fetchall()
    assert rows == [("f1", 0.1, 0.2, 0.5)]


def test_the_writer_outlives_a_lost_spool_and_a_failed_write_is_retried_not_rejected(
    app: Appliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import duckdb

    from appliance.core import prediction_log
    from appliance.core.prediction_log import _frame_parts

    tensor = (["a"], np.array([[1.0], [2.0], [3.0]]))
    # rows are split by each request's predictions (its `rows` argument is not trusted)
    split = PredictionLog(app.settings.home, "v", sample=1.0)
    split.record("r1", 1, 1, "stable", 200, 0.001, 2, (["a"], tensor[1][:1]), np.ones(1))
    split.record("r2", 1, 1, "stable", 200, 0.001, 1, (["a"], tensor[1][1:]), np.zeros(2))
    split.flush()
    ship_logs(app, "v")
    (inputs,) = log_files(app, "v", "inputs")
    assert duckdb.sql(
        f"SELECT request_id, row, x_a FROM read_parquet('{inputs}') ORDER BY ts, row"
    ).fetchall() == [("r1", 0, 1.0), ("r2", 0, 2.0), ("r2", 1, 3.0)]

    plog = PredictionLog(app.settings.home, "w", sample=1.0)
    plog.record("r0", 1, 1, "stable", 200, 0.001, 1, tensor, np.ones(3))
    plog._drain(force=True)  # a file is open now
    shutil.rmtree(plog.directory)  # removed under the writer: its file cannot be closed
    monkeypatch.setattr(prediction_log, "ROTATE_SECONDS", 0.0)
    plog._drain()  # no exception: the writer thread would have died
    plog._put("inputs", time.time(), ".frames", [b"x"])  # an open file, then its directory gone
    shutil.rmtree(plog.directory)
    plog._put("inputs", time.time() + 3600, ".frames", [b""])  # a new hour: the old file
    assert list(plog.files) == [("inputs", ".frames")]  # could not close, and is not retried
    plog._rotate(force=True)
    plog.record("r3", 1, 1, "stable", 200, 0.001, 1, tensor, np.ones(3))
    plog.flush()
    assert plog.counters()["written"] == 2 and "Error" in (plog.counters()["error"] or "")

    directory = plog.directory
    blocker = app.settings.cache_dir / "spool-ship"
    blocker.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*.frames"):  # the Parquet cannot be written: a full disk
        (blocker / (path.stem + ".parquet")).mkdir()
    failed = ship_logs(app, "w")
    assert failed["failed"] == 2 and not (directory / "rejected").exists()
    shutil.rmtree(blocker)
    assert ship_logs(app, "w")["shipped"] == 2  # kept, and shipped once it can be
    (inputs,) = log_files(app, "w", "inputs")
    assert duckdb.sql(
        f"SELECT request_id, row, x_a FROM read_parquet('{inputs}') ORDER BY ts, row"
    ).fetchall() == [("r3", 0, 1.0), ("r3", 1, 2.0), ("r3", 2, 3.0)]

    # a requests frame without its times is set aside, not retried on every pass
    one = np.ones(1, dtype=np.int64)
    (directory / "requests-2026010100-1-4bad.frames").write_bytes(
        b"".join(_frame_parts([("request_id", ["r"]), ("version", one), ("revision", one)]))
    )
    result = ship_logs(app, "w")
    assert (
        result["failed"] == 1
        and "no ts, role, status, latency_ms, rows column" in (result["error"])
    )
    assert ship_logs(app, "w")["failed"] == 0


def test_a_monitor_stays_one_alert_through_gaps_and_names_what_it_cannot_measure(
    app: Appliance, deployed: str
) -> None:
    from appliance.core.monitors import add_monitor, check_monitors, list_alerts, list_monitors

    with pytest.raises(InvalidInput, match=r"syn@1 has no feature 'nosuch'"):
        add_monitor(app, "bad", "syn", "psi(nosuch) > 0.2", "1m", {})
    add_monitor(app, "busy", "syn", "rps > 0 over 1h", "1m", {})
    assert list_monitors(app)[0]["state"] == "pending"
    _log(app, "syn", [_one_row()])
    now = time.time()
    assert check_monitors(app, now=now)[0]["state"] == "firing"
    later = now + 7200  # the logged request is out of the window: no data, still one alert
    assert check_monitors(app, now=later, force=True)[0]["state"] == "no_data"
    _log(app, "syn", [_one_row()])
    assert check_monitors(app, force=True)[0]["state"] == "firing"
    (alert,) = list_alerts(app)
    assert alert["resolved_at"] is None


def test_the_ship_interval_is_read_when_asked_and_a_bad_one_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from appliance.core.agent import ship_seconds

    monkeypatch.setenv("APPLIANCE_SHIP_SECONDS", "0.5")
    assert ship_seconds() == 0.5
    for bad in ("", "soon", "0", "-1", "nan"):
        monkeypatch.setenv("APPLIANCE_SHIP_SECONDS", bad)
        with pytest.raises(InvalidInput, match=f"APPLIANCE_SHIP_SECONDS={bad!r}: expected"):
            ship_seconds()


def test_the_agent_ships_and_checks_monitors_in_threads_of_their_own_below_serving(
    app: Appliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from appliance.core import monitors, prediction_log
    from appliance.core.agent import Agent, Capacity

    idle = Agent(app, capacity=Capacity(1.0, 1 << 30, 0))  # "inf", as the other tests here
    idle.watch_deployments()
    assert idle.shipper is None and idle.watcher is None  # no pass, not even a first one
    monkeypatch.setenv("APPLIANCE_SHIP_SECONDS", "30")  # read by each agent as it starts

    seen: dict[str, tuple[str, int]] = {}

    def where(name: str) -> None:  # the calling thread and its nice (Linux: per thread)
        seen[name] = (threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, 0))

    waits: list[float | None] = []

    # what three passes of shipping meet: a failure, the spool held by another shipper, success
    passes = [({"s": "f: down"}, []), ({}, ["s"]), ({}, [])]

    def ship(app: Appliance, deployment: str | None = None, wait: float | None = None) -> Any:
        waits.append(wait)
        where("ship")
        errors, held = passes[len(waits) - 1]
        error = next(iter(errors.values()), None)
        return {
            "shipped": 0,
            "failed": 0,
            "busy": len(held),
            "error": error,
            "errors": errors,
            "held": held,
        }

    told: list[tuple[Any, float]] = []

    def check(
        app: Appliance,
        fresh: bool = True,
        ship_errors: dict[str, str] | None = None,
        unshipped_after: float = 0.0,
    ) -> None:
        assert not fresh  # monitors never ship, nor wait on a slow store
        told.append((ship_errors, unshipped_after))
        where("watch")

    monkeypatch.setattr(prediction_log, "ship_logs", ship)
    monkeypatch.setattr(monitors, "check_monitors", check)
    agent = Agent(app, capacity=Capacity(1.0, 1 << 30, 0))
    heard = []
    for _ in passes:  # a pass's monitors hear what shipping met so far (its own pass's, or before)
        agent.watched = float("-inf")  # due whatever the clock reads
        agent.watch_deployments()
        for thread in (agent.shipper, agent.watcher):
            assert thread is not None
            thread.join(10)
        heard.append(agent.ship_errors)
    assert waits == [0, 0, 0]  # a deployment another shipper holds waits for the next pass
    assert seen["ship"][0] != seen["watch"][0]
    assert seen["ship"][1] == 19 and seen["watch"][1] >= 10
    # the error outlives a pass that could not ship (another shipper held the spool)
    assert heard == [{"s": "f: down"}, {"s": "f: down"}, {}]
    assert told[1] == ({"s": "f: down"}, 90.0)  # 3 intervals


def test_one_shipper_per_spool_and_a_bad_lock_file_is_reported(app: Appliance) -> None:
    import fcntl

    from appliance.core.prediction_log import ship_logs, spool_dir

    plog = PredictionLog(app.settings.home, "s", sample=1.0)
    plog.record("r1", 1, 1, "stable", 200, 0.001, 1, {"a": [1.0]}, np.array([0.5]))
    # in the same batch: a canary whose model has two outputs, one of its requests with no
    # rows, and a bare number: each shape is written apart, nothing is dropped
    plog.record("r2", 2, 1, "canary", 200, 0.001, 1, {"a": [2.0]}, np.array([[0.2, 0.8]]))
    plog.record("r3", 2, 1, "canary", 200, 0.001, 0, {"a": []}, np.empty((0, 2)))
    plog.record("r4", 2, 1, "canary", 200, 0.001, 1, {"a": [3.0]}, np.float64(0.1))
    plog.flush()
    assert plog.counters()["dropped"] == 0 and plog.counters()["written"] == 4
    directory = spool_dir(app.settings.home, "s")
    with (directory / ".ship.lock").open("a") as held:  # another shipper at work
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = ship_logs(app, "s", wait=0.2)
        assert (busy["busy"], busy["held"]) == (1, ["s"])
        assert len(_closed(directory)) == 2
    assert ship_logs(app, "s") == {
        "shipped": 2,
        "failed": 0,
        "busy": 0,
        "error": None,
        "errors": {},
        "held": [],
    }
    (directory / ".ship.lock").unlink()
    (directory / ".ship.lock").mkdir()  # a lock file that cannot be opened
    result = ship_logs(app)
    assert result["failed"] == 1 and result["error"].startswith("s: ")


def test_readers_say_what_the_spool_still_holds_when_shipping_is_held_or_fails(
    app: Appliance, deployed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any
) -> None:
    import fcntl

    from appliance.core import prediction_log
    from appliance.core.drift import drift
    from appliance.core.feedback import quality
    from appliance.core.monitor_report import build_report, render_html, render_text

    monkeypatch.setattr(prediction_log, "FRESH_WAIT", 0.2)  # how long a reader waits
    rng = np.random.default_rng(5)

    def batch(n: int) -> dict[str, Any]:
        return {
            "a": rng.normal(0, 1, n),
            "b": rng.normal(0, 1, n),
            "c": np.array(["x"] * n, dtype=object),
        }

    directory = spool_dir(app.settings.home, "syn")
    lock = directory / ".ship.lock"
    home = str(app.settings.home)
    # requests logged, no inputs, the spool held: drift still says how to log inputs
    bare = PredictionLog(app.settings.home, "syn")
    bare.record("bare", 1, 1, "stable", 200, 0.001, 1, None, None)
    bare.flush()
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InvalidInput, match=r"log them with 'appliance deployments logging"):
            drift(app, "syn", window=3600)
    # inputs logged, nothing shipped yet, the spool held: the refusal says why instead
    plog = PredictionLog(app.settings.home, "syn", sample=1.0)
    plog.record("early", 1, 1, "stable", 200, 0.001, 30, batch(30), np.full(30, 0.5))
    plog.flush()
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waits = (
            r"\(1 log file of [\d.]+ kB, the oldest written 20\d\d-\d\d-\d\d [\d:]+, is not "
            r"shipped yet: another shipper held the spool for 0.2 s\)"
        )
        with pytest.raises(InvalidInput, match=waits):
            drift(app, "syn", window=3600)
        assert re.search(waits, build_report(app, "syn", 3600)["drift_note"])
    assert ship_logs(app, "syn")["shipped"] == 3
    # more logged (a requests file and an inputs file); the shipper holds the spool past
    # the reader's wait: each reader counts the kinds it reads
    plog.record("late", 1, 1, "stable", 200, 0.001, 20, batch(20), np.full(20, 0.5))
    plog.flush()
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        report = drift(app, "syn", window=3600)
        assert report["versions"][0]["rows"] == 30  # what is shipped, and it says so
        behind = report["behind"]
        assert behind["files"] == 1 and behind["bytes"] > 0  # the inputs file
        assert behind["why"] == "another shipper held the spool for 0.2 s"
        assert quality(app, "syn")["behind"]["files"] == 1
        full = build_report(app, "syn", 3600)
        assert full["behind"]["files"] == 2  # the report reads requests too
        assert "behind" not in full["drift"] and "behind" not in full["quality"]
        assert "note: 2 log files of " in render_text(full)
        page = render_html(full, tmp_path / "r.html").read_text()
        assert "<strong>Note:</strong> 2 log files of " in page
        said = cli("monitor", "drift", "syn", "--home", home)
        assert said.code == 0 and "note: 1 log file of " in said.err
        assert "these figures leave them out" in said.err
        assert "not shipped yet" not in said.out  # stdout stays the table
        as_json = cli("monitor", "quality", "syn", "--home", home, "--json")
        assert as_json.json()["behind"]["files"] == 1
    # the store away: the files stay, and the reason is the store's
    monkeypatch.setattr(app.objects, "put_file", _refuse)
    behind = drift(app, "syn", window=3600)["behind"]
    assert behind["files"] == 1 and behind["why"].startswith("shipping failed: ")
    assert "connection refused" in behind["why"]
    monkeypatch.undo()
    # shipped: nothing left out, nothing said
    report = drift(app, "syn", window=3600)
    assert report["behind"] is None and report["versions"][0]["rows"] == 50
    assert "note:" not in render_text(build_report(app, "syn", 3600))


def test_monitors_say_when_their_logs_wait_in_the_spool(
    app: Appliance, deployed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core.monitors import UNSHIPPED_AFTER, add_monitor, check_monitors, list_monitors

    rng = np.random.default_rng(6)

    def batch(n: int) -> dict[str, Any]:
        return {"a": rng.normal(0, 1, n), "b": rng.normal(0, 1, n), "c": np.array(["x"] * n)}

    add_monitor(app, "a-drift", "syn", "psi(a) > 0.2 over 1h", "1m", {})
    add_monitor(app, "busy", "syn", "rps > 0 over 1h", "1m", {})
    add_monitor(app, "labels", "syn", "auc < 0.5 over 1h", "1m", {})
    _log(app, "syn", [batch(200)])  # shipped
    plog = PredictionLog(app.settings.home, "syn", sample=1.0)
    plog.record("late", 1, 1, "stable", 200, 0.001, 50, batch(50), np.full(50, 0.5))
    plog.flush()  # a requests file and an inputs file, not shipped
    # `monitor check` ships first; the store is away: each monitor says what it went without
    monkeypatch.setattr(app.objects, "put_file", _refuse)
    outcomes = {o["monitor"]: o for o in check_monitors(app, force=True)}
    drifted = outcomes["a-drift"]
    assert drifted["state"] == "ok" and drifted["value"] is not None  # the 200 shipped rows
    assert re.fullmatch(
        r"1 log file of [\d.]+ kB, the oldest written 20\d\d-\d\d-\d\d [\d:]+, is not "
        r"shipped yet: shipping failed: .*connection refused; judged without them",
        drifted["error"],
    )
    assert outcomes["busy"]["behind"]["files"] == 1  # its requests file
    # quality reads inputs and labels: no labels, so no data, and the same inputs file
    assert outcomes["labels"]["state"] == "no_data"
    assert outcomes["labels"]["error"].startswith("1 log file of ")
    assert "judged without them" in list_monitors(app, "syn")[0]["error"]
    # the agent's pass: files closed seconds ago are its shipper's ordinary work, not news
    outcomes = {o["monitor"]: o for o in check_monitors(app, force=True, fresh=False)}
    assert all(o["error"] is None for o in outcomes.values())
    old = time.time() - UNSHIPPED_AFTER - 5
    spool = spool_dir(app.settings.home, "syn")
    for path in _closed(spool):
        os.utime(path, (old, old))
    # a requests file of an hour three days gone is outside every window here: not counted
    (stale,) = spool.glob("requests-*")
    days_ago = time.strftime("%Y%m%d%H", time.gmtime(time.time() - 3 * 86400))
    stale_copy = spool / stale.name.replace(stale.name.split("-")[1], days_ago)
    stale_copy.write_bytes(stale.read_bytes())
    os.utime(stale_copy, (old, old))
    outcomes = check_monitors(
        app, force=True, fresh=False, ship_errors={"syn": "x: connection refused"}
    )
    assert all(
        "not shipped yet: shipping failed: x: connection refused" in o["error"] for o in outcomes
    )
    assert [o["behind"]["files"] for o in outcomes if o["monitor"] == "busy"] == [1]
    stale_copy.unlink()
    (drifted, *_) = check_monitors(app, "a-drift", force=True, fresh=False)
    assert drifted["error"].endswith(
        "the agent has not shipped them within 60 s; judged without them"
    )
    # the store back: shipped, judged on everything, nothing to say
    monkeypatch.undo()
    outcomes = check_monitors(app, force=True)
    assert all(o["error"] is None and o["behind"] is None for o in outcomes)
    assert all(m["error"] is None for m in list_monitors(app, "syn"))


def test_a_failing_model_counts_against_its_version_and_refusals_are_no_label_target(
    app: Appliance, deployed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests refused before routing are logged as `unrouted`; a model that raises is a 500
    of its own version; labels for a refused request count as unknown; latency monitors
    judge answered requests only."""
    import asyncio

    import duckdb

    from appliance.core.deployments import set_logging
    from appliance.core.feedback import add_feedback
    from appliance.core.monitors import add_monitor, check_monitors
    from appliance.core.serving import InferenceApp, ModelServer

    set_logging(app, "syn", sample=1.0)
    server = ModelServer(app, "syn")
    server.directory.mkdir(parents=True, exist_ok=True)
    server.sync(snapshot=False)
    web = InferenceApp(server)

    def call(body: bytes, request_id: str) -> int:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]
        scope = {"type": "http", "method": "POST", "path": "/v2/models/syn/infer"}
        asyncio.run(web({**scope, "headers": headers}, receive, send))
        return int(sent[0]["status"])

    good = json.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [1], "datatype": "FP64", "data": [0.1]},
                {"name": "b", "shape": [1], "datatype": "FP64", "data": [0.2]},
                {"name": "c", "shape": [1], "datatype": "BYTES", "data": ["x"]},
            ]
        }
    ).encode()
    assert call(good, "fine") == 200
    for i in range(3):
        assert call(b"{not json", f"refused-{i}") == 400

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the model failed")

    monkeypatch.setattr(server.routing.stable, "predict_matrix", boom)
    assert call(good, "crash") == 500
    monkeypatch.setattr(server, "entity_inputs", boom)  # the registry failing mid-request
    assert call(good, "lookup") == 500
    server.plog.flush()
    assert ship_logs(app, "syn")["failed"] == 0
    files = ", ".join(f"'{f}'" for f in log_files(app, "syn", "requests"))
    rows = duckdb.sql(
        f"SELECT request_id, version, role, status FROM read_parquet([{files}]) ORDER BY ts"
    ).fetchall()
    assert rows == [
        ("fine", 1, "stable", 200),
        *[(f"refused-{i}", 0, "unrouted", 400) for i in range(3)],
        ("crash", 1, "stable", 500),  # the version that failed, not "unrouted"
        ("lookup", 1, "stable", 500),
    ]
    snapshot = server.stats.snapshot()["series"]
    assert {(s["version"], s["role"]) for s in snapshot} == {(1, "stable"), (0, "unrouted")}
    # a label for a refused request judges no prediction: counted as unknown
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nfine,1\nrefused-0,1\n")
    result = add_feedback(app, "syn", labels)
    assert (result["stored"], result["unknown_request_ids"]) == (1, 1)
    # latency is of answered requests: three quick refusals do not pull the median down
    answered = duckdb.sql(
        f"SELECT median(latency_ms) FROM read_parquet([{files}]) WHERE role <> 'unrouted'"
    ).fetchone()
    add_monitor(app, "median", "syn", "p50_ms > 1000 over 1h", "1m", {})
    (outcome,) = check_monitors(app, "median")
    assert answered is not None and outcome["value"] == pytest.approx(answered[0])


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise OSError("connection refused")
