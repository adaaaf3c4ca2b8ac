"""The metadata database: one SQLite file in WAL mode, shared by the CLI, TUI and job supervisors.

Writes go through `transaction()` (BEGIN IMMEDIATE) so that concurrent writers queue on the
busy timeout instead of failing with `database is locked` on a lock upgrade.
"""

from __future__ import annotations

import fcntl
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_MS = 30_000


def utcnow() -> str:
    """ISO-8601 UTC timestamp with milliseconds; sorts as text."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def parse_utc(text: str) -> float:
    """A `utcnow()` timestamp (milliseconds optional) back to seconds since the epoch."""
    import calendar

    whole = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    fraction = text[19:].rstrip("Z")
    return whole + (float("0" + fraction) if fraction.startswith(".") else 0.0)


class Database:
    """A connection to the metadata file with read helpers and short write transactions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self.conn = sqlite3.connect(
            str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.conn.execute(sql, params).fetchall()]

    def one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
        with self._lock:
            row = self.conn.execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def scalar(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        with self._lock:
            row = self.conn.execute(sql, params).fetchone()
        return row[0] if row is not None else None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: all or nothing, taken with the write lock up front."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        """One write statement in its own transaction; returns lastrowid."""
        with self.transaction() as conn:
            cur = conn.execute(sql, params)
            return int(cur.lastrowid or 0)


def open_database(path: Path) -> Database:
    """Open (creating and migrating if needed) the metadata database at `path`."""
    from appliance.store.migrations import migrate

    path.parent.mkdir(parents=True, exist_ok=True)
    # One process migrates at a time; the others wait here, then find nothing pending.
    with open(path.with_suffix(".lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            db = Database(path)
            db.conn.execute("PRAGMA journal_mode = WAL")
            migrate(db.conn)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return db


def check_health(db: Database) -> str:
    """'ok' or SQLite's integrity complaint."""
    return str(db.scalar("PRAGMA quick_check"))
