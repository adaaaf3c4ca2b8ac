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
import random
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.errors import ApplianceError
from appliance.store.db import utcnow

QUEUE_SIZE = 50_000  # requests waiting for the writer thread; beyond it samples are dropped
# Each drain has a fixed cost (numpy and orjson calls, a write), paid on the serving
# worker's interpreter: ten a second keeps it small per request, and each burst about 1 ms
# at 4,000 logged requests a second.
DRAIN_SECONDS = float(os.environ.get("APPLIANCE_LOG_DRAIN_SECONDS", "0.1"))
ROTATE_SECONDS = float(os.environ.get("APPLIANCE_LOG_ROTATE_SECONDS", "5"))
ROTATE_BYTES = 64 << 20
SPOOL_LIMIT = int(os.environ.get("APPLIANCE_LOG_SPOOL_BYTES", str(1 << 30)))
KINDS = ("requests", "inputs")
# How long a reader that wants fresh numbers (drift, quality, report, a monitor) waits for
# the agent's shipper to finish with a deployment; past it, it reads what is shipped.
FRESH_WAIT = 10.0


def spool_dir(home: Path, deployment: str) -> Path:
    return home / "spool" / "predictions" / deployment


def _hour(ts: float) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(ts))


class _SpoolFile:
    """One open `.part` file of one kind and hour; renamed to `.jsonl` when closed."""

    def __init__(self, directory: Path, kind: str, hour: str, seq: str) -> None:
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
    """A worker's log writer: `record` on the request path, `run` in a thread of its own.

    The request path appends to a deque (atomic, no lock, no wake-up); the writer drains it
    a few times a second and writes each batch as one columnar JSON line per kind, so the
    serving loop is interrupted briefly and rarely, whatever the request rate."""

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
        self.pending: deque[tuple[Any, ...]] = deque()
        self.queue_size = queue_size
        self.spool_limit = spool_limit
        self.dropped = 0  # samples the full queue (or a full spool) could not take
        self.written = 0
        self.files: dict[str, _SpoolFile] = {}
        self.seq = 0
        self.spool_bytes = 0
        self.measured = 0.0
        self.error: str | None = None  # the first thing that cost samples, said once
        self.token = uuid.uuid4().hex[:8]  # a pid is reused after a restart: names are not
        self.lock = threading.Lock()  # the writer thread and a stopping server both write

    @property
    def active(self) -> bool:
        """Whether anything is logged: a request id is worth making only then."""
        return self.requests or self.sample > 0

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
        columns: dict[str, Any] | tuple[list[str], Any] | None,
        predictions: Any,
    ) -> None:
        """Queue one answered request; never blocks, never raises. `columns`: the inputs as
        feature columns, or (feature names, [N, F] matrix) as a V2 tensor gave them."""
        sample = self.sample
        sampled = columns is not None and sample > 0 and (sample >= 1 or random.random() < sample)
        if not (self.requests or sampled):
            return
        if len(self.pending) >= self.queue_size:
            self.dropped += 1
            return
        self.pending.append(
            (
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
        )

    def counters(self) -> dict[str, Any]:
        return {
            "queued": len(self.pending),
            "dropped": self.dropped,
            "written": self.written,
            "error": self.error,
        }

    # ---- the writer thread --------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Drain the queue into spool files every DRAIN_SECONDS until `stop`, then close."""
        self.directory.mkdir(parents=True, exist_ok=True)
        while not stop.wait(DRAIN_SECONDS):
            self._drain()
        with contextlib.suppress(OSError):
            self.flush()

    def flush(self) -> None:
        """Write what is queued and close the files (a stopping worker; tests)."""
        with self.lock:
            self._drain_locked()
            self._rotate(force=True)

    def _drain(self) -> None:
        with self.lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        items = []
        pending = self.pending
        while pending:
            items.append(pending.popleft())
        try:
            self._write(items)
            self._rotate(force=False)
        except Exception as exc:  # a full disk, a value orjson cannot write: these samples
            self.dropped += len(items)  # are lost and counted; the writer goes on
            if self.error is None:
                self.error = f"{type(exc).__name__}: {exc}"
                print(f"prediction log: samples dropped: {self.error}", file=sys.stderr)

    def _over_limit(self) -> bool:
        now = time.monotonic()
        if now - self.measured > 2.0:
            self.measured = now
            with contextlib.suppress(FileNotFoundError):  # created with the first file
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
            self.directory.mkdir(parents=True, exist_ok=True)  # removed meanwhile: again
            current = self.files[kind] = _SpoolFile(
                self.directory, kind, hour, f"{self.seq}{self.token}"
            )
        return current

    def _write(self, items: list[tuple[Any, ...]]) -> None:
        """Items as columnar lines: one per kind and hour (the shipper unnests them). This
        thread shares the interpreter with the serving loop: per-item Python work is kept
        to a few C-level passes over the batch."""
        import orjson

        if not items:
            return
        if self._over_limit():
            self.dropped += len(items)
            return
        stamps = [item[0] for item in items]
        if int(min(stamps) // 3600) == int(max(stamps) // 3600):  # nearly always
            batches = [items]
        else:
            by_hour: dict[int, list[tuple[Any, ...]]] = {}
            for item in items:
                by_hour.setdefault(int(item[0] // 3600), []).append(item)
            batches = list(by_hour.values())
        option = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
        for batch in batches:
            ts0 = batch[0][0]
            if self.requests:
                ts, ids, ver, rev, role, status, secs, rows, _, _ = zip(*batch, strict=True)
                line = orjson.dumps(
                    {
                        "ts": ts,
                        "request_id": ids,
                        "version": ver,
                        "revision": rev,
                        "role": role,
                        "status": status,
                        "latency_ms": [x * 1000.0 for x in secs],
                        "rows": rows,
                    },
                    option=option,
                )
                self._file("requests", ts0).write(line)
                self.spool_bytes += len(line)
            sampled = [i for i in batch if i[8] is not None and i[9] is not None]
            if sampled:
                try:
                    line = orjson.dumps(_inputs_columns(sampled), option=option)
                except (TypeError, ValueError):  # outputs of two shapes (a canary of another
                    line = b"".join(  # model), or a request with no rows: apart
                        orjson.dumps(_inputs_columns(group), option=option)
                        for group in _by_output_shape(sampled)
                    )
                self._file("inputs", ts0).write(line)
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


def _inputs_columns(items: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Sampled requests as row-level columns: every predicted row with its request's id,
    time and version, its features (x) and its prediction (y). When every request sent one
    [N, F] tensor of the same features (the common case) the batch is stacked by numpy in
    a few calls; requests that sent named columns are placed column by column."""
    import numpy as np

    ts, ids, ver, rev, _, _, _, _, given, outputs = zip(*items, strict=True)
    counts = [len(p) for p in outputs]
    total = sum(counts)
    first = given[0]
    x: dict[str, Any]
    names = first[0] if isinstance(first, tuple) else None
    if names is not None and (
        all(type(g) is tuple and g[0] is names for g in given)  # one runtime's own list
        or all(isinstance(g, tuple) and g[0] == names for g in given)
    ):
        by_feature = np.ascontiguousarray(np.concatenate([g[1] for g in given]).T)
        x = {name: by_feature[j] for j, name in enumerate(names)}
    else:
        x = {}
        start = 0
        for n, values in zip(counts, given, strict=True):
            if isinstance(values, tuple):
                names, matrix = values
                for j, name in enumerate(names):
                    _place(x, name, total, start, matrix[:, j])
            else:
                for name, column in values.items():
                    _place(x, name, total, start, column)
            start += n
    if counts.count(1) == len(counts):  # one row per request: its values as they are
        row: Any = [0] * total
    else:
        ts, ids, ver, rev = (
            np.repeat(np.asarray(c, dtype=object), counts).tolist() for c in (ts, ids, ver, rev)
        )
        row = [r for n in counts for r in range(n)]
    y = np.concatenate(outputs)
    return {
        "ts": ts,
        "request_id": ids,
        "version": ver,
        "revision": rev,
        "row": row,
        "x": {name: _plain(values) for name, values in x.items()},
        "y": _plain(y),
    }


def _by_output_shape(items: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """Sampled requests grouped by the shape of one output row; requests that predicted no
    rows (or a bare number) have nothing to log as inputs and are left out."""
    import numpy as np

    groups: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
    for item in items:
        shape = np.shape(item[9])
        if shape and shape[0]:
            groups.setdefault(shape[1:], []).append(item)
    return list(groups.values())


def _place(columns: dict[str, Any], name: str, total: int, start: int, values: Any) -> None:
    """Put one request's values of a feature at its rows (missing elsewhere: None)."""
    import numpy as np

    column = columns.get(name)
    if column is None:
        column = columns[name] = np.full(total, None, dtype=object)
    column[start : start + len(values)] = (
        list(values) if not isinstance(values, np.ndarray) else values
    )


def _plain(value: Any) -> Any:
    """A column or predictions as orjson writes them: numeric arrays (contiguous), text and
    mixed arrays as lists."""
    import numpy as np

    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return list(value) if isinstance(value, tuple) else value
    if dtype.kind in "biuf":
        return np.ascontiguousarray(value)
    return value.tolist()


# ---- shipping (the agent) ---------------------------------------------------------------


def ship_logs(
    app: Appliance, deployment: str | None = None, wait: float | None = None
) -> dict[str, Any]:
    """Turn closed spool files into Parquet in the object store; returns what was shipped,
    the deployments skipped because another shipper held them, and the first error (a file
    that failed stays, and is tried on the next call).

    The agent and a command that asks for fresh numbers (quality, drift) may ship at once:
    one at a time per deployment, or both would read the same file. `wait`: how long to
    wait for the other (None: until it is done; 0: skip the deployment, as the agent does,
    since whoever holds it is shipping the same files)."""
    root = app.settings.home / "spool" / "predictions"
    shipped, failed, busy, error = 0, 0, 0, None
    if not root.is_dir():
        return {"shipped": 0, "failed": 0, "busy": 0, "error": None}
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        if deployment is not None and directory.name != deployment:
            continue
        try:
            with _shipping(directory, wait) as held:
                if not held:
                    busy += 1
                    continue
                done, lost, first = _ship_directory(app, directory)
        except OSError as exc:  # the lock file (made by another user?), a dead worker's file
            failed += 1
            error = error or f"{directory.name}: {exc}"
            continue
        shipped, failed, error = shipped + done, failed + lost, error or first
    return {"shipped": shipped, "failed": failed, "busy": busy, "error": error}


@contextlib.contextmanager
def _shipping(directory: Path, wait: float | None) -> Iterator[bool]:
    """Hold the deployment's ship lock; yields False if another shipper kept it `wait` s."""
    import fcntl

    with (directory / ".ship.lock").open("a") as handle:
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ship_directory(app: Appliance, directory: Path) -> tuple[int, int, str | None]:
    """Ship one deployment's closed files (its lock held): shipped, failed, first error."""
    shipped, failed, error = 0, 0, None
    _adopt_orphans(directory)
    for path in sorted(directory.glob("*.jsonl")):
        try:
            _ship(app, directory.name, path)
            shipped += 1
        except _Unreadable as exc:  # never readable: set aside, not retried forever
            rejected = directory / "rejected"
            rejected.mkdir(exist_ok=True)
            path.rename(rejected / path.name)
            failed += 1
            error = error or f"{path.name}: unreadable, moved to rejected/: {exc}"
        except (OSError, ApplianceError, ValueError) as exc:
            failed += 1
            error = error or f"{path.name}: {exc}"
        except Exception as exc:  # the store's client raises its own errors (S3Error)
            failed += 1
            error = error or f"{path.name}: {type(exc).__name__}: {exc}"
    return shipped, failed, error


def _adopt_orphans(directory: Path) -> None:
    """Open files of a worker that died (killed, its machine restarted): their complete
    lines become a shippable file; a last line cut short is dropped."""
    from appliance.core.processes import alive

    for part in directory.glob("*.jsonl.part"):
        pieces = part.name.split("-")
        pid = int(pieces[2]) if len(pieces) > 3 and pieces[2].isdigit() else 0
        if pid and alive(pid):
            continue
        data = part.read_bytes()
        keep = data[: data.rfind(b"\n") + 1]
        if keep:
            part.write_bytes(keep)
            part.rename(part.with_suffix(""))
        else:
            part.unlink(missing_ok=True)


def _ship(app: Appliance, deployment: str, path: Path) -> None:
    import duckdb

    kind = path.name.split("-", 1)[0]
    if kind == "feedback":  # labels the server took by POST /feedback
        from appliance.core.feedback import store_spooled_feedback

        store_spooled_feedback(app, deployment, path)
        return
    if kind not in KINDS:
        raise ValueError(f"not a prediction log file: {path.name}")
    known = app.db.scalar(
        "SELECT 1 FROM prediction_logs WHERE deployment = ? AND spool_name = ?",
        (deployment, path.name),
    )
    if known:  # recorded by a pass that died before removing it
        path.unlink(missing_ok=True)
        return
    tmp_dir = app.settings.cache_dir / "spool-ship"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    out = tmp_dir / (path.stem + ".parquet")
    con = duckdb.connect(config={"threads": 1})  # in the background: one core at most
    try:
        rows, first, last = _convert(con, path, kind, out)
    except duckdb.Error as exc:  # a cut or hand-made line: the file can never be read
        raise _Unreadable(str(exc).splitlines()[0]) from None
    finally:
        con.close()
    stored = app.objects.put_file(out, move=True)
    hour = path.name.split("-")[1]
    app.db.execute(
        "INSERT INTO prediction_logs (deployment, kind, hour, sha256, rows, first_ts, last_ts, "
        "spool_name, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (deployment, spool_name) DO NOTHING",
        (deployment, kind, hour, stored.sha256, rows, first, last, path.name, utcnow()),
    )
    path.unlink(missing_ok=True)


class _Unreadable(Exception):
    """A spool file DuckDB cannot read (a line cut short by a full disk, a hand edit)."""


def _convert(con: Any, path: Path, kind: str, out: Path) -> tuple[int, float, float]:
    """One spool file to Parquet at `out`; its rows and its first and last times."""
    import duckdb

    from appliance.core import duck

    # Parsed once into memory; each line is a batch of equal-length columns, so unnesting
    # them together gives rows. Wide models stay a struct (not a map). The first line tells
    # the types (fast) unless it cannot (a null there, or a later line of other types):
    # then every line does.
    read = (
        f"read_json({duck.sql_string(str(path))}, format = 'newline_delimited', "
        "map_inference_threshold = -1"
    )
    try:
        con.execute(f"CREATE TEMP TABLE batch AS SELECT * FROM {read}, sample_size = 1)")
        vague = "JSON" in str(con.execute("DESCRIBE batch").fetchall())
    except duckdb.Error:
        vague = True
    if vague:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE batch AS SELECT * FROM {read}, sample_size = -1)"
        )
    base = ["ts", "request_id", "version", "revision"]
    if kind == "inputs":
        fields = _struct_fields(con)
        columns = [*base, "row"]
        select = (
            "SELECT "
            + ", ".join(f"unnest({c}) AS {c}" for c in columns)
            + "".join(
                f", unnest({_as_values(f, t)}) AS {duck.sql_identifier('x_' + f)}"
                for f, t in fields
            )
            + ", unnest(y) AS prediction FROM batch"
        )
    else:
        columns = [*base, "role", "status", "latency_ms", "rows"]
        select = "SELECT " + ", ".join(f"unnest({c}) AS {c}" for c in columns) + " FROM batch"
    con.execute(f"COPY ({select}) TO {duck.sql_string(str(out))} (FORMAT parquet)")
    rows, first, last = con.execute(
        "SELECT sum(len(ts)), min(list_min(ts)), max(list_max(ts)) FROM batch"
    ).fetchone()
    return int(rows or 0), float(first or 0), float(last or 0)


def _struct_fields(con: Any) -> list[tuple[str, str]]:
    """(feature, type) of the batch's `x` struct (DuckDB unified them across lines)."""
    kinds = {r[0]: str(r[1]) for r in con.execute("DESCRIBE batch").fetchall()}
    if not kinds.get("x", "").startswith("STRUCT"):
        return []
    found = con.execute("SELECT struct_keys(x) FROM batch LIMIT 1").fetchone()
    names = list(found[0]) if found else []
    return [
        (n, str(con.execute(f"SELECT typeof(x.{_ident(n)}) FROM batch LIMIT 1").fetchone()[0]))
        for n in names
    ]


def _ident(name: str) -> str:
    from appliance.core import duck

    return duck.sql_identifier(name)


def _as_values(name: str, kind: str) -> str:
    """A feature's list as plain values: JSON (mixed types, or all missing) as text."""
    column = f"x.{_ident(name)}"
    if "JSON" in kind:
        return f"list_transform({column}, v -> json_extract_string(v, '$'))"
    return column


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
