"""Online features: materialize the latest value per entity key into the online store, and read
them back for serving with the ttl enforced at read time (Feast's response shape and statuses).

Materialization is idempotent and never regresses a key (the store compares event times). An
incremental run starts a lookback window before the previous run's end, so rows that arrive
late, with event times before that end, are still picked up (unlike feast#4133).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from appliance.core import duck
from appliance.core.context import Appliance
from appliance.core.features import data_errors, key_class, output_names
from appliance.errors import ApplianceError, InvalidInput
from appliance.store.db import utcnow
from appliance.store.online import OnlineStore, entity_key

DEFAULT_LOOKBACK = 86400.0
_WHOLE = re.compile(r"[+-]?[0-9]{1,20}")  # text that spells a 64-bit whole number (ASCII)


def _json(values: dict[str, Any]) -> str:
    return orjson.dumps(values, default=str).decode()


_stores: dict[str, OnlineStore] = {}


def online_store(app: Appliance) -> OnlineStore:
    """The home's online store (one connection per process: lookups stay sub-millisecond)."""
    path = app.settings.home / "online.db"
    store = _stores.get(str(path))
    if store is None:
        store = _stores[str(path)] = OnlineStore(path)
    return store


def _when(text: str | None, what: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"{what}: {text!r} is not an ISO time (2026-01-31T12:00:00)") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _live_views(app: Appliance) -> list[dict[str, Any]]:
    """The view versions something reads online: the latest of each view, and every version
    pinned by the latest version of a service, by a deployment's feature service or by the
    service a version it serves (or served: a rollback target) was trained with, so a new view
    version does not leave a model without fresh values."""
    from appliance.core.features import get_definition, list_definitions

    refs = {v["ref"] for v in list_definitions(app, "view")}
    services = [s["ref"] for s in list_definitions(app, "service")]
    services += [
        r["service"]
        for r in app.db.rows(
            # a deployment's own service, and the ones its served versions were trained with
            "SELECT d.feature_service AS service FROM deployments d "
            "WHERE d.feature_service IS NOT NULL UNION "
            "SELECT mv.feature_service FROM deployments d "
            "JOIN deployment_revisions r ON r.deployment_id = d.id "
            "JOIN model_versions mv ON mv.id = r.model_version_id "
            "WHERE d.feature_service IS NOT NULL AND mv.feature_service IS NOT NULL"
        )
    ]
    for ref in services:
        for item in get_definition(app, "service", ref)["features"]:
            refs.add(f"{item['view']}@{item['view_version']}")
    return [get_definition(app, "view", ref) for ref in sorted(refs)]


def materialize(
    app: Appliance,
    view: str | None = None,
    start: str | None = None,
    end: str | None = None,
    incremental: bool = False,
    lookback_seconds: float = DEFAULT_LOOKBACK,
) -> list[dict[str, Any]]:
    """Write, per entity key, the latest row with start <= ts <= end (ties: created, then file
    order) of one view version, or of every live one, into the online store; returns what
    each run wrote. Each view is written in one transaction; with every live view, one that
    fails (its source changed since apply) is reported with its error and the others go on."""
    from appliance.core.features import get_definition

    if incremental and start is not None:
        raise InvalidInput(
            "--start with --incremental: an incremental run starts a lookback window before "
            "the previous run's end; give one or the other"
        )
    views = [get_definition(app, "view", view)] if view else _live_views(app)
    if not views:
        raise InvalidInput("no feature views applied yet; run 'appliance features apply DIR'")
    stop = _when(end, "--end") or datetime.now(UTC)
    first = _when(start, "--start")
    results = []
    for spec in views:
        begin = first
        if incremental:
            last = app.db.one(
                "SELECT last_end FROM feature_materializations WHERE view = ? AND version = ?",
                (spec["name"], spec["version"]),
            )
            if last is not None:
                begin = datetime.fromtimestamp(float(last["last_end"]) - lookback_seconds, UTC)
        run: dict[str, Any] = {"view": spec["ref"], "start": begin.isoformat() if begin else None}
        run["end"] = stop.isoformat()
        try:
            run.update(_materialize_view(app, spec, begin, stop), error=None)
        except ApplianceError as exc:
            if view is not None:
                raise
            run.update(rows_read=None, rows_written=None, error=exc.message)
        results.append(run)
    return results


def _materialize_view(
    app: Appliance, spec: dict[str, Any], begin: datetime | None, stop: datetime
) -> dict[str, int]:
    from appliance.core.features import view_relation
    from appliance.core.query import lock_down

    q = duck.sql_identifier
    keys = ", ".join(q(k) for k in spec["join_keys"])
    feats = [f["name"] for f in spec["features"]]
    ts, created = q(spec["timestamp"]), spec["created_timestamp"]
    where = [f"{ts} IS NOT NULL", f"{ts} <= {duck.sql_string(stop.isoformat())}::TIMESTAMPTZ"]
    where += [f"{q(k)} IS NOT NULL" for k in spec["join_keys"]]  # no lookup could reach it
    if begin is not None:
        where.append(f"{ts} >= {duck.sql_string(begin.isoformat())}::TIMESTAMPTZ")
    created_sql = q(created) if created else "NULL::TIMESTAMP"
    # times leave DuckDB as epoch seconds: naive ones are UTC, zoned ones converted
    sql = (
        f"SELECT {keys}, epoch_us({ts}) / 1e6, epoch_us({created_sql}) / 1e6, "
        f"{', '.join(q(f) for f in feats)} FROM __rows WHERE {' AND '.join(where)} "
        f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {ts} DESC, "
        f"{created_sql} DESC NULLS LAST, __order DESC) = 1"
    )
    con = duck.connect(app.settings)
    try:
        con.execute("SET TimeZone = 'UTC'")
        lock_down(con, [view_relation(app, con, spec, "__rows")[1]])
        with data_errors(f"feature view {spec['ref']}"):  # a SQL view can fail on its data
            rows = con.execute(sql).fetchall()
    finally:
        con.close()
    width = len(spec["join_keys"])
    newest = None
    batch = []
    for row in rows:
        event = float(row[width])
        newest = event if newest is None or event > newest else newest
        values = dict(zip(feats, row[width + 2 :], strict=True))
        # orjson writes NaN and infinities as null: they read back as NULL_VALUE
        batch.append((entity_key(row[:width]), event, row[width + 1], _json(values)))
    written = online_store(app).write(f"{spec['name']}@{spec['version']}", batch)
    app.db.execute(
        "INSERT INTO feature_materializations (view, version, last_end, rows_written, "
        "newest_event, ran_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (view, version) DO "
        "UPDATE SET last_end = excluded.last_end, rows_written = excluded.rows_written, "
        "newest_event = max(coalesce(newest_event, excluded.newest_event), "
        "coalesce(excluded.newest_event, newest_event)), "
        "ran_at = excluded.ran_at",
        (spec["name"], spec["version"], stop.timestamp(), written, newest, utcnow()),
    )
    return {"rows_read": len(batch), "rows_written": written}


def _check_key(view: str, key: str, kind: str | None, value: Any, row: int) -> None:
    integer = isinstance(value, int) and not isinstance(value, bool)
    wanted = key_class(kind or "")
    ok = (
        integer and -(2**63) <= value < 2**64
        if wanted == "integer"
        else isinstance(value, str)
        if wanted == "text"
        else integer or isinstance(value, str)
    )
    if not ok:
        shown = repr(value)[:40]
        raise InvalidInput(
            f"entities: {key!r} row {row} is {shown}, but view {view!r} keys it as {kind}"
        )


class FeatureLookup:
    """A feature service resolved once (its views' keys, key types, ttl, output names): what
    the feature server and a deployment with a feature service call per request."""

    def __init__(self, app: Appliance, service: str) -> None:
        from appliance.core.features import get_definition

        svc = get_definition(app, "service", service)
        self.ref: str = svc["ref"]
        self.store = online_store(app)
        by_view: dict[tuple[str, int], list[tuple[str, str]]] = {}
        for item, name in zip(svc["features"], output_names(svc), strict=True):
            by_view.setdefault((item["view"], item["view_version"]), []).append(
                (item["feature"], name)
            )
        self.views: list[dict[str, Any]] = []
        self.join_keys: list[str] = []
        self.feature_names: list[str] = []
        for (view, version), pairs in by_view.items():
            spec = get_definition(app, "view", f"{view}@{version}")
            names = [n for _, n in pairs]
            self.views.append(
                {
                    "name": view,
                    "stored_as": spec["ref"],
                    "keys": spec["join_keys"],
                    "key_types": spec.get("key_types") or {},
                    "ttl": spec["ttl_seconds"],
                    "features": pairs,
                }
            )
            self.join_keys += [k for k in spec["join_keys"] if k not in self.join_keys]
            self.feature_names += names
        self.key_classes = {
            k: key_class(t) or t for view in self.views for k, t in view["key_types"].items()
        }

    def typed(self, entities: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Keys as the views hold them, from wherever they came: text that spells a whole
        number, or a whole float, becomes an int for an integer key (CSV cells, BYTES tensors,
        float tensors); anything else is left for the key check to name."""
        out = {}
        for key, values in entities.items():
            if self.key_classes.get(key) != "integer" or not isinstance(values, list):
                out[key] = values
                continue
            converted = []
            for value in values:
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                elif isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
                    value = int(value.strip())
                converted.append(value)
            out[key] = converted
        return out

    def read(
        self, entities: dict[str, list[Any]], now: float | None = None
    ) -> tuple[int, list[tuple[str, list[Any], list[str], list[str | None]]]]:
        """(rows, [(feature name, values, statuses, event times)]) for `entities`
        ({key column: [values...]}), each list in entity row order."""
        if not isinstance(entities, dict) or not entities:
            raise InvalidInput("entities: expected {key column: [values, ...]}")
        lengths = {len(v) if isinstance(v, list) else -1 for v in entities.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise InvalidInput("entities: every key column needs a list of values, all as long")
        count = lengths.pop()
        unknown = [k for k in entities if k not in self.join_keys]
        if unknown:
            raise InvalidInput(
                f"entities: {', '.join(map(repr, unknown))[:200]} is not a join key of "
                f"{self.ref} (it takes {self.join_keys})"
            )
        now = time.time() if now is None else now
        out = []
        for view in self.views:
            for key in view["keys"]:
                if key not in entities:
                    raise InvalidInput(
                        f"entities: join key {key!r} of view {view['name']!r} is missing"
                    )
            row_keys = []
            for i in range(count):
                values = [entities[k][i] for k in view["keys"]]
                for k, v in zip(view["keys"], values, strict=True):
                    _check_key(view["name"], k, view["key_types"].get(k), v, i)
                row_keys.append(entity_key(values))
            found = self.store.read(view["stored_as"], sorted(set(row_keys)))
            ttl = view["ttl"]
            # per entity row once: the stored row, whether it is in date, its event time
            hits = [found.get(key) for key in row_keys]
            live = [hit is not None and not (ttl and now - hit[0] > ttl) for hit in hits]
            stamps: list[str | None] = [
                None if hit is None else datetime.fromtimestamp(hit[0], UTC).isoformat()
                for hit in hits
            ]
            missing = ["NOT_FOUND" if hit is None else "OUTSIDE_MAX_AGE" for hit in hits]
            for feature, name in view["features"]:
                values_out = [
                    hit[1].get(feature) if ok else None for hit, ok in zip(hits, live, strict=True)
                ]
                statuses = [
                    ("PRESENT" if value is not None else "NULL_VALUE") if ok else gone
                    for value, ok, gone in zip(values_out, live, missing, strict=True)
                ]
                out.append((name, values_out, statuses, stamps))
        return count, out


def entities_from_text(app: Appliance, service: str, texts: dict[str, str]) -> dict[str, list]:
    """One entity typed in (a command line, a form) as lookup keys: text becomes a number
    where the view keys by an integer column, and a key the service does not take is named."""
    lookup = FeatureLookup(app, service)
    for key, text in texts.items():
        if key not in lookup.join_keys:
            raise InvalidInput(f"entity key {key!r}: {lookup.ref} takes {lookup.join_keys}")
        if lookup.key_classes.get(key) == "integer" and not _WHOLE.fullmatch(text.strip()):
            raise InvalidInput(f"entity key {key!r}: {text!r} is not a whole number")
    return lookup.typed({k: [v] for k, v in texts.items()})


_lookups: dict[tuple[str, str], FeatureLookup] = {}


def lookup_for(app: Appliance, service: str) -> FeatureLookup:
    """The FeatureLookup of NAME@V, or of NAME's latest version (one small query): versions
    never change, so each is resolved once per process and kept."""
    name, _, version = service.partition("@")
    if not version:
        latest = app.db.scalar(
            "SELECT max(version) FROM feature_definitions WHERE kind = 'service' AND name = ?",
            (name,),
        )
        if latest is None:
            return FeatureLookup(app, service)  # raises NotFound, naming the service
        service = f"{name}@{latest}"
    key = (str(app.settings.home), service)
    found = _lookups.get(key)
    if found is None:
        found = _lookups[key] = FeatureLookup(app, service)
    return found


def _columns_of(rows: list[Any]) -> dict[str, list[Any]]:
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise InvalidInput("entity_rows: expected a non-empty list of {key: value} objects")
    keys = list(rows[0])
    for i, row in enumerate(rows):
        if list(row) != keys:
            raise InvalidInput(f"entity_rows[{i}]: keys {list(row)}, but row 0 has {keys}")
    return {k: [row[k] for row in rows] for k in keys}


def get_online_features(
    app: Appliance,
    service: str,
    entities: dict[str, list[Any]] | list[dict[str, Any]],
    now: float | None = None,
) -> dict[str, Any]:
    """Feast's online response for `entities` ({key column: [values...]}, or Feast's
    entity_rows, [{key: value}, ...]): one result per feature name (keys first), each with a
    value and a status per entity row, in order. A value older than its view's ttl is missing
    with status OUTSIDE_MAX_AGE."""
    if isinstance(entities, list):
        entities = _columns_of(entities)
    count, found = lookup_for(app, service).read(entities, now)
    names: list[str] = list(entities)
    results: list[dict[str, Any]] = [
        {"values": list(v), "statuses": ["PRESENT"] * count, "event_timestamps": [None] * count}
        for v in entities.values()
    ]
    for name, values, statuses, stamps in found:
        names.append(name)
        results.append({"values": values, "statuses": statuses, "event_timestamps": stamps})
    return {"metadata": {"feature_names": names}, "results": results}
