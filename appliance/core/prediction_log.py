"""Prediction logs: what a deployment answered, written off the request path.

A serving worker hands each answered request to `PredictionLog.record`: a few attribute reads
and a non-blocking put on a bounded queue (when the queue is full the sample is dropped and
counted; the request never waits). Request metadata (time, request id, version, revision,
role, status, latency, rows) is logged for every request by default; inputs and outputs for
a sampled share (`log_sample`). A thread drains the queue into JSON-lines files in the
home's spool (`spool/predictions/<deployment>/`), closed every few seconds; the spool is
bounded, so a store that cannot take files for a while costs samples, never requests.

The agent ships closed spool files (`ship_logs`): DuckDB turns each into Parquet (inputs one
row per predicted row, a column per feature), the object store takes it by sha256, and one
row per file is recorded by deployment, kind and hour. A file that cannot be shipped (the
store unreachable) stays in the spool and is tried again on the next pass.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.errors import ApplianceError
from appliance.store.db import utcnow

QUEUE_SIZE = 20_000  # requests waiting for the writer thread; beyond it samples are dropped
ROTATE_SECONDS = float(os.environ.get("APPLIANCE_LOG_ROTATE_SECONDS", "5"))
ROTATE_BYTES = 64 << 20
SPOOL_LIMIT = int(os.environ.get("APPLIANCE_LOG_SPOOL_BYTES", str(1 << 30)))
KINDS = ("requests", "inputs")


def spool_dir(home: Path, deployment: str) -> Path:
    return home / "spool" / "predictions" / deployment


def _hour(ts: float) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(ts))


class _SpoolFile:
    """One open `.part` file of one kind and hour; renamed to `.jsonl` when closed."""

    def __init__(self, directory: Path, kind: str, hour: str, seq: int) -> None:
        self.path = directory / f"{kind}-{hour}-{os.getpid()}-{seq}.jsonl.part"
        self.kind, self.hour = kind, hour
        self.handle = self.path.open("ab")
        self.opened = time.monotonic()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.size += len(data)

    def close(self) -> None:
        self.handle.close()
        if self.size:
            self.path.rename(self.path.with_suffix(""))  # .jsonl.part -> .jsonl: shippable
        else:
            self.path.unlink(missing_ok=True)


class PredictionLog:
    """A worker's log writer: `record` on the request path, `run` in a thread of its own."""

    def __init__(
        self,
        home: Path,
        deployment: str,
        sample: float = 0.0,
        requests: bool = True,
        queue_size: int = QUEUE_SIZE,
        spool_limit: int = SPOOL_LIMIT,
    ) -> None:
        self.directory = spool_dir(home, deployment)
        self.sample = sample
        self.requests = requests
        self.queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=queue_size)
        self.spool_limit = spool_limit
        self.dropped = 0  # samples the full queue (or a full spool) could not take
        self.written = 0
        self.files: dict[str, _SpoolFile] = {}
        self.seq = 0
        self.spool_bytes = 0
        self.measured = 0.0

    def configure(self, sample: float, requests: bool) -> None:
        """The deployment's current settings (a worker follows changes live)."""
        self.sample, self.requests = sample, requests

    def record(
        self,
        request_id: str,
        version: int,
        revision: int,
        role: str,
        status: int,
        seconds: float,
        rows: int,
        columns: dict[str, Any] | None,
        predictions: Any,
    ) -> None:
        """Queue one answered request; never blocks, never raises."""
        sample = self.sample
        sampled = columns is not None and sample > 0 and (sample >= 1 or random.random() < sample)
        if not (self.requests or sampled):
            return
        item = (
            time.time(),
            request_id,
            version,
            revision,
            role,
            status,
            seconds,
            rows,
            columns if sampled else None,
            predictions if sampled else None,
        )
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def counters(self) -> dict[str, int]:
        return {"queued": self.queue.qsize(), "dropped": self.dropped, "written": self.written}

    # ---- the writer thread --------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Drain the queue into spool files until `stop`, then close them."""
        import orjson

        self.directory.mkdir(parents=True, exist_ok=True)
        while not stop.is_set():
            try:
                items = [self.queue.get(timeout=0.2)]
            except queue.Empty:
                items = []
            while items and len(items) < 5000:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(items, orjson)
                self._rotate(force=False)
            except OSError:  # a full disk: these samples are lost, the next may fit
                self.dropped += len(items)
        with contextlib.suppress(OSError):
            self._rotate(force=True)

    def flush(self) -> None:
        """Write what is queued and close the files (a stopping worker; tests)."""
        import orjson

        items = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write(items, orjson)
        self._rotate(force=True)

    def _over_limit(self) -> bool:
        now = time.monotonic()
        if now - self.measured > 2.0:
            self.measured = now
            self.spool_bytes = sum(
                p.stat().st_size for p in self.directory.iterdir() if p.is_file()
            )
        return self.spool_bytes > self.spool_limit

    def _file(self, kind: str, ts: float) -> _SpoolFile:
        hour = _hour(ts)
        current = self.files.get(kind)
        if current is not None and current.hour != hour:
            current.close()
            current = None
        if current is None:
            self.seq += 1
            current = self.files[kind] = _SpoolFile(self.directory, kind, hour, self.seq)
        return current

    def _write(self, items: list[tuple[Any, ...]], orjson: Any) -> None:
        if not items:
            return
        if self._over_limit():
            self.dropped += len(items)
            return
        option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
        for ts, request_id, version, revision, role, status, seconds, rows, cols, pred in items:
            base = {"ts": ts, "request_id": request_id, "version": version, "revision": revision}
            if self.requests:
                line = orjson.dumps(
                    {
                        **base,
                        "role": role,
                        "status": status,
                        "latency_ms": seconds * 1000.0,
                        "rows": rows,
                    },
                    option=option,
                )
                self._file("requests", ts).write(line)
                self.spool_bytes += len(line)
            if cols is not None and pred is not None:
                line = orjson.dumps(
                    {**base, "x": {k: _plain(v) for k, v in cols.items()}, "y": _plain(pred)},
                    option=option,
                )
                self._file("inputs", ts).write(line)
                self.spool_bytes += len(line)
        self.written += len(items)

    def _rotate(self, force: bool) -> None:
        now = time.monotonic()
        for kind, spool in list(self.files.items()):
            if force or now - spool.opened > ROTATE_SECONDS or spool.size > ROTATE_BYTES:
                spool.handle.flush()
                spool.close()
                del self.files[kind]
            else:
                spool.handle.flush()


def _plain(value: Any) -> Any:
    """A column or predictions as orjson writes them: numeric arrays as they are, text and
    mixed arrays as lists."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return list(value) if isinstance(value, tuple) else value
    if dtype.kind in "biuf":
        return value
    return value.tolist()


# ---- shipping (the agent) ---------------------------------------------------------------


def ship_logs(app: Appliance, deployment: str | None = None) -> dict[str, Any]:
    """Turn closed spool files into Parquet in the object store; returns what was shipped
    and the first error (a file that failed stays, and is tried on the next call)."""
    root = app.settings.home / "spool" / "predictions"
    shipped, failed, error = 0, 0, None
    if not root.is_dir():
        return {"shipped": 0, "failed": 0, "error": None}
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        if deployment is not None and directory.name != deployment:
            continue
        for path in sorted(directory.glob("*.jsonl")):
            try:
                _ship(app, directory.name, path)
                shipped += 1
            except (OSError, ApplianceError, ValueError) as exc:
                failed += 1
                error = error or f"{path.name}: {exc}"
            except Exception as exc:  # the store's client raises its own errors (S3Error)
                failed += 1
                error = error or f"{path.name}: {type(exc).__name__}: {exc}"
    return {"shipped": shipped, "failed": failed, "error": error}


def _ship(app: Appliance, deployment: str, path: Path) -> None:
    import duckdb

    from appliance.core import duck

    kind = path.name.split("-", 1)[0]
    if kind == "feedback":  # labels the server took by POST /feedback
        from appliance.core.feedback import store_spooled_feedback

        store_spooled_feedback(app, deployment, path)
        return
    if kind not in KINDS:
        raise ValueError(f"not a prediction log file: {path.name}")
    known = app.db.scalar("SELECT 1 FROM prediction_logs WHERE spool_name = ?", (path.name,))
    if known:  # recorded by a pass that died before removing it
        path.unlink(missing_ok=True)
        return
    tmp_dir = app.settings.cache_dir / "spool-ship"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    out = tmp_dir / (path.stem + ".parquet")
    con = duckdb.connect()
    try:
        source = f"read_json({duck.sql_string(str(path))}, format = 'newline_delimited')"
        if kind == "inputs":
            fields = (
                [
                    row[0]
                    for row in con.execute(
                        f"SELECT unnest(struct_keys(x)) FROM (SELECT x FROM {source} LIMIT 1)"
                    ).fetchall()
                ]
                if _has_struct(con, source)
                else []
            )
            columns = ", ".join(
                f"unnest(x.{duck.sql_identifier(f)}) AS {duck.sql_identifier('x_' + f)}"
                for f in fields
            )
            select = (
                "SELECT ts, request_id, version, revision, "
                "unnest(range(len(y))) AS row, "
                + (columns + ", " if columns else "")
                + "unnest(y) AS prediction FROM "
                + source
            )
        else:
            select = f"SELECT * FROM {source}"
        con.execute(f"COPY ({select}) TO {duck.sql_string(str(out))} (FORMAT parquet)")
        rows, first, last = con.execute(
            f"SELECT count(*), min(ts), max(ts) FROM read_parquet({duck.sql_string(str(out))})"
        ).fetchone()
    finally:
        con.close()
    stored = app.objects.put_file(out, move=True)
    hour = path.name.split("-")[1]
    app.db.execute(
        "INSERT INTO prediction_logs (deployment, kind, hour, sha256, rows, first_ts, last_ts, "
        "spool_name, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (spool_name) DO NOTHING",
        (deployment, kind, hour, stored.sha256, rows, first or 0, last or 0, path.name, utcnow()),
    )
    path.unlink(missing_ok=True)


def _has_struct(con: Any, source: str) -> bool:
    kinds = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT x FROM {source}").fetchall()}
    return str(kinds.get("x", "")).startswith("STRUCT")


def log_files(
    app: Appliance,
    deployment: str,
    kind: str,
    since: float | None = None,
    until: float | None = None,
) -> list[str]:
    """The local paths of a deployment's shipped log files that overlap [since, until]."""
    rows = app.db.rows(
        "SELECT sha256 FROM prediction_logs WHERE deployment = ? AND kind = ? "
        "AND last_ts >= ? AND first_ts <= ? ORDER BY first_ts",
        (deployment, kind, since or 0.0, until or 1e18),
    )
    return [str(app.objects.get_file(r["sha256"])) for r in rows]
