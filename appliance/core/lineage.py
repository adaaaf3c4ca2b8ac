"""Lineage in the shape of ML Metadata: artifacts and executions joined by INPUT/OUTPUT events.

Refs name every node: `dataset:churn@1`, `run:3f2a…`, `blob:<sha256>`, `model:churn@2`,
`deployment:churn#3`, `file:/path/x.csv`; executions are `import:…`, `run:…`, `register:…`,
`deploy:…`. `lineage(ref)` walks the graph both ways, like MLMD's GetLineageSubgraph.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from appliance.core.context import Appliance
from appliance.errors import InvalidInput, NotFound
from appliance.store.db import utcnow

Node = tuple[str, str]  # (type, ref)


def _artifact_id(conn: sqlite3.Connection, node: Node, uri: str | None = None) -> int:
    kind, ref = node
    conn.execute(
        "INSERT INTO lineage_artifacts (type, ref, uri, created_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (ref) DO NOTHING",
        (kind, ref, uri, utcnow()),
    )
    return int(conn.execute("SELECT id FROM lineage_artifacts WHERE ref = ?", (ref,)).fetchone()[0])


def _context_id(conn: sqlite3.Connection, kind: str, name: str) -> int:
    conn.execute(
        "INSERT INTO lineage_contexts (type, name, created_at) VALUES (?, ?, ?) "
        "ON CONFLICT (type, name) DO NOTHING",
        (kind, name, utcnow()),
    )
    row = conn.execute(
        "SELECT id FROM lineage_contexts WHERE type = ? AND name = ?", (kind, name)
    ).fetchone()
    return int(row[0])


def record_execution(
    conn: sqlite3.Connection,
    kind: str,
    ref: str,
    inputs: Iterable[Node] = (),
    outputs: Iterable[Node] = (),
    state: str = "COMPLETE",
    context: tuple[str, str] | None = None,
) -> int:
    """Record (or extend) an execution and its INPUT/OUTPUT events in the caller's transaction."""
    now = utcnow()
    conn.execute(
        "INSERT INTO lineage_executions (type, ref, state, created_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (ref) DO UPDATE SET state = excluded.state",
        (kind, ref, state, now),
    )
    execution_id = int(
        conn.execute("SELECT id FROM lineage_executions WHERE ref = ?", (ref,)).fetchone()[0]
    )
    for event_type, nodes in (("INPUT", inputs), ("OUTPUT", outputs)):
        for node in nodes:
            artifact_id = _artifact_id(conn, node)
            conn.execute(
                "INSERT INTO lineage_events (artifact_id, execution_id, type, created_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (artifact_id, execution_id, event_type, now),
            )
            if context is not None:
                conn.execute(
                    "INSERT INTO lineage_attributions VALUES (?, ?) ON CONFLICT DO NOTHING",
                    (_context_id(conn, *context), artifact_id),
                )
    if context is not None:
        conn.execute(
            "INSERT INTO lineage_associations VALUES (?, ?) ON CONFLICT DO NOTHING",
            (_context_id(conn, *context), execution_id),
        )
    return execution_id


def associate(
    conn: sqlite3.Connection,
    context: tuple[str, str],
    artifacts: Iterable[str] = (),
    executions: Iterable[str] = (),
) -> None:
    """Put existing nodes (by ref) in a context, e.g. everything a pipeline run made."""
    context_id = _context_id(conn, *context)
    for ref in artifacts:
        row = conn.execute("SELECT id FROM lineage_artifacts WHERE ref = ?", (ref,)).fetchone()
        if row is not None:
            conn.execute(
                "INSERT INTO lineage_attributions VALUES (?, ?) ON CONFLICT DO NOTHING",
                (context_id, row[0]),
            )
    for ref in executions:
        row = conn.execute("SELECT id FROM lineage_executions WHERE ref = ?", (ref,)).fetchone()
        if row is not None:
            conn.execute(
                "INSERT INTO lineage_associations VALUES (?, ?) ON CONFLICT DO NOTHING",
                (context_id, row[0]),
            )


def set_execution_state(conn: sqlite3.Connection, ref: str, state: str) -> None:
    conn.execute("UPDATE lineage_executions SET state = ? WHERE ref = ?", (state, ref))


def resolve_ref(app: Appliance, ref: str) -> str:
    """Turn a user's REF into the canonical lineage ref (latest version when none is given)."""
    kind, sep, rest = ref.partition(":")
    if not sep or not rest:
        raise InvalidInput(
            f"REF {ref!r}: expected dataset:NAME[@V], run:ID, model:NAME[@V] or deployment:NAME[#R]"
        )
    if kind == "dataset":
        from appliance.core.datasets import get_dataset_version

        version = get_dataset_version(app, rest)
        return f"dataset:{version['name']}@{version['version']}"
    if kind == "model":
        from appliance.core.registry import get_model_version

        mv = get_model_version(app, rest)
        return f"model:{mv['model']}@{mv['version']}"
    if kind == "deployment":
        from appliance.core.deployments import get_deployment
        from appliance.core.names import split_ref

        name, revision = split_ref("deployment", rest, sep="#")
        dep = get_deployment(app, name)
        return f"deployment:{name}#{revision or dep['current_revision']}"
    if kind == "run":
        from appliance.core.runs import get_run

        return f"run:{get_run(app, rest)['id']}"
    raise InvalidInput(f"REF {ref!r}: unknown kind {kind!r} (dataset, run, model, deployment)")


def _node(app: Appliance, ref: str) -> dict[str, Any] | None:
    row = app.db.one("SELECT id, type FROM lineage_artifacts WHERE ref = ?", (ref,))
    if row:
        return {"node": ("a", row["id"]), "ref": ref, "type": row["type"]}
    row = app.db.one("SELECT id, type FROM lineage_executions WHERE ref = ?", (ref,))
    if row:
        return {"node": ("e", row["id"]), "ref": ref, "type": row["type"]}
    return None


def _walk(app: Appliance, start: tuple[str, int], direction: str) -> list[dict[str, Any]]:
    # Upstream: artifact <-OUTPUT- execution <-INPUT- artifact. Downstream is the mirror.
    seen = {start}
    frontier = [start]
    found: list[dict[str, Any]] = []
    depth = 0
    while frontier:
        depth += 1
        nxt: list[tuple[str, int]] = []
        for kind, node_id in frontier:
            if kind == "a":
                event = "OUTPUT" if direction == "up" else "INPUT"
                rows = app.db.rows(
                    "SELECT x.id, x.type, x.ref FROM lineage_events ev "
                    "JOIN lineage_executions x ON x.id = ev.execution_id "
                    "WHERE ev.artifact_id = ? AND ev.type = ? ORDER BY x.id",
                    (node_id, event),
                )
                nodes = [("e", r) for r in rows]
            else:
                event = "INPUT" if direction == "up" else "OUTPUT"
                rows = app.db.rows(
                    "SELECT a.id, a.type, a.ref FROM lineage_events ev "
                    "JOIN lineage_artifacts a ON a.id = ev.artifact_id "
                    "WHERE ev.execution_id = ? AND ev.type = ? ORDER BY a.id",
                    (node_id, event),
                )
                nodes = [("a", r) for r in rows]
            parent = _ref_of(app, kind, node_id)
            for nkind, row in nodes:
                key = (nkind, row["id"])
                if key in seen:
                    continue
                seen.add(key)
                nxt.append(key)
                found.append(
                    {
                        "ref": row["ref"],
                        "type": row["type"],
                        "node": "artifact" if nkind == "a" else "execution",
                        "depth": depth,
                        "via": parent,
                    }
                )
        frontier = nxt
    return found


def _ref_of(app: Appliance, kind: str, node_id: int) -> str:
    table = "lineage_artifacts" if kind == "a" else "lineage_executions"
    return str(app.db.scalar(f"SELECT ref FROM {table} WHERE id = ?", (node_id,)))


def lineage(app: Appliance, ref: str) -> dict[str, Any]:
    """What `ref` came from (upstream) and what depends on it (downstream)."""
    canonical = resolve_ref(app, ref)
    node = _node(app, canonical)
    if node is None:
        raise NotFound(f"{canonical}: no lineage recorded")
    contexts = app.db.rows(
        "SELECT c.type, c.name FROM lineage_contexts c "
        "JOIN lineage_attributions at ON at.context_id = c.id "
        "WHERE at.artifact_id = ? AND ? = 'a' "
        "UNION SELECT c.type, c.name FROM lineage_contexts c "
        "JOIN lineage_associations s ON s.context_id = c.id "
        "WHERE s.execution_id = ? AND ? = 'e'",
        (node["node"][1], node["node"][0], node["node"][1], node["node"][0]),
    )
    for context in contexts:
        if context["type"] == "PipelineRun":  # which run, and with which parameters
            run = app.db.one(
                "SELECT pipeline, params_json FROM pipeline_runs WHERE id = ?", (context["name"],)
            )
            if run is not None:
                context["pipeline"] = run["pipeline"]
                context["params"] = json.loads(run["params_json"])
    return {
        "ref": canonical,
        "type": node["type"],
        "contexts": contexts,
        "upstream": _walk(app, node["node"], "up"),
        "downstream": _walk(app, node["node"], "down"),
    }
