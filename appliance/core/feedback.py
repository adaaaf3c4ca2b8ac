"""Ground truth for deployments: labels joined to logged predictions by request id, and the
live quality per model version over time windows.

Labels arrive from a file (`monitor feedback DEPLOYMENT FILE`: CSV or JSON lines with
request_id, label and optionally row, or POST /feedback's body) or from `POST /feedback` on
the model server (with the home's feedback token); the server writes them to the spool and
the agent stores them. A label is checked against the model's objective (a class it was
trained on, or a finite number for regression) and refused with the line that holds it; a
request id that was never logged, or a row its request did not predict, is counted and
reported, and the rest is stored.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import os
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.prediction_log import (
    log_files,
    ship_for_reading,
    ship_logs,
    shipped_mark,
    spool_dir,
    wait_for_open_logs,
)
from appliance.core.traffic import ROUTED
from appliance.errors import InvalidInput

TOKEN_FILE = "feedback.token"


def feedback_token(home: Path, create: bool = True) -> str | None:
    """The home's feedback token (written 0600 on first use); None when absent and not
    created. Sent as `Authorization: Bearer TOKEN` to `POST /feedback`."""
    path = home / "secrets" / TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if not create:
            return None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    try:
        os.link(tmp, path)  # the first writer wins; a racing one reads its token
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def _item(raw: Any, where: str) -> tuple[str, int, Any]:
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: expected an object with request_id and label")
    request_id, label, row = raw.get("request_id"), raw.get("label"), raw.get("row", 0)
    if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
        raise InvalidInput(f"{where}: request_id: expected the id a prediction was answered with")
    if isinstance(row, str) and row.strip().isdigit():
        row = int(row)
    if isinstance(row, bool) or not isinstance(row, int) or row < 0:
        raise InvalidInput(f"{where}: row: expected a row number (0 for one-row requests)")
    if label is None or isinstance(label, dict | list) or label == "":
        raise InvalidInput(f"{where}: label: expected a class or a number")
    return request_id, row, label


def spool_feedback(
    home: Path, deployment: str, body: Any, objective: str, labels: list[Any]
) -> dict[str, int]:
    """`POST /feedback` on the server: check the items (each label against the served
    model's classes, or as a number for regression) and write them to the spool as one
    closed file (the agent stores them); returns how many were accepted, and how many of
    them labelled a row the body labelled before (the last label is kept, as in a file)."""
    items = body.get("feedback", [body]) if isinstance(body, dict) else body
    if not isinstance(items, list) or not items:
        raise InvalidInput("expected {request_id, label[, row]} or {feedback: [...]}")
    if len(items) > 100_000:
        raise InvalidInput("at most 100,000 labels per request")
    checked = []
    for i, raw in enumerate(items):
        request_id, row, label = _item(raw, f"feedback[{i}]")
        checked.append((request_id, row, _check_label(label, objective, labels, f"feedback[{i}]")))
    kept = {(request_id, row): label for request_id, row, label in checked}
    directory = spool_dir(home, deployment)
    directory.mkdir(parents=True, exist_ok=True)
    hour = time.strftime("%Y%m%d%H", time.gmtime())
    name = f"feedback-{hour}-{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
    tmp = directory / (name + ".part")
    now = time.time()
    with tmp.open("w") as fh:
        for (request_id, row), label in kept.items():  # label: as stored (checked above)
            fh.write(json.dumps({"request_id": request_id, "row": row, "label": label, "ts": now}))
            fh.write("\n")
    tmp.rename(directory / name)
    return {"accepted": len(checked), "duplicates": len(checked) - len(kept)}


def _objective(app: Appliance, deployment: str) -> tuple[str, list[Any]]:
    """What a label must be for this deployment: from the model version it serves."""
    from appliance.core.deployments import get_deployment
    from appliance.core.registry import get_model_version

    dep = get_deployment(app, deployment)
    version = get_model_version(app, f"{dep['model']}@{dep['model_version']}")
    signature = version["signature"]
    return str(signature.get("objective") or "binary"), list(signature.get("labels") or [])


def _shown(label: Any) -> str:
    """A label as an error quotes it: a 5,000-digit one is not echoed whole."""
    text = repr(label)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _check_label(label: Any, objective: str, labels: list[Any], where: str) -> str:
    """The label as stored (JSON of the class, or of the number), refused when the model
    could not score it; a class sent as text ("1" or "1.0" for 1) is the class. True and
    false are not 1 and 0 (JSON's true is not CSV's "true"), and NaN is no label."""
    regression = objective == "regression"
    if isinstance(label, bool) and (regression or not any(isinstance(k, bool) for k in labels)):
        expected = "a number" if regression else "a class of the model"
        raise InvalidInput(f"{where}: label {label!r}: expected {expected}, not true or false")
    if regression:
        try:
            value = float(label)
        except (TypeError, ValueError, OverflowError):  # 10**400 is no float either
            raise InvalidInput(f"{where}: label {_shown(label)}: expected a number") from None
        if not math.isfinite(value):
            raise InvalidInput(f"{where}: label {_shown(label)}: expected a finite number")
        return repr(value)
    for known in labels:
        if label == known or str(label) == str(known):
            return json.dumps(known)
    if isinstance(label, str):  # "1.0" in a CSV for class 1, as JSON's 1.0 is
        try:
            number = float(label)
        except ValueError:
            number = math.nan  # equal to no class
        for known in labels:
            if isinstance(known, int | float) and number == known:
                return json.dumps(known)
    raise InvalidInput(
        f"{where}: label {_shown(label)}: not a class of the model (classes: "
        f"{', '.join(map(str, labels)) or 'unknown'})"
    )


def _read(path: Path) -> list[tuple[str, Any]]:
    """The file's items, each with where it is (file:line); JSON lines, a JSON body as
    `POST /feedback` takes it, or CSV with a header (Excel's byte-order mark allowed)."""
    if not path.is_file():
        raise InvalidInput(f"{path}: no such feedback file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        at = exc.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)
        line = raw[:at].count(b"\n") + 1
        raise InvalidInput(f"{path.name}:{line}: not UTF-8 text (byte {at})") from None
    if not text.strip():  # before the CSV reader asks an empty file for its header
        raise InvalidInput(f"{path.name}: no labels in it (the file is empty)")
    items = _items(path.name, path.suffix.lower(), text)
    if not items:
        raise InvalidInput(f"{path.name}: no labels in it")
    return items


def _items(name: str, suffix: str, text: str) -> list[tuple[str, Any]]:
    if suffix in (".jsonl", ".json", ".ndjson"):
        whole: Exception | None = None  # why it is not one JSON document
        if suffix == ".json":
            try:
                body = json.loads(text)
            except (ValueError, RecursionError) as exc:  # JSON lines named .json, or not JSON
                body, whole = None, exc
            if isinstance(body, dict):  # as POST /feedback reads it
                body = body.get("feedback", [body])
                if not isinstance(body, list):
                    raise InvalidInput(f"{name}: feedback: expected a list of labels")
            if isinstance(body, list):
                return [(f"{name}: feedback[{i}]", item) for i, item in enumerate(body)]
            if body is not None:
                raise InvalidInput(
                    f"{name}: expected {{request_id, label[, row]}} or {{feedback: [...]}}"
                )
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{name}:{n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    if isinstance(whole, json.JSONDecodeError) and not items:  # one document
                        raise InvalidInput(
                            f"{name}:{whole.lineno}: not JSON: {whole.msg}"
                        ) from None
                    if whole is not None and not items:  # 5,000 digits, deep nesting
                        raise InvalidInput(f"{name}: not JSON we read: {whole}"[:300]) from None
                    raise InvalidInput(f"{name}:{n}: not JSON: {exc.msg}") from None
                except (ValueError, RecursionError) as exc:  # 5,000 digits, deep nesting
                    raise InvalidInput(f"{name}:{n}: not JSON we read: {exc}"[:300]) from None
        return items
    reader = csv.DictReader(text.splitlines())
    missing = {"request_id", "label"} - set(reader.fieldnames or [])
    if missing:
        raise InvalidInput(f"{name}: the header needs {', '.join(sorted(missing))}")
    items = []
    for n, row in enumerate(reader, 2):
        if None in row:  # more values than the header names: a shifted column
            raise InvalidInput(
                f"{name}:{n}: {len(reader.fieldnames or []) + len(row[None])} values, "
                f"the header names {len(reader.fieldnames or [])}"
            )
        items.append((f"{name}:{n}", dict(row)))
    return items


def add_feedback(app: Appliance, deployment: str, path: str | Path) -> dict[str, Any]:
    """Store the labels of a file; a bad line refuses the whole file (nothing stored), a
    request id never logged is counted and skipped."""
    objective, labels = _objective(app, deployment)
    rows = []
    for where, raw in _read(Path(path)):
        request_id, row, label = _item(raw, where)
        if objective != "regression" and isinstance(label, str) and labels:
            label = next((k for k in labels if str(k) == label), label)
        rows.append((request_id, row, _check_label(label, objective, labels, where)))
    ship_logs(app, deployment)  # every logged id, however long the shipper takes
    wanted = {r[0] for r in rows}
    mark = shipped_mark(app)  # before the look: a file shipped meanwhile is read twice
    known = _logged_ids(app, deployment, wanted)
    if wanted - known.keys():
        # requests answered moments ago: in a worker's open spool file, or in one closed
        # (and perhaps shipped by the agent) since the look above; only those are read
        wait_for_open_logs(app, deployment)
        ship_logs(app, deployment)
        known |= _logged_ids(app, deployment, wanted - known.keys(), after=mark)
    # one row labelled twice in the file: the last label is the one kept
    kept = {(r[0], r[1]): r[2] for r in rows if r[1] < known.get(r[0], 0)}
    now = time.time()
    with app.db.transaction() as conn:
        conn.executemany(
            "INSERT INTO monitor_feedback (deployment, request_id, row, label, received_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (deployment, request_id, row) "
            "DO UPDATE SET label = excluded.label, received_at = excluded.received_at",
            [(deployment, rid, row, label, now) for (rid, row), label in kept.items()],
        )
    labelled = {(r[0], r[1]) for r in rows}
    # every label is stored, a duplicate (a row labelled again: the last label is kept), or
    # unmatched (no logged prediction has its row), so the counts add up to `labels`
    return {
        "deployment": deployment,
        "labels": len(rows),
        "stored": len(kept),
        "duplicates": len(rows) - len(labelled),
        "unmatched": len(labelled) - len(kept),
        "unknown_request_ids": len(wanted - known.keys()),
        # a row past the last one its request predicted: no prediction for it to judge
        "unknown_rows": sum(1 for rid, row in labelled if rid in known and row >= known[rid]),
    }


def _logged_ids(
    app: Appliance, deployment: str, wanted: set[str], after: int = 0
) -> dict[str, int]:
    """Which of `wanted` a deployment logged (request metadata or inputs), with how many rows
    each predicted; a request refused before a version was chosen predicted nothing a label
    could judge. `after`: in the files shipped after that `shipped_mark` only."""
    import duckdb

    from appliance.core import duck

    sources = []
    for kind, rows, where in (
        ("requests", "rows", f" WHERE {ROUTED}"),
        ("inputs", "row + 1", ""),
    ):
        files = log_files(app, deployment, kind, after=after)
        if files:
            listing = ", ".join(duck.sql_string(f) for f in files)
            sources.append(
                f"SELECT request_id, {rows} AS n "
                f"FROM read_parquet([{listing}], union_by_name = true){where}"
            )
    if not sources or not wanted:
        return {}
    con = duckdb.connect()
    try:
        # one list parameter, not a row per id: a file of 100,000 labels stays quick
        con.execute(
            "CREATE TABLE wanted AS SELECT unnest(?::VARCHAR[]) AS request_id", [sorted(wanted)]
        )
        found = con.execute(
            "SELECT w.request_id, max(l.n) FROM wanted w JOIN ("
            + " UNION ALL ".join(sources)
            + ") l USING (request_id) GROUP BY w.request_id"
        ).fetchall()
    finally:
        con.close()
    # a request logged with no row count (an older log) takes a label for any row
    return {r[0]: int(r[1]) if r[1] is not None else sys.maxsize for r in found}


def store_spooled_feedback(app: Appliance, deployment: str, path: Path) -> int:
    """The agent's part: a feedback file the server spooled goes into the store."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            rows.append((item["request_id"], int(item["row"]), str(item["label"])))
    with app.db.transaction() as conn:
        conn.executemany(
            "INSERT INTO monitor_feedback (deployment, request_id, row, label, received_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (deployment, request_id, row) "
            "DO UPDATE SET label = excluded.label",
            [(deployment, r[0], r[1], r[2], time.time()) for r in rows],
        )
    path.unlink(missing_ok=True)
    return len(rows)


def quality(
    app: Appliance,
    deployment: str,
    window: float = 3600.0,
    since: float | None = None,
    fresh: bool = True,
) -> dict[str, Any]:
    """Live quality per model version and time window: predictions logged with their
    inputs, joined to labels by request id and row; metrics as training computes them.
    `fresh`: ship the spool first (False: what is shipped)."""
    import duckdb
    import numpy as np

    from appliance.core import duck
    from appliance.core.deployments import get_deployment
    from appliance.core.registry import get_model_version
    from appliance.core.training import evaluate, label_codes

    dep = get_deployment(app, deployment)
    behind = ship_for_reading(app, deployment, ("inputs", "feedback")) if fresh else None
    files = log_files(app, deployment, "inputs", since)
    labels = app.db.rows(
        "SELECT request_id, row, label FROM monitor_feedback WHERE deployment = ?", (deployment,)
    )
    result: dict[str, Any] = {"deployment": deployment, "labels": len(labels), "windows": []}
    if fresh:  # what is left out, where this call shipped
        result["behind"] = behind
    if not files or not labels:
        result["matched"] = 0
        return result
    con = duckdb.connect()
    try:
        con.execute(
            "CREATE TABLE fb AS SELECT unnest(?::VARCHAR[]) AS request_id, "
            "unnest(?::BIGINT[]) AS row, unnest(?::VARCHAR[]) AS label",
            [
                [r["request_id"] for r in labels],
                [r["row"] for r in labels],
                [r["label"] for r in labels],
            ],
        )
        listing = ", ".join(duck.sql_string(f) for f in files)
        joined = con.execute(
            f"SELECT l.version, floor(l.ts / {float(window)}) * {float(window)} AS w, "
            f"l.prediction, fb.label FROM read_parquet([{listing}], union_by_name = true) l "
            "JOIN fb USING (request_id, row) "
            + (f"WHERE l.ts >= {float(since)} " if since else "")
            + "ORDER BY l.version, w"
        ).fetchall()
    finally:
        con.close()
    result["matched"] = len(joined)
    groups: dict[tuple[int, float], list[tuple[Any, Any]]] = {}
    for version, start, prediction, label in joined:
        groups.setdefault((int(version), float(start)), []).append((prediction, label))
    signatures: dict[int, dict[str, Any]] = {}
    for (version, start), pairs in sorted(groups.items()):
        if version not in signatures:
            signatures[version] = get_model_version(app, f"{dep['model']}@{version}")["signature"]
        signature = signatures[version]
        objective = str(signature.get("objective") or "binary")
        classes_known = list(signature.get("labels") or [])
        usable = []
        for prediction, label in pairs:  # a label this version cannot score is skipped
            try:
                value = json.loads(label)
            except (TypeError, ValueError):
                continue
            if objective == "regression" and isinstance(value, int | float):
                usable.append((prediction, value))
            elif objective != "regression" and value in classes_known:
                usable.append((prediction, value))
        result["unusable"] = result.get("unusable", 0) + len(pairs) - len(usable)
        pairs = usable
        if not pairs:
            continue
        raw = [label for _, label in pairs]
        pred = np.asarray([p for p, _ in pairs], dtype=np.float64)
        if objective == "regression":
            y = np.asarray(raw, dtype=np.float64)
        else:
            y = label_codes(raw, classes_known, "label")
        classes = len(signature.get("labels") or []) or 2
        metrics = evaluate(objective, y, pred, classes) if len(pairs) > 1 else {}
        result["windows"].append(
            {
                "version": version,
                "window_start": start,
                "window_end": start + window,
                "labelled": len(pairs),
                **{k: v for k, v in metrics.items() if np.isfinite(v)},
            }
        )
    return result
