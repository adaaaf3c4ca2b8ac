"""Prediction logs: what a deployment answered, written off the request path.

A serving worker hands each answered request, once its response is sent, to
`PredictionLog.record`. Request metadata (time, request id, version, revision, role,
status, latency, rows) is logged for every request by default; inputs and outputs for a
sampled share (`log_sample`). Code that runs once per batch runs cold (encoding a batch of
30 logged requests took 7 µs a request in a loaded worker, 2 µs in a loop), so `record`
appends each request to column buffers as it comes: its metadata, and inputs that came as
one numeric tensor of the model's features (the common case) as their bytes (1.5 µs a
request for metadata, 2 µs more for a tensor), or a batch's matrix (64 KiB or more) as it
came, by reference, since copying megabytes costs more. Inputs of any other shape (named
columns, text, mixed types) are queued, and encoded by the serving loop every 10 ms as
columnar JSON lines, which DuckDB reads and unifies. A thread takes the buffers every
0.2 s, frames them (`.frames`: numbers as their raw bytes, text as JSON; written as parts,
a batch's matrix from its own buffer) and writes them to files in the home's spool
(`spool/predictions/<deployment>/`), closed every few seconds. Buffers and spool are
bounded, so a store that cannot take files for a while costs samples, never requests.

The agent ships closed spool files (`ship_logs`): each becomes Parquet (inputs one row per
predicted row, a column per feature), the object store takes it by sha256, and one row per
file is recorded by deployment, kind and hour. A file that cannot be shipped (the store
unreachable) stays in the spool and is tried again on the next pass.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import struct
import sys
import threading
import time
import uuid
from array import array
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from appliance.core.context import Appliance
from appliance.core.times import clock
from appliance.errors import ApplianceError, StoreUnavailable
from appliance.store.db import utcnow

QUEUE_SIZE = 50_000  # requests logged, not yet written; beyond it samples are dropped
# Encoding a batch of Python objects holds the worker's interpreter, so requests in flight
# wait for it (350 requests, every 100 ms, took 1.5 ms): inputs the buffers cannot take are
# encoded by the serving loop in short batches, ENCODE_SECONDS apart. The writer thread
# wakes WRITE_SECONDS apart; framing the buffers copies small columns only.
ENCODE_SECONDS = float(os.environ.get("APPLIANCE_LOG_ENCODE_SECONDS", "0.01"))
WRITE_SECONDS = float(os.environ.get("APPLIANCE_LOG_WRITE_SECONDS", "0.2"))
ENCODED_LIMIT = 64 << 20  # encoded bytes the writer has not taken; beyond it samples drop
ROTATE_SECONDS = float(os.environ.get("APPLIANCE_LOG_ROTATE_SECONDS", "5"))
ROTATE_BYTES = 64 << 20
SPOOL_LIMIT = int(os.environ.get("APPLIANCE_LOG_SPOOL_BYTES", str(1 << 30)))
KINDS = ("requests", "inputs")
REQUEST_COLUMNS = (
    "ts",
    "request_id",
    "version",
    "revision",
    "role",
    "status",
    "latency_ms",
    "rows",
)
# A binary frame: magic, header length, body length (little-endian uint32), the header (JSON:
# each column's name, dtype or "json", shape and byte length; the inputs' feature names),
# then the columns' bytes in that order.
FRAME_MAGIC = b"APF1"
FRAME_PREFIX = struct.Struct("<4sII")
FRAMES, JSONL = ".frames", ".jsonl"
# The log kinds, as spool files and shipped Parquet are named: what each reader reads
LOG_KINDS = ("requests", "inputs", "feedback")
# A frame is written as its parts: a matrix of at least BIG_ARRAY bytes (a batch request's
# inputs) goes from its own buffer to the file, as copying megabytes costs more than the
# writes (fresh pages to fault in, on the serving worker's cores)
BIG_ARRAY = 64 << 10
Chunk = list[Any]  # what is written to a spool file at once: its parts (bytes and byte views)
# How long a reader that wants fresh numbers (drift, quality, report, a monitor) waits for
# the agent's shipper to finish with a deployment; past it, it reads what is shipped.
FRESH_WAIT = 10.0


def spool_dir(home: Path, deployment: str) -> Path:
    return home / "spool" / "predictions" / deployment


def _hour(ts: float) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(ts))


class _SpoolFile:
    """One open `.part` file of one kind, format and hour; renamed without `.part` (and so
    shippable) when closed."""

    def __init__(self, directory: Path, kind: str, hour: str, seq: str, suffix: str) -> None:
        self.path = directory / f"{kind}-{hour}-{os.getpid()}-{seq}{suffix}.part"
        self.hour = hour
        self.handle = self.path.open("ab")
        self.opened = time.monotonic()
        self.size = 0

    def write(self, data: Chunk) -> None:
        for part in data:  # large arrays from their own buffers, not joined
            self.handle.write(part)
        self.size += _size(data)

    def close(self) -> None:
        self.handle.close()
        if self.size:
            self.path.rename(self.path.with_suffix(""))  # x.frames.part -> x.frames
        else:
            self.path.unlink(missing_ok=True)


class PredictionLog:
    """A worker's log: `record` on the request path, `run` in a thread of its own.

    The request path appends each request to the current hour's column buffers (no wake-up
    of another thread); inputs of a shape the buffers do not take go to a queue the loop
    encodes every ENCODE_SECONDS. The writer thread swaps the buffers out, frames them and
    writes the spool, and encodes the queue when the loop has gone quiet."""

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
        # samples lost: on the serving loop (a full queue or backlog, a value that cannot be
        # encoded) and in the writer thread (a full spool or disk); one counter per thread,
        # as `+=` from two threads can lose counts
        self.dropped = 0
        self.lost = 0
        self.written = 0
        self.files: dict[tuple[str, str], _SpoolFile] = {}
        self.seq = 0
        self.spool_bytes = 0
        self.measured = 0.0
        self.error: str | None = None  # the first thing that cost samples, said once
        self.token = uuid.uuid4().hex[:8]  # a pid is reused after a restart: names are not
        self.lock = threading.Lock()  # the buffers, the queue and the encoded batches
        self.write_lock = threading.Lock()  # the files: the writer thread, a stopping server
        self.hour: _Hour | None = None  # what the request path fills
        self.sealed: list[_Hour] = []  # hours past, for the writer
        self.held = 0  # requests logged and not yet taken by the writer
        self.encoded: list[tuple[int, list[tuple[str, float, str, Chunk]]]] = []
        self.encoded_bytes = 0  # held as bytes: inputs buffered or encoded
        self.next_encode = 0.0

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
        """Log one answered request; never raises, and waits at most while the writer swaps
        the buffers or encodes the queue. `rows`: how many rows it predicted; `columns`: the
        inputs as feature columns, or (feature names, [N, F] matrix) as a V2 tensor gave
        them."""
        sample = self.sample
        sampled = columns is not None and sample > 0 and (sample >= 1 or random.random() < sample)
        if not (self.requests or sampled):
            return
        ts = time.time()
        with self.lock:
            if self.held >= self.queue_size or self.encoded_bytes > ENCODED_LIMIT:
                self._lose(1, "the queue is full (the writer is behind)")
                return
            self.held += 1
            hour = self.hour
            if hour is None or ts >= hour.end:
                hour = self._new_hour(ts)
            try:
                if self.requests:
                    hour.ts.append(ts)
                    hour.ids.append(request_id)
                    hour.version.append(version)
                    hour.revision.append(revision)
                    hour.role.append(role)
                    hour.status.append(status)
                    hour.latency.append(seconds * 1000.0)
                    hour.rows.append(rows)
                tensor = sampled and self._add_tensor(
                    hour, ts, request_id, version, revision, columns, predictions
                )
            except BaseException as exc:  # a value the buffers do not take: this sample only
                hour.realign()
                self.held -= 1
                if not isinstance(exc, Exception):  # a stop: the columns stay aligned
                    raise
                self._lose(1, f"{type(exc).__name__}: {exc}")
                return
            if sampled and not tensor:
                item = (ts, request_id, version, revision, role, status, seconds, rows)
                self.pending.append((*item, columns, predictions))
                if time.monotonic() >= self.next_encode:
                    self._encode_pending()
                return
            hour.items += 1

    def _new_hour(self, ts: float) -> _Hour:
        """The buffers of the hour `ts` falls in; the previous hour's wait for the writer."""
        if self.hour is not None:
            self.sealed.append(self.hour)
        self.hour = _Hour(ts)
        return self.hour

    def _add_tensor(
        self,
        hour: _Hour,
        ts: float,
        request_id: str,
        version: int,
        revision: int,
        columns: Any,
        predictions: Any,
    ) -> bool:
        """Append a request that sent one numeric [N, F] tensor and got one number per row
        to its model's buffers (its matrix as bytes, or kept whole if it is a batch's);
        False for any other shape (the JSON path)."""
        if type(columns) is not tuple:
            return False
        names, x = columns
        group = hour.tensors.get(id(names))
        if group is None:
            group = _Tensors.of(names, x, predictions)
            if group is None:
                return False
            hour.tensors[id(names)] = group
        y = predictions
        if (
            type(x) is not group.ndarray
            or type(y) is not group.ndarray
            or x.ndim != 2
            or x.shape[1] != group.width
            or y.ndim != 1
            or len(y) != len(x)
        ):
            return False
        if x.dtype is not group.xtype and x.dtype != group.xtype:
            if x.dtype.kind != "f" or group.xtype.kind != "f":
                return False
            x = x.astype(group.xtype)  # float32 as float64, as the JSON lines give it
        if y.dtype is not group.ytype and y.dtype != group.ytype:
            if y.dtype.kind != "f" or group.ytype.kind != "f":
                return False
            y = y.astype(group.ytype)
        out = y.tobytes()
        size = x.nbytes
        if size >= BIG_ARRAY:  # a batch: its own matrix is written (nothing changes it once
            # answered), not copied here and again by the writer
            group.pieces.append(memoryview(x if x.flags.c_contiguous else x.copy()).cast("B"))
            group.tail = None
        else:  # rows: appended to the bytes of the requests before it
            tail = group.tail
            if tail is None:
                tail = group.tail = bytearray()
                group.pieces.append(tail)
            tail += x.tobytes()
        group.y += out
        group.ts.append(ts)
        group.ids.append(request_id)
        group.version.append(version)
        group.revision.append(revision)
        group.count.append(len(y))
        group.xbytes += size
        self.encoded_bytes += size + len(out)
        return True

    def _encode_pending(self, writer: bool = False) -> int:
        """The queue as encoded batches (the lock held; `writer`: called by the writer
        thread); how many items it took."""
        self.next_encode = time.monotonic() + ENCODE_SECONDS
        items = []
        pending = self.pending
        while pending:
            items.append(pending.popleft())
        if not items:
            return 0
        try:
            chunks = _chunks(items)
        except Exception as exc:  # a value orjson cannot write: these samples are lost
            self.held -= len(items)
            self._lose(len(items), f"{type(exc).__name__}: {exc}", writer)
            return len(items)
        self.encoded.append((len(items), chunks))
        self.encoded_bytes += sum(_size(chunk[3]) for chunk in chunks)
        return len(items)

    def _lose(self, count: int, why: str, writer: bool = False) -> None:
        """Samples lost: counted (on the calling thread's counter), the first reason said
        once."""
        if writer:
            self.lost += count
        else:
            self.dropped += count
        if self.error is None:
            self.error = why
            with contextlib.suppress(Exception):  # a closed stderr must not reach a request
                print(f"prediction log: samples dropped: {why}", file=sys.stderr)

    def counters(self) -> dict[str, Any]:
        return {
            "queued": self.held,
            "dropped": self.dropped + self.lost,
            "written": self.written,
            "error": self.error,
        }

    # ---- the writer thread --------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Write the encoded batches to spool files every WRITE_SECONDS until `stop`, then
        write the rest and close."""
        self.directory.mkdir(parents=True, exist_ok=True)
        while not stop.wait(WRITE_SECONDS):
            try:
                self._drain()
            except Exception as exc:  # whatever it was, the thread lives: the next pass tries
                self.error = self.error or f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            self.flush()

    def flush(self) -> None:
        """Write everything queued and close the files (a stopping worker; tests)."""
        with self.write_lock:
            self._write_encoded(force=True)
            self._rotate(force=True)

    def _drain(self, force: bool = False) -> int:
        """The writer's pass: the encoded batches to the spool, and the queue too when the
        serving loop has not encoded for a while (no requests since) or `force`; how many
        items were taken."""
        with self.write_lock:
            taken = self._write_encoded(force)
            self._rotate(force=False)
        return taken

    def _write_encoded(self, force: bool) -> int:
        with self.lock:  # a swap of references: the request path waits no longer than this
            if force or time.monotonic() >= self.next_encode + ENCODE_SECONDS:
                self._encode_pending(writer=True)
            hours, self.sealed = self.sealed, []
            if self.hour is not None:
                hours.append(self.hour)
                self.hour = None
            batches, self.encoded, self.encoded_bytes = self.encoded, [], 0
            self.held = len(self.pending)
        for hour in hours:
            try:
                batches.append((hour.items, hour.chunks()))
            except Exception as exc:  # a value orjson cannot write: these samples are lost
                self._lose(hour.items, f"{type(exc).__name__}: {exc}", writer=True)
        taken = 0
        for count, chunks in batches:
            taken += count
            try:
                if self._over_limit():  # the store away for long: the spool is bounded
                    self._lose(count, f"the spool is full ({self.spool_limit} bytes)", True)
                    continue
                for kind, ts, suffix, data in chunks:
                    self._put(kind, ts, suffix, data)
            except Exception as exc:  # a full disk: these samples are lost, the writer goes on
                self._lose(count, f"{type(exc).__name__}: {exc}", writer=True)
                continue
            self.written += count
        return taken

    def _over_limit(self) -> bool:
        now = time.monotonic()
        if now - self.measured > 2.0:
            self.measured = now
            with contextlib.suppress(FileNotFoundError):  # created with the first file
                self.spool_bytes = sum(
                    p.stat().st_size for p in self.directory.iterdir() if p.is_file()
                )
        return self.spool_bytes > self.spool_limit

    def _file(self, kind: str, ts: float, suffix: str) -> _SpoolFile:
        hour = _hour(ts)
        current = self.files.get((kind, suffix))
        if current is not None and current.hour != hour:
            self._close((kind, suffix))
            current = None
        if current is None:
            self.seq += 1
            self.directory.mkdir(parents=True, exist_ok=True)  # removed meanwhile: again
            current = self.files[kind, suffix] = _SpoolFile(
                self.directory, kind, hour, f"{self.seq}{self.token}", suffix
            )
        return current

    def _put(self, kind: str, ts: float, suffix: str, data: Chunk) -> None:
        self._file(kind, ts, suffix).write(data)
        self.spool_bytes += _size(data)

    def _rotate(self, force: bool) -> None:
        now = time.monotonic()
        for key, spool in list(self.files.items()):
            if force or now - spool.opened > ROTATE_SECONDS or spool.size > ROTATE_BYTES:
                self._close(key)
                continue
            try:
                spool.handle.flush()
            except Exception as exc:  # a full disk: the others go on
                self.error = self.error or f"{type(exc).__name__}: {exc}"

    def _close(self, key: tuple[str, str]) -> None:
        """Close one spool file, making it shippable. Out of the table first: one that
        cannot be closed (its directory removed) is not tried again; the error is kept."""
        spool = self.files.pop(key)
        try:
            spool.close()
        except Exception as exc:
            self.error = self.error or f"{type(exc).__name__}: {exc}"


_DTYPES: dict[Any, str] = {}  # numpy builds a dtype's name on every ask


def _size(data: Chunk) -> int:
    return sum(map(len, data))


class _Stacked(NamedTuple):
    """A numeric column given as its bytes in pieces, written one after another."""

    pieces: list[Any]
    dtype: Any
    shape: tuple[int, ...]


def _frame_parts(columns: list[tuple[str, Any]], features: Any = None) -> Chunk:
    """One binary frame as the parts to write in order: numeric arrays as their bytes (one
    of BIG_ARRAY bytes or more as a view of its own buffer, not a copy), a `_Stacked`
    column as its pieces, anything else as JSON."""
    import numpy as np
    import orjson

    head, body = [], []
    for name, values in columns:
        if type(values) is _Stacked:
            parts, dtype, shape = values.pieces, values.dtype, values.shape
        elif isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
            dtype, shape = values.dtype, values.shape
            if values.nbytes >= BIG_ARRAY:
                parts = [memoryview(np.ascontiguousarray(values)).cast("B")]
            else:
                parts = [values.tobytes()]
        else:
            data = orjson.dumps(values)
            head.append((name, "json", None, len(data)))
            body.append(data)
            continue
        code = _DTYPES.get(dtype) or _DTYPES.setdefault(dtype, dtype.str)
        head.append((name, code, shape, sum(map(len, parts))))
        body.extend(parts)
    header = orjson.dumps({"columns": head, "features": features})
    length = sum(map(len, body))
    return [FRAME_PREFIX.pack(FRAME_MAGIC, len(header), length) + header, *body]


def _request_columns(ts: Any, ids: Any, ver: Any, rev: Any) -> list[tuple[str, Any]]:
    """The columns both kinds of frame give per request: time, id, version, revision."""
    import numpy as np

    return [
        ("ts", np.asarray(ts, dtype=np.float64)),
        ("request_id", list(ids) if isinstance(ids, tuple) else ids),
        ("version", np.asarray(ver, dtype=np.int64)),
        ("revision", np.asarray(rev, dtype=np.int64)),
    ]


def _chunks(items: list[tuple[Any, ...]]) -> list[tuple[str, float, str, Chunk]]:
    """Queued inputs as one frame per model (or a columnar line) per hour, each as (kind,
    time, suffix, parts); the shipper unnests them. Per-item Python work is kept to a few
    C-level passes over the batch."""
    import orjson

    chunks: list[tuple[str, float, str, Chunk]] = []
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
        frames, rest = _tensor_frames(batch)
        for frame in frames:
            chunks.append(("inputs", ts0, FRAMES, frame))
        if not rest:
            continue
        try:
            line = orjson.dumps(_inputs_columns(rest), option=option)
        except (TypeError, ValueError):  # outputs of two shapes (a canary of another
            line = b"".join(  # model), or a request with no rows: apart
                orjson.dumps(_inputs_columns(group), option=option)
                for group in _by_output_shape(rest)
            )
        chunks.append(("inputs", ts0, JSONL, [line]))
    return chunks


class _Hour:
    """One hour's logged requests, filled on the request path column by column (a few
    appends per request, no object kept): every request's metadata, and the sampled
    requests' tensors, per model."""

    __slots__ = (
        "end",
        "items",
        "ts",
        "ids",
        "version",
        "revision",
        "role",
        "status",
        "latency",
        "rows",
        "tensors",
    )

    def __init__(self, ts: float) -> None:
        self.end = (int(ts // 3600) + 1) * 3600.0
        self.items = 0  # requests held here (those whose inputs went to the queue are not)
        self.ts, self.ids = array("d"), []
        self.version, self.revision = array("q"), array("q")
        self.role, self.status = [], array("q")
        self.latency, self.rows = array("d"), array("q")
        self.tensors: dict[int, _Tensors] = {}  # by id of the model's feature list

    def realign(self) -> None:
        """After a request failed half-way through its appends: every column back to the
        length they all had."""
        columns = (self.ts, self.ids, self.version, self.revision, self.role)
        columns += (self.status, self.latency, self.rows)
        shortest = min(map(len, columns))
        for column in columns:
            del column[shortest:]
        for group in self.tensors.values():
            group.realign()

    def chunks(self) -> list[tuple[str, float, str, Chunk]]:
        """The metadata and each model's tensors as frames, as (kind, time, suffix, frame's
        parts)."""
        import numpy as np

        at = self.end - 1.0  # names the hour
        chunks = []
        if self.ts:
            chunks.append(
                (
                    "requests",
                    at,
                    FRAMES,
                    _frame_parts(
                        [
                            *_request_columns(self.ts, self.ids, self.version, self.revision),
                            ("role", self.role),
                            ("status", np.frombuffer(self.status, dtype=np.int64)),
                            ("latency_ms", np.frombuffer(self.latency, dtype=np.float64)),
                            ("rows", np.frombuffer(self.rows, dtype=np.int64)),
                        ]
                    ),
                )
            )
        for group in self.tensors.values():
            if group.ts:
                chunks.append(("inputs", at, FRAMES, group.frame()))
        return chunks


class _Tensors:
    """Sampled requests that sent one numeric [N, F] tensor of one model's features and got
    one number per row: the matrices' bytes in order (in pieces: a run of small ones copied
    into one buffer, a batch's its own), the predictions as bytes, and per request its time,
    id, version, revision and row count."""

    __slots__ = (
        "ndarray",
        "names",
        "width",
        "xtype",
        "ytype",
        "ts",
        "ids",
        "version",
        "revision",
        "count",
        "pieces",
        "tail",
        "xbytes",
        "y",
    )

    def __init__(self, ndarray: type, names: Any, xtype: Any, ytype: Any) -> None:
        self.ndarray, self.names, self.width = ndarray, names, len(names)
        self.xtype, self.ytype = xtype, ytype
        self.ts, self.ids = array("d"), []
        self.version, self.revision, self.count = array("q"), array("q"), array("q")
        self.pieces: list[bytearray | memoryview] = []  # the matrices' bytes, in order
        self.tail: bytearray | None = None  # the last piece, while small matrices fill it
        self.xbytes = 0
        self.y = bytearray()

    @classmethod
    def of(cls, names: Any, x: Any, y: Any) -> _Tensors | None:
        """Buffers for requests like this one, if it is a numeric tensor of its features."""
        dtype, ytype = getattr(x, "dtype", None), getattr(y, "dtype", None)
        if dtype is None or ytype is None or dtype.kind not in "biuf" or ytype.kind not in "biuf":
            return None
        if not isinstance(names, list | tuple) or getattr(x, "ndim", 0) != 2:
            return None
        return cls(type(x), names, _widened(dtype), _widened(ytype))

    def realign(self) -> None:
        """Every request's values back to the requests appended whole."""
        columns = (self.ts, self.ids, self.version, self.revision, self.count)
        shortest = min(map(len, columns))
        for column in columns:
            del column[shortest:]
        rows = sum(self.count)
        keep = rows * self.width * self.xtype.itemsize
        pieces: list[bytearray | memoryview] = []
        for piece in self.pieces:  # a request's own piece is kept whole or not at all
            if keep <= 0:
                break
            if len(piece) > keep and isinstance(piece, bytearray):
                del piece[keep:]
            keep -= len(piece)
            pieces.append(piece)
        self.pieces = pieces
        self.tail = pieces[-1] if pieces and isinstance(pieces[-1], bytearray) else None
        self.xbytes = sum(map(len, pieces))
        del self.y[rows * self.ytype.itemsize :]

    def frame(self) -> Chunk:
        """The buffers as one inputs frame, the same as a queued batch of tensors gives; the
        matrices' pieces are written as they are."""
        import numpy as np

        rows = self.xbytes // (self.width * self.xtype.itemsize)
        x = _Stacked(self.pieces, self.xtype, (rows, self.width))
        return _frame_parts(
            [
                *_request_columns(self.ts, self.ids, self.version, self.revision),
                ("count", np.frombuffer(self.count, dtype=np.int64)),
                ("x", x),
                ("y", np.frombuffer(self.y, dtype=self.ytype)),
            ],
            features=list(self.names),
        )


def _widened(dtype: Any) -> Any:
    """Floats as float64, as the JSON lines give them; other numbers as they are."""
    import numpy as np

    return np.dtype(np.float64) if dtype.kind == "f" else dtype


def _tensor_frames(items: list[tuple[Any, ...]]) -> tuple[list[Chunk], list[tuple[Any, ...]]]:
    """Sampled requests that sent tensors, as a frame per model's feature list (one runtime
    gives every request the same list object), and the requests left for a JSON line."""
    first = items[0][8]
    names = first[0] if type(first) is tuple else None
    if names is not None and all(type(i[8]) is tuple and i[8][0] is names for i in items):
        groups, rest = [items], []  # nearly always: one model
    else:
        by_list: dict[int | None, list[tuple[Any, ...]]] = {}
        for item in items:
            given = item[8]
            by_list.setdefault(id(given[0]) if type(given) is tuple else None, []).append(item)
        rest = by_list.pop(None, [])
        groups = list(by_list.values())
    frames = []
    for group in groups:
        frame = _tensor_frame(group)
        if frame is None:
            rest.extend(group)
        else:
            frames.append(frame)
    return frames, rest


def _tensor_frame(items: list[tuple[Any, ...]]) -> Chunk | None:
    """Requests that each sent a numeric [N, F] tensor of the same features and got one
    number per row, as one frame: their matrices stacked, the predictions, and per request
    its time, id, version and row count. None if they did not."""
    import numpy as np

    ts, ids, ver, rev, _, _, _, _, given, outputs = zip(*items, strict=True)
    names = given[0][0]
    try:
        x = np.concatenate([g[1] for g in given])
        y = np.concatenate(outputs)
        counts = np.fromiter(map(len, outputs), dtype=np.int64, count=len(outputs))
    except (TypeError, ValueError):  # a bare number, ragged rows
        return None
    if not (
        x.ndim == 2
        and x.shape[1] == len(names)
        and x.dtype.kind in "biuf"
        and y.ndim == 1
        and y.dtype.kind in "biuf"
        and len(x) == len(y) == int(counts.sum())
    ):
        return None
    if x.dtype.kind == "f" and x.dtype.itemsize < 8:  # as the JSON lines give them
        x = x.astype(np.float64)
    if y.dtype.kind == "f" and y.dtype.itemsize < 8:
        y = y.astype(np.float64)
    return _frame_parts(
        [
            *_request_columns(ts, ids, ver, rev),
            ("count", counts),
            ("x", x),
            ("y", y),
        ],
        features=list(names),
    )


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
    the deployments skipped because another shipper held them (`busy`, named in `held`), and
    the first error, also per deployment in `errors` (a file that failed stays, and is tried
    on the next call).

    The agent and a command that asks for fresh numbers (quality, drift) may ship at once:
    one at a time per deployment, or both would read the same file. `wait`: how long to
    wait for the other (None: until it is done; 0: skip the deployment, as the agent does,
    since whoever holds it is shipping the same files)."""
    root = app.settings.home / "spool" / "predictions"
    shipped, failed, held_by_others, errors = 0, 0, [], {}
    names = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    posting = _posting_deployments(app)  # their pods post closed files to the store
    names |= posting
    for name in sorted(names):
        if deployment is not None and name != deployment:
            continue
        directory = root / name
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with _shipping(directory, wait) as held:
                if not held:
                    held_by_others.append(directory.name)
                    continue
                taken = _take_posted(app, name, directory) if name in posting else None
                done, lost, first = _ship_directory(app, directory)
                first = first or taken
        except OSError as exc:  # the lock file (made by another user?), a dead worker's file
            failed += 1
            errors[directory.name] = f"{directory.name}: {exc}"
            continue
        shipped, failed = shipped + done, failed + lost
        if first:
            errors[directory.name] = first
    return {
        "shipped": shipped,
        "failed": failed,
        "busy": len(held_by_others),
        "error": next(iter(errors.values()), None),
        "errors": errors,
        "held": held_by_others,
    }


def posted_box(deployment: str) -> str:
    """The store's box where a deployment's k3s pods post their closed log files."""
    return f"spool/{deployment}"


def post_spool(app: Appliance, deployment: str) -> tuple[int, str | None]:
    """In a k3s pod: its closed log files into the deployment's box in the object store,
    each removed once posted, for the agent to take and ship (a pod never opens the
    registry). How many were posted, and the store's error (the rest stay, tried again)."""
    posted = 0
    for path in sorted(_closed_files(spool_dir(app.settings.home, deployment))):
        try:
            app.objects.post(posted_box(deployment), path.name, path)
        except ApplianceError as exc:
            if not path.exists():  # posted meanwhile by the pod's other round (its stop)
                continue
            return posted, exc.message
        path.unlink(missing_ok=True)
        posted += 1
    return posted, None


def _posting_deployments(app: Appliance) -> set[str]:
    """Deployments served on k3s, whose log files arrive through the object store."""
    return {r["name"] for r in app.db.rows("SELECT name FROM deployments WHERE backend = 'k3s'")}


def _take_posted(app: Appliance, deployment: str, directory: Path) -> str | None:
    """Move the files a deployment's pods posted into its spool (its ship lock held); the
    store's error, if any. A file is removed from the store only once it is in the spool,
    and one shipped before (a removal that failed) is known by name when shipped again."""
    box = posted_box(deployment)
    try:
        names = app.objects.inbox(box)
    except ApplianceError as exc:
        return f"{deployment}: {exc.message}"
    error = None
    for name in names:  # one that fails waits for the next pass; the others go on
        target = directory / name
        try:
            if target.exists() or app.objects.fetch(box, name, target):
                app.objects.discard(box, name)
        except StoreUnavailable as exc:  # the store went away: the rest would only wait
            return f"{deployment}: {exc.message}"
        except (ApplianceError, OSError) as exc:  # this file; a full disk here
            error = error or f"{deployment}: {name}: {getattr(exc, 'message', exc)}"
    return error


def ship_for_reading(
    app: Appliance, deployment: str, kinds: tuple[str, ...]
) -> dict[str, Any] | None:
    """Ship the deployment's closed log files before a reader's query, waiting FRESH_WAIT
    for another shipper. When that shipper kept the spool or shipping failed, what still
    waits of the `kinds` the reader reads (requests, inputs, feedback): so that drift,
    quality and the report can say what they leave out. None when nothing does."""
    why = shipping_held(ship_logs(app, deployment, wait=FRESH_WAIT))
    if why is None:  # a file closed since is seconds old, as the open one is: nothing to say
        return None
    return waiting_logs(app, deployment, kinds, why)


def wait_for_open_logs(app: Appliance, deployment: str, kinds: tuple[str, ...] = KINDS) -> None:
    """Wait until the spool files of `kinds` the deployment's workers have open now are
    closed (they close every ROTATE_SECONDS), so that a reader that found nothing of
    requests answered moments ago finds them when it ships and looks again. A worker writes
    what it answered within WRITE_SECONDS, perhaps to a file it opens then: those count too.
    The reader looks again even when none was open: a file may have closed (and the agent
    shipped it) between the reader's first look and this wait."""
    directory = spool_dir(app.settings.home, deployment)

    def open_files() -> set[str]:
        return {p.name for kind in kinds for p in directory.glob(f"{kind}-*.part")}

    waiting = open_files()
    time.sleep(WRITE_SECONDS + 0.05)
    waiting |= open_files()
    deadline = time.monotonic() + ROTATE_SECONDS + 2 * WRITE_SECONDS + 1
    while waiting & open_files() and time.monotonic() < deadline:
        time.sleep(0.05)


def shipping_held(result: dict[str, Any]) -> str | None:
    """Why a `ship_logs` pass left files in the spool, in words; None when it did not."""
    if result["busy"]:
        return f"another shipper held the spool for {FRESH_WAIT:g} s"
    if result["error"]:
        return f"shipping failed: {result['error']}"
    return None


def waiting_logs(
    app: Appliance,
    deployment: str,
    kinds: tuple[str, ...],
    why: str,
    older_than: float = 0.0,
    since: float | None = None,
) -> dict[str, Any] | None:
    """The closed spool files of `kinds` not shipped yet (closed over `older_than` seconds
    ago; of requests and inputs, those whose hour ends after `since`): how many, their
    bytes, the oldest's time and `why` (None if none)."""
    waiting = []
    before = time.time() - older_than
    for path in _closed_files(spool_dir(app.settings.home, deployment)):
        kind, hour = (path.name.split("-") + [""])[:2]  # <kind>-<hour>-<pid>-<seq><suffix>
        if kind not in kinds or (since is not None and kind in KINDS and _hour_end(hour) <= since):
            continue
        with contextlib.suppress(FileNotFoundError):  # shipped meanwhile by the agent
            stat = path.stat()
            if stat.st_mtime <= before:
                waiting.append(stat)
    if not waiting:
        return None
    return {
        "files": len(waiting),
        "bytes": sum(s.st_size for s in waiting),
        "since": min(s.st_mtime for s in waiting),
        "why": why,
    }


def _hour_end(hour: str) -> float:
    """When a spool file's hour (UTC, as named) ends; infinity for a name that is not one."""
    import calendar

    try:
        return calendar.timegm(time.strptime(hour, "%Y%m%d%H")) + 3600.0
    except ValueError:
        return math.inf


def behind_note(behind: dict[str, Any] | None) -> str | None:
    """One line saying which logs are not shipped yet, for the CLI, the report and the TUI."""
    if not behind:
        return None
    size, files = behind["bytes"], behind["files"]
    if size >= 999_950:
        shown = f"{size / 1e6:.1f} MB"
    else:
        shown = f"{size / 1e3:.1f} kB" if size >= 1000 else f"{size} bytes"
    since = clock(behind["since"], seconds=True)
    many = files != 1
    return (
        f"{files} log file{'s' if many else ''} of {shown}, the oldest written {since}, "
        f"{'are' if many else 'is'} not shipped yet: {behind['why']}"
    )


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


def _closed_files(directory: Path) -> list[Path]:
    """The spool's files ready to ship, of either format (a writer's open file ends .part)."""
    return [*directory.glob(f"*{FRAMES}"), *directory.glob(f"*{JSONL}")]


def _ship_directory(app: Appliance, directory: Path) -> tuple[int, int, str | None]:
    """Ship one deployment's closed files (its lock held): shipped, failed, first error."""
    shipped, failed, error = 0, 0, None
    unadopted = adopt_orphans(directory)  # said below, and the rest still shipped
    for path in sorted(_closed_files(directory), key=lambda p: p.name):
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
    # a file that fails to ship (the store away) is news; one stuck unadopted says so after
    return shipped, failed, error or next(iter(unadopted), None)


def adopt_orphans(directory: Path, every: bool = False) -> list[str]:
    """Open files of a worker that died (killed, its machine restarted): their complete
    frames or lines become a shippable file; the last one, cut short, is dropped. `every`:
    all open files, whatever their pid (a restarted pod's container, before its writer
    starts: a pid there is reused at once). Returns what could not be adopted, one line a
    file: a file that cannot be read holds up none of the others."""
    from appliance.core.processes import alive

    errors = []
    for part in sorted([*directory.glob(f"*{FRAMES}.part"), *directory.glob(f"*{JSONL}.part")]):
        pieces = part.name.split("-")
        pid = int(pieces[2]) if len(pieces) > 3 and pieces[2].isdigit() else 0
        if not every and pid and alive(pid):
            continue
        try:
            data = part.read_bytes()
            if part.name.endswith(f"{FRAMES}.part"):
                keep = data[: _complete_frames(data)]
            else:
                keep = data[: data.rfind(b"\n") + 1]
            if keep:
                part.write_bytes(keep)
                part.rename(part.with_suffix(""))
            else:
                part.unlink(missing_ok=True)
        except OSError as exc:
            errors.append(f"{part.name} not adopted: {exc.strerror or exc}")
    return errors


def _complete_frames(data: bytes) -> int:
    """How many leading bytes of `data` are whole frames."""
    end = 0
    while end + FRAME_PREFIX.size <= len(data):
        magic, head, body = FRAME_PREFIX.unpack_from(data, end)
        if magic != FRAME_MAGIC or end + FRAME_PREFIX.size + head + body > len(data):
            break
        end += FRAME_PREFIX.size + head + body
    return end


def _ship(app: Appliance, deployment: str, path: Path) -> None:
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
    rows, first, last = _convert_file(path, kind, out)
    stored = app.objects.put_file(out, move=True)
    hour = path.name.split("-")[1]
    app.db.execute(
        "INSERT INTO prediction_logs (deployment, kind, hour, sha256, rows, first_ts, last_ts, "
        "spool_name, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (deployment, spool_name) DO NOTHING",
        (deployment, kind, hour, stored.sha256, rows, first, last, path.name, utcnow()),
    )
    path.unlink(missing_ok=True)


def _convert_file(path: Path, kind: str, out: Path) -> tuple[int, float, float]:
    """One spool file as Parquet at `out`: its rows and time span. In the calling thread,
    with that thread's DuckDB connection."""
    import duckdb

    con = _connection()
    try:
        if path.suffix == FRAMES:
            return _convert_frames(con, path, kind, out)
        return _convert(con, path, kind, out)
    except duckdb.IOException as exc:  # writing the Parquet (a full disk): tried again
        _drop_connection()
        raise OSError(str(exc).splitlines()[0]) from None
    except duckdb.Error as exc:  # a cut or hand-made line: the file can never be read
        _drop_connection()
        raise _Unreadable(str(exc).splitlines()[0]) from None
    finally:
        with contextlib.suppress(duckdb.Error):  # the connection serves the next file
            con.execute("DROP TABLE IF EXISTS batch")


_shipper = threading.local()


def _connection() -> Any:
    """This thread's DuckDB connection for shipping: opening one costs about as much as
    converting a few thousand rows, so a shipping pass opens one, not one per file."""
    import duckdb

    con = getattr(_shipper, "con", None)
    if con is None:
        con = _shipper.con = duckdb.connect(config={"threads": 1})  # one core at most
    return con


def _drop_connection() -> None:
    """After a failed conversion: the next file gets a fresh connection, whatever state
    the error left this one in."""
    con = getattr(_shipper, "con", None)
    _shipper.con = None
    if con is not None:
        with contextlib.suppress(Exception):
            con.close()


class _Unreadable(Exception):
    """A spool file that cannot be read (a line cut short by a full disk, a hand edit)."""


def _convert_frames(con: Any, path: Path, kind: str, out: Path) -> tuple[int, float, float]:
    """A file of binary frames to Parquet at `out`: each frame's columns decoded (per-request
    values of inputs repeated for each of the request's rows), frames of the same columns
    stacked, and those of different ones (a canary of another model) put together by name."""
    import numpy as np

    from appliance.core import duck

    data = path.read_bytes()
    groups: dict[tuple[tuple[str, Any], ...], list[dict[str, Any]]] = {}
    pos = 0
    while pos < len(data):
        frame, pos = _read_frame(data, pos)
        columns = _input_rows(frame, pos) if kind == "inputs" else frame["columns"]
        if kind == "requests":
            _check_columns(columns, REQUEST_COLUMNS, pos)
        signature = tuple((name, values.dtype) for name, values in columns.items())
        groups.setdefault(signature, []).append(columns)
    tables = [
        {name: np.concatenate([f[name] for f in frames]) for name in frames[0]}
        for frames in groups.values()
    ]
    if not tables:
        raise _Unreadable("no frames")
    ts = np.concatenate([t["ts"] for t in tables])
    try:
        for number, table in enumerate(tables):
            con.register(f"frames{number}", table)
        select = " UNION ALL BY NAME ".join(f"SELECT * FROM frames{n}" for n in range(len(tables)))
        con.execute(f"COPY ({select}) TO {duck.sql_string(str(out))} (FORMAT parquet)")
    finally:
        for number in range(len(tables)):
            con.unregister(f"frames{number}")
    if not len(ts):
        return 0, 0.0, 0.0
    return len(ts), float(ts.min()), float(ts.max())


def _read_frame(data: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """The frame at `pos` as {"columns": {name: array}, "features": [...]}, and where the
    next one starts."""
    import numpy as np
    import orjson

    def bad(why: str) -> _Unreadable:
        return _Unreadable(f"frame at byte {pos}: {why}")

    if pos + FRAME_PREFIX.size > len(data):
        raise bad("cut short")
    magic, head_size, body_size = FRAME_PREFIX.unpack_from(data, pos)
    start = pos + FRAME_PREFIX.size
    if magic != FRAME_MAGIC:
        raise bad("not a prediction log frame")
    if start + head_size + body_size > len(data):
        raise bad("cut short")
    try:
        header = orjson.loads(data[start : start + head_size])
        at = start + head_size
        columns: dict[str, Any] = {}
        for column, dtype, shape, size in header["columns"]:
            raw = data[at : at + size]
            at += size
            if dtype == "json":
                columns[column] = _json_column(orjson.loads(raw))
            else:
                columns[column] = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
        if at != start + head_size + body_size:
            raise ValueError("columns do not fill the frame")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise bad(str(exc)) from None
    return {"columns": columns, "features": header.get("features")}, at


def _check_columns(columns: dict[str, Any], names: tuple[str, ...], end: int) -> None:
    """A decoded frame has these columns, one-dimensional and of one length."""
    missing = [n for n in names if n not in columns]
    shapes = {getattr(values, "shape", None) for values in columns.values()}
    if missing:
        why = f"no {', '.join(missing)} column"
    elif len(shapes) != 1 or len(shapes.pop() or ()) != 1:
        why = "columns of different shapes"
    else:
        return
    raise _Unreadable(f"frame ending at byte {end}: {why}")


def _json_column(values: Any) -> Any:
    """A JSON list (the frames' text columns) as a column of objects."""
    import numpy as np

    if not isinstance(values, list):
        raise ValueError("a column is not a list")
    return np.array(values, dtype=object)


def _input_rows(frame: dict[str, Any], end: int) -> dict[str, Any]:
    """An inputs frame (the one ending at byte `end`) as one row per predicted row, in the
    columns the JSON lines give."""
    import numpy as np

    columns, features = frame["columns"], frame["features"]
    try:
        counts, x, y = columns["count"], columns["x"], columns["y"]
        if not isinstance(features, list) or x.ndim != 2 or x.shape[1] != len(features):
            raise ValueError("its features do not match its inputs")
        if counts.dtype.kind not in "iu" or y.ndim != 1:
            raise ValueError("its counts or predictions are not what a frame holds")
        if len(x) != len(y) or len(x) != int(counts.sum()) or (counts < 0).any():
            raise ValueError("its row counts do not match")
        per_request = {key: columns[key] for key in ("ts", "request_id", "version", "revision")}
        if any(v.shape != counts.shape for v in per_request.values()):
            raise ValueError("its columns are of different lengths")
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        rows = {key: np.repeat(values, counts) for key, values in per_request.items()}
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as exc:
        raise _Unreadable(f"frame ending at byte {end}: {exc}") from None
    rows["row"] = np.arange(len(x), dtype=np.int64) - starts
    for j, feature in enumerate(features):
        rows[f"x_{feature}"] = np.ascontiguousarray(x[:, j])
    rows["prediction"] = y
    return rows


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


def shipped_mark(app: Appliance) -> int:
    """Where the record of shipped log files ends now (its rows are never removed, so ids
    only grow): `log_files(after=...)` then lists what was shipped since."""
    return int(app.db.scalar("SELECT coalesce(max(id), 0) FROM prediction_logs"))


def log_files(
    app: Appliance,
    deployment: str,
    kind: str,
    since: float | None = None,
    until: float | None = None,
    after: int = 0,
) -> list[str]:
    """The local paths of a deployment's shipped log files that overlap [since, until];
    `after`: only those recorded after that `shipped_mark` (a second look reads what was
    shipped since the first, not the whole history again)."""
    rows = app.db.rows(
        "SELECT sha256 FROM prediction_logs WHERE deployment = ? AND kind = ? "
        "AND last_ts >= ? AND first_ts <= ? AND id > ? ORDER BY first_ts",
        (deployment, kind, since or 0.0, until or 1e18, after),
    )
    return [str(app.objects.get_file(r["sha256"])) for r in rows]
