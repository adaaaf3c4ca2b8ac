"""The online store: the latest feature values per entity key, in SQLite (WAL).

A write replaces a stored value only when it is newer (event time, then created time; at
equal times, when the values differ: a row ingested later), so materializing an older window
after a newer one never regresses a key, and a rerun changes nothing. Keys are stored as JSON
arrays, so multi-column keys compare as tuples.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

SCHEMA = """
CREATE TABLE IF NOT EXISTS online_values (
    view TEXT NOT NULL,
    entity_key TEXT NOT NULL,
    event_ts REAL NOT NULL,
    created_ts REAL,
    features TEXT NOT NULL,
    PRIMARY KEY (view, entity_key)
) WITHOUT ROWID;
"""
UPSERT = """
INSERT INTO online_values (view, entity_key, event_ts, created_ts, features)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (view, entity_key) DO UPDATE SET
    event_ts = excluded.event_ts, created_ts = excluded.created_ts, features = excluded.features
WHERE excluded.event_ts > online_values.event_ts
   OR (excluded.event_ts = online_values.event_ts
       AND (coalesce(excluded.created_ts, 0) > coalesce(online_values.created_ts, 0)
            OR (coalesce(excluded.created_ts, 0) = coalesce(online_values.created_ts, 0)
                AND excluded.features != online_values.features)))
"""


READ_CHUNK = 10_000


def entity_key(values: Sequence[Any]) -> str:
    """The stored form of a key tuple (compact JSON, UTF-8)."""
    return orjson.dumps(list(values)).decode()


class OnlineStore:
    """One SQLite file; one writer transaction per materialization, reads without locks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.conn = sqlite3.connect(
            str(path), timeout=30, isolation_level=None, check_same_thread=False
        )
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def write(self, view: str, rows: Iterable[tuple[str, float, float | None, str]]) -> int:
        """Upsert (entity_key, event_ts, created_ts, features_json) rows in one transaction;
        returns how many changed the store (older or equal ones leave it as it is)."""
        batch = [(view, *row) for row in rows]
        with self._lock:
            before = self.conn.total_changes
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.executemany(UPSERT, batch)
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
            return self.conn.total_changes - before

    def read(self, view: str, keys: Sequence[str]) -> dict[str, tuple[float, dict[str, Any]]]:
        """key -> (event_ts, features) for the keys that are stored (read in chunks: SQLite
        bounds the number of parameters in one statement)."""
        found: dict[str, tuple[float, dict[str, Any]]] = {}
        with self._lock:
            for start in range(0, len(keys), READ_CHUNK):
                chunk = keys[start : start + READ_CHUNK]
                rows = self.conn.execute(
                    f"SELECT entity_key, event_ts, features FROM online_values "
                    f"WHERE view = ? AND entity_key IN ({','.join('?' * len(chunk))})",
                    (view, *chunk),
                ).fetchall()
                found.update((k, (ts, orjson.loads(f))) for k, ts, f in rows)
        return found
