"""Model registry: registered models, immutable numbered versions, movable aliases with history."""

from __future__ import annotations

import json
from typing import Any

from appliance.core.context import Appliance
from appliance.core.lineage import record_execution
from appliance.core.names import validate_name
from appliance.core.runs import get_run
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.store.db import utcnow

_VERSION_SELECT = (
    "SELECT mv.id, m.name AS model, mv.version, mv.flavor, mv.run_id, mv.signature_json, "
    "mv.metrics_json, mv.created_at, a.sha256, a.uri, a.size, "
    "(SELECT d.name || '@' || dv.version FROM dataset_versions dv "
    " JOIN datasets d ON d.id = dv.dataset_id WHERE dv.id = mv.dataset_version_id) AS dataset "
    "FROM model_versions mv JOIN registered_models m ON m.id = mv.model_id "
    "JOIN artifacts a ON a.id = mv.artifact_id "
)


def _version_row(app: Appliance, row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["signature"] = json.loads(row.pop("signature_json"))
    row["metrics"] = json.loads(row.pop("metrics_json"))
    row["aliases"] = [
        r["alias"]
        for r in app.db.rows(
            "SELECT alias FROM model_aliases WHERE version_id = ? ORDER BY alias", (row["id"],)
        )
    ]
    row["ref"] = f"{row['model']}@{row['version']}"
    return row


def is_valid_signature(signature: Any) -> bool:
    """A model's input signature: a non-empty list of {name, type: double} or
    {name, type: category, categories: [...]} entries."""
    return (
        isinstance(signature, list)
        and bool(signature)
        and all(
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and (
                f.get("type") == "double"
                or (f.get("type") == "category" and isinstance(f.get("categories"), list))
            )
            for f in signature
        )
    )


def _validated_meta(run_id: str, meta: Any) -> dict[str, Any]:
    """A servable model needs a known flavor and an input signature; say what is missing."""
    where = f"run {run_id} model artifact meta"
    if not isinstance(meta, dict):
        raise InvalidInput(f"{where}: must be an object")
    if meta.get("flavor") not in ("lightgbm", "mlp"):
        raise InvalidInput(f"{where}.flavor: only 'lightgbm' and 'mlp' models can be registered")
    if not is_valid_signature(meta.get("signature")):
        raise InvalidInput(
            f"{where}.signature: a non-empty list of {{name, type: double|category}} is required"
        )
    dataset = meta.get("dataset")
    if dataset is not None:
        name, _, version = str(dataset).partition("@")
        if not version.isdigit():
            raise InvalidInput(f"{where}.dataset: expected NAME@VERSION, got {dataset!r}")
    if not isinstance(meta.get("metrics", {}), dict):
        raise InvalidInput(f"{where}.metrics: must be an object")
    return meta


def register_model(app: Appliance, name: str, run_id: str) -> dict[str, Any]:
    """Register the model a finished run produced as the next version of `name`."""
    validate_name("model name", name)
    run = get_run(app, run_id)
    if run["status"] != "finished":
        raise Conflict(f"run {run['id']} is {run['status']}; only finished runs can be registered")
    output = next((o for o in run["outputs"] if o["name"] == "model"), None)
    if output is None:
        raise Conflict(f"run {run['id']} produced no 'model' artifact")
    meta = _validated_meta(run["id"], output["meta"])
    dataset_ref = meta.get("dataset")
    now = utcnow()
    with app.db.transaction() as conn:
        conn.execute(
            "INSERT INTO registered_models (name, created_at) VALUES (?, ?) "
            "ON CONFLICT (name) DO NOTHING",
            (name, now),
        )
        model_id = conn.execute(
            "SELECT id FROM registered_models WHERE name = ?", (name,)
        ).fetchone()[0]
        version = conn.execute(
            "SELECT coalesce(max(version), 0) + 1 FROM model_versions WHERE model_id = ?",
            (model_id,),
        ).fetchone()[0]
        artifact_id = conn.execute(
            "SELECT id FROM artifacts WHERE sha256 = ?", (output["sha256"],)
        ).fetchone()[0]
        dataset_version_id = None
        if dataset_ref:
            ds_name, _, ds_version = dataset_ref.partition("@")
            found = conn.execute(
                "SELECT dv.id FROM dataset_versions dv JOIN datasets d ON d.id = dv.dataset_id "
                "WHERE d.name = ? AND dv.version = ?",
                (ds_name, int(ds_version)),
            ).fetchone()
            dataset_version_id = found[0] if found else None
        conn.execute(
            "INSERT INTO model_versions (model_id, version, artifact_id, run_id, "
            "dataset_version_id, flavor, signature_json, metrics_json, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                model_id,
                version,
                artifact_id,
                run["id"],
                dataset_version_id,
                meta.get("flavor", "lightgbm"),
                json.dumps(
                    {k: meta.get(k) for k in ("signature", "objective", "labels", "target")}
                ),
                json.dumps(meta.get("metrics", run["metrics"])),
                now,
            ),
        )
        record_execution(
            conn,
            "Register",
            f"register:{name}@{version}",
            inputs=[("ModelFile", f"blob:{output['sha256']}")],
            outputs=[("ModelVersion", f"model:{name}@{version}")],
            context=("RegisteredModel", name),
        )
    return get_model_version(app, f"{name}@{version}")


def get_model_version(app: Appliance, ref: str) -> dict[str, Any]:
    """'name@3', 'name@alias', or 'name' (the latest version)."""
    name, _, selector = ref.partition("@")
    validate_name("model", name)
    if not selector:
        row = app.db.one(
            _VERSION_SELECT + "WHERE m.name = ? ORDER BY mv.version DESC LIMIT 1", (name,)
        )
    elif selector.isdigit():
        row = app.db.one(
            _VERSION_SELECT + "WHERE m.name = ? AND mv.version = ?", (name, int(selector))
        )
    else:
        validate_name("alias", selector)
        row = app.db.one(
            _VERSION_SELECT + "JOIN model_aliases al ON al.version_id = mv.id "
            "WHERE m.name = ? AND al.alias = ?",
            (name, selector),
        )
    if row is None:
        raise NotFound(f"model {ref!r} not found")
    return _version_row(app, row)


def list_models(app: Appliance) -> list[dict[str, Any]]:
    return app.db.rows(
        "SELECT m.name, max(mv.version) AS latest, count(mv.id) AS versions, m.created_at, "
        "(SELECT group_concat(al.alias || '->' || v.version, ', ') FROM model_aliases al "
        " JOIN model_versions v ON v.id = al.version_id WHERE al.model_id = m.id) AS aliases "
        "FROM registered_models m LEFT JOIN model_versions mv ON mv.model_id = m.id "
        "GROUP BY m.id ORDER BY m.name"
    )


def list_model_versions(app: Appliance, name: str) -> list[dict[str, Any]]:
    validate_name("model", name)
    rows = app.db.rows(_VERSION_SELECT + "WHERE m.name = ? ORDER BY mv.version", (name,))
    if not rows:
        raise NotFound(f"model {name!r} not found")
    return [_version_row(app, r) for r in rows]


def set_alias(app: Appliance, name: str, alias: str, version: int) -> dict[str, Any]:
    """Point `alias` at a version; the move is kept in the alias history."""
    validate_name("alias", alias)
    if alias.isdigit():
        raise InvalidInput(f"alias {alias!r}: must not be a number (it would shadow a version)")
    target = get_model_version(app, f"{name}@{version}")
    now = utcnow()
    with app.db.transaction() as conn:
        model_id = conn.execute(
            "SELECT model_id FROM model_versions WHERE id = ?", (target["id"],)
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO model_aliases (model_id, alias, version_id, updated_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (model_id, alias) DO UPDATE SET "
            "version_id = excluded.version_id, updated_at = excluded.updated_at",
            (model_id, alias, target["id"], now),
        )
        conn.execute(
            "INSERT INTO alias_history (model_id, alias, version_id, changed_at) "
            "VALUES (?, ?, ?, ?)",
            (model_id, alias, target["id"], now),
        )
    return get_model_version(app, f"{name}@{version}")


def alias_history(app: Appliance, name: str) -> list[dict[str, Any]]:
    validate_name("model", name)
    return app.db.rows(
        "SELECT h.alias, v.version, h.changed_at FROM alias_history h "
        "JOIN registered_models m ON m.id = h.model_id "
        "LEFT JOIN model_versions v ON v.id = h.version_id WHERE m.name = ? ORDER BY h.id",
        (name,),
    )
