"""Model registry: registered models, immutable numbered versions, movable aliases with history.

A reference is `name/3` or `name@3` (a version), `name@champion` (an alias) or `name` (the
latest version). Every alias move is kept: from which version to which, when, who and why.
"""

from __future__ import annotations

import getpass
import json
from typing import Any

from appliance.core.context import Appliance
from appliance.core.features import training_set_service
from appliance.core.lineage import record_execution
from appliance.core.names import validate_name
from appliance.core.runs import get_run
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.store.db import utcnow

_VERSION_SELECT = (
    "SELECT mv.id, m.name AS model, mv.version, mv.flavor, mv.run_id, mv.signature_json, "
    "mv.metrics_json, mv.created_at, mv.archived_at, mv.archive_reason, mv.feature_service, "
    "a.sha256, a.uri, a.size, "
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
    row["tags"] = {
        r["key"]: r["value"]
        for r in app.db.rows(
            "SELECT key, value FROM model_version_tags WHERE version_id = ? ORDER BY key",
            (row["id"],),
        )
    }
    row["name"] = row["model"]
    row["ref"] = f"{row['model']}@{row['version']}"
    return row


def parse_ref(ref: str) -> tuple[str, str]:
    """'name/3' or 'name@3' -> (name, '3'); 'name@alias' -> (name, 'alias'); 'name' -> (name, '')
    (the latest version)."""
    if "/" in ref:
        name, _, selector = ref.partition("/")
        if not selector.isdigit():
            raise InvalidInput(f"model reference {ref!r}: expected NAME/VERSION (a number)")
    else:
        name, _, selector = ref.partition("@")
    validate_name("model", name)
    if selector and not selector.isdigit():
        validate_name("alias", selector)
    return name, selector


def current_actor() -> str:
    """Who is acting, for history rows: the login name."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


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
    # a model trained on a training set is served with the same feature service
    feature_service = training_set_service(app, dataset_ref) if dataset_ref else None
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
            "dataset_version_id, feature_service, flavor, signature_json, metrics_json, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                model_id,
                version,
                artifact_id,
                run["id"],
                dataset_version_id,
                feature_service,
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
    registered = get_model_version(app, f"{name}@{version}")
    app.db.execute(  # written once: the version, and so its card, never changes
        "UPDATE model_versions SET card_md = ? WHERE id = ?",
        (render_card(app, registered), registered["id"]),
    )
    return registered


def get_model_version(app: Appliance, ref: str) -> dict[str, Any]:
    """'name/3' (or 'name@3'), 'name@alias', or 'name' (the latest version)."""
    name, selector = parse_ref(ref)
    if not selector:
        row = app.db.one(
            _VERSION_SELECT + "WHERE m.name = ? ORDER BY mv.version DESC LIMIT 1", (name,)
        )
    elif selector.isdigit():
        row = app.db.one(
            _VERSION_SELECT + "WHERE m.name = ? AND mv.version = ?", (name, int(selector))
        )
    else:
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


def set_alias(
    app: Appliance,
    name: str,
    alias: str,
    version: int | str,
    reason: str | None = None,
    actor: str | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Point `alias` at a version; the move (from, to, who, why) is kept in the history."""
    validate_name("alias", alias)
    if alias.isdigit():
        raise InvalidInput(f"alias {alias!r}: must not be a number (it would shadow a version)")
    target = get_model_version(app, f"{name}/{version}" if str(version).isdigit() else version)
    if target["model"] != name:
        raise InvalidInput(f"alias {alias!r}: {target['ref']} is not a version of {name!r}")
    if target["archived_at"]:
        raise Conflict(f"{target['ref']} is archived; an alias cannot point at it")
    from appliance.core.deployments import follow_alias_moved, wait_served

    now = utcnow()
    with app.db.transaction() as conn:
        model_id = conn.execute(
            "SELECT model_id FROM model_versions WHERE id = ?", (target["id"],)
        ).fetchone()[0]
        before = conn.execute(
            "SELECT version_id FROM model_aliases WHERE model_id = ? AND alias = ?",
            (model_id, alias),
        ).fetchone()
        conn.execute(
            "INSERT INTO model_aliases (model_id, alias, version_id, updated_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (model_id, alias) DO UPDATE SET "
            "version_id = excluded.version_id, updated_at = excluded.updated_at",
            (model_id, alias, target["id"], now),
        )
        conn.execute(
            "INSERT INTO alias_history (model_id, alias, from_version_id, version_id, "
            "changed_at, actor, reason, report_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                model_id,
                alias,
                before[0] if before else None,
                target["id"],
                now,
                actor or current_actor(),
                reason,
                json.dumps(report) if report is not None else None,
            ),
        )
        if conn.execute(
            "SELECT archived_at FROM model_versions WHERE id = ?", (target["id"],)
        ).fetchone()[0]:
            raise Conflict(f"{target['ref']} is archived; an alias cannot point at it")
        followed = []
        if before is None or before[0] != target["id"]:  # a real move: followers follow
            followed = follow_alias_moved(app, conn, name, alias, target)
    for deployment in followed:
        wait_served(app, deployment)
    return {**get_model_version(app, target["ref"]), "deployments_followed": followed}


def remove_alias(
    app: Appliance, name: str, alias: str, reason: str | None = None
) -> dict[str, Any]:
    """Take an alias away (kept in the history as a move to no version)."""
    current = get_model_version(app, f"{name}@{alias}")
    with app.db.transaction() as conn:
        model_id = conn.execute(
            "SELECT model_id FROM model_versions WHERE id = ?", (current["id"],)
        ).fetchone()[0]
        conn.execute(
            "DELETE FROM model_aliases WHERE model_id = ? AND alias = ?", (model_id, alias)
        )
        conn.execute(
            "INSERT INTO alias_history (model_id, alias, from_version_id, version_id, "
            "changed_at, actor, reason) VALUES (?, ?, ?, NULL, ?, ?, ?)",
            (model_id, alias, current["id"], utcnow(), current_actor(), reason),
        )
    return {"model": name, "alias": alias, "removed_from": current["version"]}


def alias_history(app: Appliance, name: str, alias: str | None = None) -> list[dict[str, Any]]:
    """Every move of the model's aliases (or of one), oldest first."""
    validate_name("model", name)
    if app.db.one("SELECT 1 FROM registered_models WHERE name = ?", (name,)) is None:
        raise NotFound(f"model {name!r} not found")
    rows = app.db.rows(
        "SELECT h.alias, f.version AS from_version, v.version AS to_version, h.changed_at, "
        "h.actor, h.reason, h.report_json FROM alias_history h "
        "JOIN registered_models m ON m.id = h.model_id "
        "LEFT JOIN model_versions v ON v.id = h.version_id "
        "LEFT JOIN model_versions f ON f.id = h.from_version_id "
        "WHERE m.name = ? AND (? IS NULL OR h.alias = ?) ORDER BY h.id",
        (name, alias, alias),
    )
    for row in rows:
        report = row.pop("report_json")
        row["report"] = json.loads(report) if report else None
    return rows


def archive_version(app: Appliance, ref: str, reason: str | None = None) -> dict[str, Any]:
    """Retire a version: it stays (runs and lineage point at it) but cannot be aliased or
    deployed. Refused while an alias or a deployment uses it."""
    version = get_model_version(app, ref)
    if version["archived_at"]:
        raise Conflict(f"{version['ref']} is already archived")
    if version["aliases"]:
        raise Conflict(f"{version['ref']} is {', '.join(version['aliases'])}; move the alias first")
    with app.db.transaction() as conn:  # a deploy or alias move cannot slip in between
        serving = conn.execute(
            "SELECT DISTINCT d.name FROM deployments d JOIN deployment_revisions r "
            "ON r.deployment_id = d.id AND r.revision IN (d.current_revision, d.canary_revision) "
            "WHERE r.model_version_id = ?",
            (version["id"],),
        ).fetchall()
        if serving:
            names = ", ".join(r[0] for r in serving)
            raise Conflict(f"{version['ref']} is served by deployment(s) {names}; deploy another")
        if conn.execute(
            "SELECT 1 FROM model_aliases WHERE version_id = ?", (version["id"],)
        ).fetchone():
            raise Conflict(f"{version['ref']} has an alias; move the alias first")
        conn.execute(
            "UPDATE model_versions SET archived_at = ?, archive_reason = ? WHERE id = ?",
            (utcnow(), reason, version["id"]),
        )
    return get_model_version(app, version["ref"])


def set_version_tags(
    app: Appliance, ref: str, tags: dict[str, str], remove: list[str] | None = None
) -> dict[str, Any]:
    """Free tags on a version (the version itself stays immutable)."""
    version = get_model_version(app, ref)
    with app.db.transaction() as conn:
        for key, value in tags.items():
            if not key or len(key) > 200:
                raise InvalidInput(f"tag {key!r}: a key of 1 to 200 characters is required")
            conn.execute(
                "INSERT INTO model_version_tags (version_id, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (version_id, key) DO UPDATE SET value = excluded.value",
                (version["id"], key, str(value)),
            )
        for key in remove or []:
            conn.execute(
                "DELETE FROM model_version_tags WHERE version_id = ? AND key = ?",
                (version["id"], key),
            )
    return get_model_version(app, version["ref"])


def model_card(app: Appliance, ref: str) -> str:
    """The version's model card (markdown), written when it was registered."""
    version = get_model_version(app, ref)
    stored = app.db.scalar("SELECT card_md FROM model_versions WHERE id = ?", (version["id"],))
    return str(stored) if stored else render_card(app, version)


def render_card(app: Appliance, version: dict[str, Any]) -> str:
    """Markdown: what the model is, what it was trained on, how well it did, what it takes."""
    signature = version["signature"]
    features = signature.get("signature") or []
    run = get_run(app, version["run_id"]) if version.get("run_id") else None
    lines = [
        f"# {version['model']} version {version['version']}",
        "",
        f"- flavor: {version['flavor']}",
        f"- objective: {signature.get('objective') or 'unknown'}",
        f"- label: {signature.get('target') or 'unknown'}",
        f"- artifact: sha256 {version['sha256']} ({version['size']} bytes)",
        f"- registered: {version['created_at']}",
    ]
    if run is not None:
        lines += [f"- run: {run['id']} ({run['name']}, experiment {run['experiment']})"]
        commit = run["tags"].get("git.commit")
        if commit:
            lines.append(f"- code: git {commit}")
    if version.get("dataset"):
        lines.append(f"- training data: dataset {version['dataset']}")
    if version.get("feature_service"):
        lines.append(f"- feature service: {version['feature_service']}")
    if signature.get("labels"):
        lines.append(f"- classes: {', '.join(str(c) for c in signature['labels'])}")
    lines += ["", "## Metrics", ""]
    metrics = version["metrics"] or {}
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items()) if _is_number(v)]
    else:
        lines.append("(none recorded)")
    lines += ["", "## Inputs", "", "| column | type | levels |", "|---|---|---|"]
    for feature in features:
        levels = feature.get("categories")
        shown = "" if levels is None else ", ".join(map(str, levels[:10]))
        if levels is not None and len(levels) > 10:
            shown += f", … ({len(levels)} in all)"
        lines.append(f"| {feature['name']} | {feature['type']} | {shown} |")
    if run is not None:
        env = {k: v for k, v in run["tags"].items() if k.startswith("env.")}
        if env:
            lines += ["", "## Environment", ""]
            lines += [f"- {k[4:]}: {v}" for k, v in sorted(env.items())]
    return "\n".join(lines) + "\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
