"""Monitors: declarative rules over a deployment's drift, live quality and traffic, checked
by the agent on a schedule; a firing monitor records an alert and runs its action once.

A rule is `METRIC[(FEATURE)] OP NUMBER [over DURATION]`:

    psi(tenure_months) > 0.2          ks(x) > 0.1         missing_rate(x) > 0.05
    unseen(contract) > 0.01           prediction_psi > 0.25
    auc < 0.8 over 24h                accuracy, logloss, rmse, mae, r2, f1, precision, recall
    p99_ms > 50 over 5m               p50_ms, error_rate (5xx), client_error_rate (4xx), rps

Drift is computed on the window (`over`, default 1h) of logged inputs against the model's
training data; quality on the labelled predictions of the window (default 24h); traffic on
the logged requests of the window (default 5m; the live counters when requests are not
logged). Each is judged on the versions the deployment serves now (drift and quality on
each version's own rows, once there are MIN_ROWS or MIN_LABELS of them). A rule with no
data in its window is `no_data`, never firing. An action is one of `rollback` (the
deployment goes back to its previous revision; with a canary running, the canary ends, so
only the canary's own value firing does it, and otherwise it waits and is tried again),
`command` (an argv run with MONITOR_* in its environment),
`webhook` (a JSON POST to a loopback, private or link-local address) or `pipeline` (a
pipeline file run, e.g. a retrain).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import shlex
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from appliance.core.context import Appliance
from appliance.core.names import validate_name
from appliance.core.traffic import ROUTED
from appliance.errors import ApplianceError, Changed, InvalidInput, NotFound
from appliance.store.db import utcnow

DRIFT = {"psi", "ks", "missing_rate", "unseen", "prediction_psi"}
QUALITY = {"auc", "accuracy", "logloss", "rmse", "mae", "r2", "f1", "precision", "recall"}
TRAFFIC = {"p99_ms", "p50_ms", "error_rate", "client_error_rate", "rps"}
DEFAULT_OVER = {"drift": 3600.0, "quality": 86400.0, "traffic": 300.0}
FAMILY_LOGS = {"drift": ("inputs",), "quality": ("inputs", "feedback"), "traffic": ("requests",)}
# a closed log file the agent (shipping every few seconds) has not shipped within this is held
# up: its monitors say so (the agent passes three of its intervals when that is longer)
UNSHIPPED_AFTER = 60.0
_DRIFT_KEYS = {"psi": "psi", "ks": "ks", "missing_rate": "missing", "unseen": "unseen_share"}
# the least a version is judged on: drift over fewer rows is mostly chance (PSI over the
# ten training deciles averages about 9/rows with nothing changed), quality likewise
MIN_ROWS, MIN_LABELS = 200, 30  # APPLIANCE_MONITOR_MIN_ROWS, APPLIANCE_MONITOR_MIN_LABELS
# an action that could not run yet (a rollback while a canary that did not fire runs, an
# action that raised): its alert keeps this result, and it is tried again while it fires
WAITING = "waiting: "
CLAIM_EXPIRES = 600.0  # a rollback waits at most this for its workers; a claim outlives it
_FEATURE_TYPES = {"ks": "numeric", "unseen": "categorical"}  # the others fit both
# which quality metrics a model's objective has (training.evaluate computes these)
_OBJECTIVE_METRICS = {
    "regression": {"rmse", "mae", "r2"},
    "binary": {"auc", "accuracy", "logloss", "f1", "precision", "recall"},
    "multiclass": {"accuracy", "logloss", "f1", "precision", "recall"},
}
_RULE = re.compile(
    r"^\s*(?P<metric>[a-z_0-9]+)\s*(?:\(\s*(?P<arg>[^()\s]+)\s*\))?\s*"
    r"(?P<op>>=|<=|>|<)\s*(?P<num>-?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*"
    r"(?:over\s+(?P<over>\S+))?\s*$"
)


@dataclass(frozen=True)
class Rule:
    text: str
    metric: str
    arg: str | None
    op: str
    threshold: float
    over: float

    @property
    def family(self) -> str:
        if self.metric in DRIFT:
            return "drift"
        return "quality" if self.metric in QUALITY else "traffic"

    def holds(self, value: float) -> bool:
        return {
            ">": value > self.threshold,
            ">=": value >= self.threshold,
            "<": value < self.threshold,
            "<=": value <= self.threshold,
        }[self.op]


def parse_rule(text: str) -> Rule:
    """Read a rule; the error says what was expected."""
    from appliance.core.jobs import parse_duration

    match = _RULE.match(text or "")
    if match is None:
        raise InvalidInput(
            f"--rule {text!r}: expected METRIC[(FEATURE)] OP NUMBER [over DURATION], "
            "e.g. 'psi(tenure) > 0.2' or 'auc < 0.8 over 24h'"
        )
    metric, arg = match["metric"], match["arg"]
    known = DRIFT | QUALITY | TRAFFIC
    if metric not in known:
        raise InvalidInput(
            f"--rule {text!r}: unknown metric {metric!r} ({', '.join(sorted(known))})"
        )
    needs_feature = metric in DRIFT - {"prediction_psi"}
    if needs_feature and not arg:
        raise InvalidInput(f"--rule {text!r}: {metric} needs a feature, e.g. {metric}(tenure)")
    if not needs_feature and arg:
        raise InvalidInput(f"--rule {text!r}: {metric} takes no feature")
    family = "drift" if metric in DRIFT else "quality" if metric in QUALITY else "traffic"
    over = parse_duration(match["over"], "--rule over") if match["over"] else DEFAULT_OVER[family]
    if not over > 0:
        raise InvalidInput(f"--rule {text!r}: over: expected a positive duration")
    return Rule(text.strip(), metric, arg, match["op"], float(match["num"]), float(over))


# a word that begins as an assignment: NAME=, NAME+=, NAME[i]=
_ASSIGNED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\[[^]]*\])?\+?=")
# words a shell reads as its own as the command (`time` is a program only where installed)
_KEYWORDS = frozenset(
    {"!", "[[", "]]", "{", "}", "if", "then", "elif", "else", "fi", "case", "esac", "for"}
    | {"select", "while", "until", "do", "done", "function", "coproc", "time"}
)


def needs_shell(line: str) -> str | None:
    """The first thing in a command line that a shell would act on, or None. A monitor's
    command is split as words and runs without a shell, so `env | grep M` would hand "|" to
    env: said when the monitor is added, not when it fires and fails for good.

    Found outside quotes: a pipe, a redirection, `;`, `&`, parentheses, a `$` expansion or
    a `$'...'` or `$"..."` quote, a backquote, a line break or carriage return within the
    line, a `#` comment, brace expansion, a `~` that starts a word or follows an
    assignment's `=` or `:`, a `NAME=value` before the command, a keyword (`if`, `!`,
    `time`) as the command. Inside double quotes: a `$` expansion, a backquote, and a
    backslash before either (a shell drops it, the split keeps it). Outside single quotes:
    a line continuation. A shell's own line (`sh -c SCRIPT`) is no exception: no shell reads
    it before the inner one, so its double quotes reach that shell as typed (`sh -c "echo
    '$X'"` prints `$X`, where a shell would print X's value), while `sh -c 'echo "$X"'`
    means the same either way. Glob characters pass: a `?` or `*` in an address or a
    pattern is meant as it is more often than not, and no shell changes a pattern that
    matches no file."""
    try:
        words = shlex.split(line)
    except ValueError:
        words = []  # unbalanced quotes: the caller says so
    if _ASSIGNED.match(line.lstrip(" \t\n")):  # unquoted, as typed
        return "="
    if words and words[0] in _KEYWORDS and line.lstrip(" \t\n").startswith(words[0]):
        return words[0]
    quote = ""
    escaped = False
    word = 0  # where the unquoted word being read starts
    # an unquoted `{` in this word, then a `,` or `..`, then a `}`: `{a,b}` and `{1..3}`
    # expand, `{}` does not (bash matches braces as it nests them: one rule in between)
    brace = listed = False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
            if char == "\n":  # a continuation: a shell joins the lines, shlex keeps the break
                return char
            if quote == '"' and char in "$`":  # in double quotes a shell drops the \, shlex not
                return "\\"
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            if char == quote:
                quote = ""
            elif quote == '"' and (char == "`" or (char == "$" and _expands(line, i))):
                return char
        elif char in "'\"":
            quote = char
        elif char in "|;&<>`()" or (char == "$" and _expands(line, i, unquoted=True)):
            return char
        elif char in "\r\n" and line[i + 1 :].strip(" \t\r\n"):  # not at the end
            return char  # a newline separates commands; shlex splits words at a CR, bash not
        elif char in " \t\r\n":  # where a shell splits words (a CR here ends the line)
            word, brace, listed = i + 1, False, False
        elif char == "#" and i == word:
            return char
        elif char == "~" and (i == word or _tilde_of_assignment(line, word, i)):
            return char
        elif char == "{":
            brace = True
        elif brace and (char == "," or (char == "." and line[i + 1 : i + 2] == ".")):
            listed = True
        elif char == "}" and listed:
            return "{"
    return None


def _tilde_of_assignment(line: str, word: int, at: int) -> bool:
    """Whether bash expands the `~` at `at` as an assignment's (after its first `=` or a
    `:`), which it does in an argument too: `echo a=~/x` and `PATH=/bin:~/bin`."""
    match = _ASSIGNED.match(line, word, at)
    return match is not None and (at == match.end() or line[at - 1] == ":")


def _expands(line: str, at: int, unquoted: bool = False) -> bool:
    """Whether the `$` at `at` starts an expansion: $NAME, ${...}, $(...), $[...], $1, $?...,
    and outside double quotes a `$'...'` or `$"..."` quote."""
    after = line[at + 1 : at + 2]
    signs = "_{([?$#!@*-" + ("'\"" if unquoted else "")
    return bool(after) and after.isascii() and (after.isalnum() or after in signs)


def check_action(action: dict[str, Any]) -> dict[str, Any]:
    """At most one action, checked: rollback, command, webhook (a local address), pipeline."""
    given = {k: v for k, v in action.items() if v not in (None, False, [], "")}
    if len(given) > 1:
        raise InvalidInput(f"one action per monitor, got {', '.join(sorted(given))}")
    if "command" in given:
        command = given["command"]
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(c, str) for c in command)
        ):
            raise InvalidInput("--command: expected a command line")
    if "webhook" in given:
        url = urllib.parse.urlparse(str(given["webhook"]))
        try:
            port_ok = url.port is None or url.port > 0
        except ValueError:  # out of range
            port_ok = False
        # Refused now what could only fail once the monitor fires, and for good: a port no
        # address has, credentials in the address (no request the agent makes sends them)
        if (
            url.scheme not in ("http", "https")
            or not url.hostname
            or not port_ok
            or "@" in url.netloc
        ):
            raise InvalidInput(f"--webhook {given['webhook']!r}: expected http://HOST[:PORT]/PATH")
        host = url.hostname
        try:
            address = ipaddress.ip_address(host)
            local = address.is_loopback or address.is_private or address.is_link_local
        except ValueError:
            local = host == "localhost"
        if not local:
            raise InvalidInput(
                f"--webhook {given['webhook']!r}: only a loopback, private or link-local address "
                "(the appliance sends nothing off site)"
            )
    if "pipeline" in given:
        from appliance.core.pipelines import load_pipeline

        load_pipeline(given["pipeline"], given.get("params") or [])
    if "rollback" in given and given["rollback"] is not True:
        raise InvalidInput("--rollback: a flag")
    return given


def add_monitor(
    app: Appliance,
    name: str,
    deployment: str,
    rule: str,
    every: float | str = 60.0,
    action: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Watch a deployment with a rule, checked by the agent every `every` seconds."""
    from appliance.core.agent import ensure_agent
    from appliance.core.deployments import get_deployment
    from appliance.core.jobs import parse_duration

    validate_name("monitor name", name)
    dep = get_deployment(app, deployment)
    parsed = parse_rule(rule)
    if not math.isfinite(parsed.threshold):  # 1e309: no float holds it, so never crossed
        # (refused here, not by parse_rule: a rule stored before must still be read)
        raise InvalidInput(f"--rule {rule!r}: the threshold is not a finite number")
    _check_fits_model(app, dep, parsed)
    seconds = parse_duration(every, "--every")
    if seconds < 1:
        raise InvalidInput("--every: at least 1s")
    checked = check_action(dict(action or {}))
    if "pipeline" in checked:
        from pathlib import Path

        checked["pipeline"] = str(Path(checked["pipeline"]).resolve())
    if app.db.scalar("SELECT 1 FROM monitors WHERE name = ?", (name,)):
        raise InvalidInput(f"monitor {name!r} exists; remove it first")
    from appliance.core.runs import new_id

    app.db.execute(
        "INSERT INTO monitors (id, name, deployment, rule, every_s, action_json, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (new_id(), name, deployment, parsed.text, seconds, json.dumps(checked), utcnow()),
    )
    ensure_agent(app)
    return get_monitor(app, name)


def _check_fits_model(app: Appliance, dep: dict[str, Any], rule: Rule) -> None:
    """Refuse a rule the served model could never give a value for: it would sit at
    no_data for ever. A feature it does not have, KS on a categorical feature or unseen
    categories of a numeric one, a quality metric of another objective (RMSE of a
    classifier)."""
    from appliance.core.registry import get_model_version

    served = get_model_version(app, f"{dep['model']}@{dep['model_version']}")
    signature = served["signature"]
    if rule.arg is not None:
        types = {
            f["name"]: "categorical" if f.get("type") == "category" else "numeric"
            for f in signature["signature"]
        }
        if rule.arg not in types:
            raise InvalidInput(
                f"--rule {rule.text!r}: {served['ref']} has no feature {rule.arg!r} "
                f"(it has {', '.join(types)})"
            )
        fits = _FEATURE_TYPES.get(rule.metric)
        if fits is not None and types[rule.arg] != fits:
            raise InvalidInput(
                f"--rule {rule.text!r}: {rule.metric} is measured on {fits} features; "
                f"{rule.arg!r} is {types[rule.arg]} in {served['ref']}"
            )
    if rule.family == "quality":
        objective = str(signature.get("objective") or "binary")
        metrics = _OBJECTIVE_METRICS.get(objective, QUALITY)
        if rule.metric not in metrics:
            raise InvalidInput(
                f"--rule {rule.text!r}: {served['ref']} is a {objective} model, with no "
                f"{rule.metric} (it has {', '.join(sorted(metrics))})"
            )


def get_monitor(app: Appliance, name: str) -> dict[str, Any]:
    row = app.db.one("SELECT * FROM monitors WHERE name = ?", (name,))
    if row is None:
        raise NotFound(f"monitor {name!r} not found")
    return _shape(row)


def _shape(row: dict[str, Any]) -> dict[str, Any]:
    action = json.loads(row["action_json"])
    return {
        "name": row["name"],
        "deployment": row["deployment"],
        "rule": row["rule"],
        "every_s": row["every_s"],
        "action": next(iter(action), "alert only"),
        "action_detail": action,
        "state": row["state"],
        "value": row["last_value"],
        "error": row["last_error"],
        "checked_at": row["last_checked_at"],
        "id": row["id"],
    }


def list_monitors(app: Appliance, deployment: str | None = None) -> list[dict[str, Any]]:
    rows = app.db.rows(
        "SELECT * FROM monitors"
        + (" WHERE deployment = ?" if deployment else "")
        + " ORDER BY name",
        (deployment,) if deployment else (),
    )
    return [_shape(r) for r in rows]


def remove_monitor(app: Appliance, name: str) -> dict[str, Any]:
    """Stop watching; an alert still open is resolved with it (nothing checks it again)."""
    monitor = get_monitor(app, name)
    with app.db.transaction() as conn:
        _resolve_alerts(app, monitor["id"], conn)
        conn.execute("DELETE FROM monitors WHERE name = ?", (name,))
    return monitor


def list_alerts(app: Appliance, deployment: str | None = None, limit: int = 100) -> list[dict]:
    """Alerts, newest first: when each fired and resolved, its value, the action and its
    result."""
    return app.db.rows(
        "SELECT id, monitor, deployment, rule, value, fired_at, resolved_at, action, "
        "action_result FROM monitor_alerts"
        + (" WHERE deployment = ?" if deployment else "")
        + " ORDER BY id DESC LIMIT ?",
        (*((deployment,) if deployment else ()), limit),
    )


# ---- evaluating -----------------------------------------------------------------------------


@dataclass
class Judged:
    """A rule's value now: the worst of the served versions', whose it is (None for
    traffic, which pools them), each version's, and the versions left out, with why."""

    value: float | None
    version: int | None
    values: dict[int, float]
    notes: list[str]
    # the deployment's (revision, canary revision) when judged: what an action acts on
    served_at: tuple[int, int | None] | None = None


def judge(
    app: Appliance,
    deployment: str,
    rule: Rule,
    now: float | None = None,
    shared: dict[tuple[Any, ...], Any] | None = None,
) -> Judged:
    """The rule's value now, from the logs shipped so far (`shared`: drift and quality
    computed earlier in the same pass, which monitors of one deployment reuse: drift over
    a million rows takes seconds, and each computation stores a result). Each version
    served now is judged on its own rows: a version with too few rows to judge
    (PSI of ten rows is large by chance alone), without the feature, or without lineage,
    is left out and said, and the others are judged all the same."""
    now = time.time() if now is None else now
    served, served_at = _served_versions(app, deployment)
    values: dict[int, Any] = {}
    notes: list[str] = []
    if rule.family == "drift":
        from appliance.core.drift import drift

        least_rows = _least("APPLIANCE_MONITOR_MIN_ROWS", MIN_ROWS)
        for version in sorted(served):
            try:
                report = _once(
                    shared,
                    ("drift", deployment, rule.over, version),
                    lambda v=version: drift(app, deployment, rule.over, now, fresh=False, only={v}),
                )
            except InvalidInput as exc:
                if "no logged inputs" not in exc.message:  # no lineage, say
                    notes.append(f"version {version}: {exc.message}")
                continue
            except ApplianceError as exc:  # its training data or model gone from the store
                notes.append(f"version {version}: {exc.message}")
                continue
            except Exception as exc:  # a damaged file: this version, not the others
                notes.append(f"version {version}: {type(exc).__name__}: {exc}")
                continue
            item = next((r for r in report["versions"] if r["version"] == version), None)
            if item is None:
                continue  # none of its rows in the window
            if item["rows"] < least_rows:
                notes.append(
                    f"version {version}: {item['rows']} rows in the window, judged from "
                    f"{least_rows}"
                )
                continue
            if rule.metric == "prediction_psi":
                values[version] = item["prediction"].get("psi")
                continue
            found = next((f for f in item["features"] if f["feature"] == rule.arg), None)
            fits = _FEATURE_TYPES.get(rule.metric)
            if found is None:
                notes.append(f"version {version} has no feature {rule.arg!r}")
            elif fits is not None and found.get("type") != fits:
                notes.append(
                    f"{rule.metric} is measured on {fits} features; {rule.arg!r} is "
                    f"{found.get('type')} in version {version}"
                )
            else:
                values[version] = found.get(_DRIFT_KEYS[rule.metric])
    elif rule.family == "quality":
        from appliance.core.feedback import quality

        least_labels = _least("APPLIANCE_MONITOR_MIN_LABELS", MIN_LABELS)
        result = _once(
            shared,
            ("quality", deployment, rule.over),
            lambda: quality(app, deployment, window=1e12, since=now - rule.over, fresh=False),
        )
        for window in result["windows"]:
            version = window["version"]
            if version not in served:
                continue
            if window["labelled"] < least_labels:
                notes.append(
                    f"version {version}: {window['labelled']} labelled predictions in the "
                    f"window, judged from {least_labels}"
                )
                continue
            values[version] = window.get(rule.metric)
    else:
        value = _traffic_value(app, deployment, rule, now, served)
        return Judged(value, None, {}, [], served_at)
    known = {v: float(x) for v, x in values.items() if x is not None and x == x}  # not NaN
    if not known:
        return Judged(None, None, {}, notes, served_at)
    pick = max if rule.op in (">", ">=") else min
    version = pick(sorted(known), key=lambda v: known[v])
    return Judged(known[version], version, known, notes, served_at)


def _least(variable: str, default: int) -> int:
    """A threshold from the environment, read when used: a bad value is that monitor's
    error, naming the variable, not a crash of every monitor."""
    text = os.environ.get(variable)
    if text is None or text.strip() == "":
        return default
    try:
        least = int(text)
    except ValueError:
        least = -1
    if least < 0:
        raise InvalidInput(f"{variable}={text!r}: expected a whole number, 0 or more")
    return least


def _served_versions(app: Appliance, deployment: str) -> tuple[set[int], tuple[int, int | None]]:
    """The model versions the deployment serves now, its stable one and any canary, and its
    (revision, canary revision). A monitor judges these versions, so a new version is
    judged once it has enough rows, a canary on its own, and a version rolled back from
    stops counting at once; its action acts on that revision or not at all."""
    from appliance.core.deployments import get_deployment

    dep = get_deployment(app, deployment)
    versions = {int(v) for v in (dep["model_version"], dep["canary_version"]) if v is not None}
    return versions, (int(dep["current_revision"]), dep["canary_revision"])


def _once(shared: dict[tuple[Any, ...], Any] | None, key: tuple[Any, ...], compute: Any) -> Any:
    """`compute()`, or what it gave (or raised) earlier in the pass under `key`."""
    if shared is None:
        return compute()
    if key not in shared:
        try:
            shared[key] = (compute(), None)
        except Exception as exc:  # a damaged file too: computed once, said by each monitor
            shared[key] = (None, exc)
    value, error = shared[key]
    if error is not None:
        raise error
    return value


def _traffic_value(
    app: Appliance, deployment: str, rule: Rule, now: float, served: set[int]
) -> float | None:
    """From the logged requests of the window, of the versions served now and those refused
    before a version was chosen, pooled; from the live counters when none are logged (local
    workers only: k3s pods keep theirs)."""
    import duckdb

    from appliance.core import duck
    from appliance.core.deployments import get_deployment, traffic
    from appliance.core.prediction_log import log_files

    files = log_files(app, deployment, "requests", now - rule.over, now)
    if files:
        listing = ", ".join(duck.sql_string(f) for f in files)
        versions = ", ".join(str(v) for v in sorted(served))
        con = duckdb.connect()
        try:
            n, errors, refused, p50, p99 = con.execute(
                "SELECT count(*), count(*) FILTER (WHERE status >= 500), "
                "count(*) FILTER (WHERE status >= 400 AND status < 500), "
                # latency is of the requests a model answered: refusals take microseconds
                f"quantile_cont(latency_ms, 0.5) FILTER (WHERE {ROUTED}), "
                f"quantile_cont(latency_ms, 0.99) FILTER (WHERE {ROUTED}) "
                f"FROM read_parquet([{listing}], union_by_name = true) "
                f"WHERE ts >= {now - rule.over!r} AND ts < {now!r} "
                f"AND (version IN ({versions or 'NULL'}) OR NOT ({ROUTED}))"
            ).fetchone()
        finally:
            con.close()
        if n:
            return {
                "p99_ms": p99,
                "p50_ms": p50,
                "error_rate": errors / n,
                "client_error_rate": refused / n,
                "rps": n / rule.over,
            }[rule.metric]
    dep = get_deployment(app, deployment)
    if dep["backend"] != "local":  # a pod's counters stay in the pod
        return None
    live = traffic(app, deployment, min(rule.over, 60))["all"]
    if not live["requests"]:
        # no request is news for a rule on the rate, while the local workers serve
        return 0.0 if rule.metric == "rps" and dep["status"] == "serving" else None
    return live.get(rule.metric)


def check_monitors(
    app: Appliance,
    name: str | None = None,
    now: float | None = None,
    force: bool = False,
    fresh: bool = True,
    ship_errors: dict[str, str] | None = None,
    unshipped_after: float = UNSHIPPED_AFTER,
) -> list[dict[str, Any]]:
    """The agent's pass (or `monitor check`): evaluate each monitor that is due, move its
    state, and on a new firing record an alert and run its action once. `fresh`: ship each
    deployment's spool once first; the agent passes False, its own thread ships, and a
    monitor must not wait on a slow store. A monitor whose logs wait in the spool (the
    store away, another shipper holding it; for the agent, files of the monitor's window
    not shipped within `unshipped_after`, `ship_errors` its shipper's last error for each
    deployment) says so in its error: it was judged without them."""
    from appliance.core.prediction_log import FRESH_WAIT, ship_logs, shipping_held

    now = time.time() if now is None else now
    rows = app.db.rows(
        "SELECT * FROM monitors" + (" WHERE name = ?" if name else "") + " ORDER BY name",
        (name,) if name else (),
    )
    if name and not rows:
        raise NotFound(f"monitor {name!r} not found")
    due = [
        row
        for row in rows
        if force or not row["last_checked_at"] or now - row["last_checked_at"] >= row["every_s"]
    ]
    held: dict[str, tuple[str, float] | None] = {}  # deployment: why files wait, their age
    for deployment in sorted({row["deployment"] for row in due}):
        if fresh:
            why = shipping_held(ship_logs(app, deployment, wait=FRESH_WAIT))
            held[deployment] = (why, 0.0) if why else None
        else:
            failed = (ship_errors or {}).get(deployment)
            why = (
                f"shipping failed: {failed}"
                if failed
                else f"the agent has not shipped them within {unshipped_after:g} s"
            )
            held[deployment] = (why, unshipped_after)
    shared: dict[tuple[Any, ...], Any] = {}  # one drift per deployment and window
    return [_check_one(app, row, now, shared, held.get(row["deployment"])) for row in due]


def failing(results: list[dict[str, Any]], strict: bool = False) -> list[str]:
    """The monitors of a check that a script should act on: those firing, and with `strict`
    those with no data or anything in their error (why they could not be measured, logs
    they were judged without, an action that failed). `monitor check` exits non-zero on
    them, so a cron job can act without parsing the table."""
    return [
        r["monitor"]
        for r in results
        if r["state"] == "firing" or (strict and (r["state"] == "no_data" or r["error"]))
    ]


def _check_one(
    app: Appliance,
    row: dict[str, Any],
    now: float,
    shared: dict[tuple[Any, ...], Any],
    held: tuple[str, float] | None,
) -> dict[str, Any]:
    """One monitor: its value, its state, and on a new firing one alert and one action.
    A monitor that cannot be measured says why (`last_error`) and stops no other."""
    from appliance.core.prediction_log import behind_note, waiting_logs

    rule = parse_rule(row["rule"])
    judged = Judged(None, None, {}, [])
    try:
        judged = judge(app, row["deployment"], rule, now, shared)
        error = "; ".join(judged.notes) or None
    except ApplianceError as exc:
        error = exc.message
    except Exception as exc:  # a defect or a damaged log: this monitor, not the pass
        error = f"{type(exc).__name__}: {exc}"
    value = judged.value
    kinds = FAMILY_LOGS[rule.family]
    behind = held and _once(
        shared,
        ("waiting", row["deployment"], kinds, rule.over),
        lambda: waiting_logs(app, row["deployment"], kinds, *held, since=now - rule.over),
    )
    if behind:
        note = f"{behind_note(behind)}; judged without them"
        error = f"{error}; {note}" if error else note
    state = "no_data" if value is None else ("firing" if rule.holds(float(value)) else "ok")
    app.db.execute(
        "UPDATE monitors SET state = ?, last_value = ?, last_checked_at = ?, last_error = ? "
        "WHERE id = ?",
        (state, value, now, error, row["id"]),
    )
    outcome = {
        "monitor": row["name"],
        "state": state,
        "value": value,
        "error": error,
        "behind": behind or None,
        "version": judged.version,  # whose value (drift and quality judge each served one)
    }
    if state == "firing":
        action = json.loads(row["action_json"])
        alert = _claim_action(app, row, value, action, judged)
        if alert is not None:
            alert_id, from_revision, claimed = alert
            raised: BaseException | None = None
            try:
                result = _act(app, row, action, value, judged, from_revision)
            except BaseException as exc:  # tried again on the next firing check, not lost
                raised = exc
                failed = f"{type(exc).__name__}: {exc}"[:300]
                result = f"{WAITING}the action failed ({failed}); tried again"
            _record_result(app, alert_id, claimed, result)
            if raised is not None or result.startswith("failed: "):  # said with its state
                error = f"{error}; {result}" if error else result
                app.db.execute(
                    "UPDATE monitors SET last_error = ? WHERE id = ?", (error, row["id"])
                )
                outcome["error"] = error
            if raised is not None and not isinstance(raised, Exception):  # a stop: stop
                raise raised
            outcome["alert"] = alert_id
            outcome["action_result"] = result
    elif state == "ok":  # no data is not "ok": a firing alert stays open through a gap
        _resolve_alerts(app, row["id"])
    return outcome


def _claim_action(
    app: Appliance, row: dict[str, Any], value: Any, action: dict[str, Any], judged: Judged
) -> tuple[int, int | None, float] | None:
    """The alert whose action this checker runs now, the revision the deployment served
    when it was judged firing, and the claim's time; None when there is none to run. One
    alert while the monitor fires, whoever checks: a new one, or an open one whose action
    waits, or whose checker died (claimed over CLAIM_EXPIRES ago). A monitor removed while
    it was measured gets none."""
    claimed = time.time()  # the claim's own time, whatever `now` the pass judged at
    with app.db.transaction() as conn:
        if not conn.execute("SELECT 1 FROM monitors WHERE id = ?", (row["id"],)).fetchone():
            return None
        open_alert = conn.execute(
            "SELECT id, action_result, claimed_at, from_revision FROM monitor_alerts "
            "WHERE monitor_id = ? AND resolved_at IS NULL",
            (row["id"],),
        ).fetchone()
        if open_alert is not None:
            alert_id, result, held_since, from_revision = open_alert
            waits = held_since is None and str(result or "").startswith(WAITING)
            if not (waits or (held_since is not None and claimed - held_since > CLAIM_EXPIRES)):
                return None
            conn.execute(
                "UPDATE monitor_alerts SET claimed_at = ? WHERE id = ?", (claimed, alert_id)
            )
            return int(alert_id), from_revision, claimed
        from_revision = judged.served_at[0] if judged.served_at else None
        alert_id = conn.execute(
            "INSERT INTO monitor_alerts (monitor_id, monitor, deployment, rule, value, "
            "fired_at, action, claimed_at, from_revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row["id"],
                row["name"],
                row["deployment"],
                row["rule"],
                value,
                utcnow(),
                next(iter(action), None),
                claimed,
                from_revision,
            ),
        ).lastrowid
    return int(alert_id), from_revision, claimed


def _record_result(app: Appliance, alert_id: int, claimed: float, result: str) -> None:
    """What the action did, and the claim let go (a waiting action is taken again), while
    this checker still holds it. Resolved meanwhile: said on the resolved alert; taken over
    by another checker (this one ran past CLAIM_EXPIRES): that one says."""
    with app.db.transaction() as conn:
        held = conn.execute(
            "UPDATE monitor_alerts SET action_result = ?, claimed_at = NULL "
            "WHERE id = ? AND claimed_at = ?",
            (result, alert_id, claimed),
        ).rowcount
        if not held:
            if result.startswith(WAITING):
                result = "resolved while waiting: " + result[len(WAITING) :]
            conn.execute(  # not over what a checker that took over wrote
                "UPDATE monitor_alerts SET action_result = ? WHERE id = ? "
                "AND resolved_at IS NOT NULL AND claimed_at IS NULL AND (action_result IS NULL "
                "OR action_result LIKE 'resolved while waiting: %')",
                (result, alert_id),
            )


def _resolve_alerts(app: Appliance, monitor_id: str, conn: Any = None) -> None:
    """Close the monitor's open alert; an action still waiting says it was not run."""
    (conn or app.db).execute(
        "UPDATE monitor_alerts SET resolved_at = ?, claimed_at = NULL, action_result = CASE "
        "WHEN action_result LIKE ? THEN 'resolved while waiting: ' || substr(action_result, ?) "
        "ELSE action_result END WHERE monitor_id = ? AND resolved_at IS NULL",
        (utcnow(), WAITING + "%", len(WAITING) + 1, monitor_id),
    )


def _moved(from_revision: int | None, dep: dict[str, Any]) -> str | None:
    """Why a rollback must not run at all: the deployment is no longer at the revision its
    alert was judged at (so its target could be the version that fired, or a fresh deploy
    would be undone), or the alert is from before revisions were kept."""
    if from_revision is None or from_revision < 0:
        return "not run: the alert fired before its revision was kept; see to it by hand"
    if dep["current_revision"] != from_revision:
        return (
            f"not run: the deployment went from revision {from_revision} to "
            f"{dep['current_revision']} since the alert fired (a deploy, a promotion, a "
            "rollback, or this one before it failed); see to it by hand"
        )
    return None


def _rollback_waits(row: dict[str, Any], judged: Judged | None, dep: dict[str, Any]) -> str | None:
    """Why a rollback must wait, if it must. With a canary running, a rollback ends the
    canary and touches nothing else: it acts only when the canary's own value holds the
    rule. A version that stopped being served while it was judged (a canary ended by its
    own rule meanwhile) is judged again first."""
    version = judged.version if judged else None
    served = {dep["model_version"], dep["canary_version"]} - {None}
    if version is not None and version not in served:
        return f"version {version}, which fired, is no longer served; judged again next check"
    canary = dep["canary_version"]
    if canary is None:
        return None
    mine = judged.values.get(canary) if judged else None
    if mine is not None and parse_rule(row["rule"]).holds(mine):
        return None
    fired = (
        "the stable and canary versions' traffic together"
        if version is None
        else f"the stable version {version}"
    )
    return (
        f"not rolled back: {fired} fired while version {canary} is a canary, and a rollback "
        "would only end the canary; tried again if it is aborted (a promotion leaves it to you)"
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx is the answer, never a hop elsewhere


def _act(
    app: Appliance,
    row: dict[str, Any],
    action: dict[str, Any],
    value: Any,
    judged: Judged | None = None,
    from_revision: int | None = None,
) -> str:
    """Run a firing monitor's action; what happened, in words (kept with the alert).
    `judged`: each served version's value, so a rollback acts on the version that fired;
    `from_revision`: what the deployment served when the alert fired (a rollback tried
    again never acts on a deployment that moved since: its first try may have done it)."""
    if not action:
        return "alert only"
    version = judged.version if judged else None
    env = {
        "MONITOR_NAME": row["name"],
        "MONITOR_DEPLOYMENT": row["deployment"],
        "MONITOR_RULE": row["rule"],
        "MONITOR_VALUE": "" if value is None else repr(value),
        "MONITOR_VERSION": "" if version is None else str(version),
    }
    try:
        if action.get("rollback"):
            from appliance.core.deployments import get_deployment, rollback

            before = get_deployment(app, row["deployment"])
            moved = _moved(from_revision, before)
            if moved:
                return moved
            waiting = _rollback_waits(row, judged, before)
            if waiting:
                return WAITING + waiting
            why = f"monitor {row['name']}: {row['rule']} (value {value:.4g})"
            expected = (before["current_revision"], before["canary_revision"])
            if judged is not None and judged.served_at is not None:
                expected = judged.served_at  # what was judged, not what is now
            late = ""
            try:
                dep = rollback(app, row["deployment"], reason=why, expected=expected)
            except Changed:  # a canary ended, started or promoted, a version deployed
                moved = _moved(from_revision, get_deployment(app, row["deployment"]))
                return moved or f"{WAITING}the deployment changed while it was judged; judged again"
            except ApplianceError as exc:
                dep = get_deployment(app, row["deployment"])
                if (dep["current_revision"], dep["canary_revision"]) == expected:
                    raise  # refused: nothing changed (no earlier revision, say)
                late = f"; not yet served by every worker: {exc.message}"  # but it is done
            done = f"revision {dep['current_revision']} serves version {dep['model_version']}{late}"
            canary = before["canary_version"]
            if canary is None:
                return f"rolled back: {done}"
            stable = judged.values.get(before["model_version"]) if judged else None
            if stable is not None and parse_rule(row["rule"]).holds(stable):
                return (
                    f"{WAITING}ended the canary of version {canary} ({done}); the stable "
                    f"version {before['model_version']} fires too: tried again"
                )
            return f"rolled back: ended the canary of version {canary}; {done}"
        if "command" in action:
            done = subprocess.run(
                action["command"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
            )
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            return f"command exited {done.returncode}: {tail[0][:200]}"
        if "webhook" in action:
            body = json.dumps({k.lower(): v for k, v in env.items()}).encode()
            request = urllib.request.Request(
                action["webhook"], body, {"Content-Type": "application/json"}, method="POST"
            )
            # straight to the address checked when it was added: no proxy, no redirect
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
            with opener.open(request, timeout=10) as response:
                return f"webhook answered {response.status}"
        if "pipeline" in action:
            from appliance.core.pipeline_runs import run_pipeline

            run = run_pipeline(
                app,
                action["pipeline"],
                action.get("params") or [],
                trigger=f"monitor:{row['name']}",
            )
            return f"started pipeline run {run['id']} ({run['pipeline']})"
    except subprocess.TimeoutExpired:
        return "command timed out after 120 s"
    except ApplianceError as exc:
        return f"failed: {exc.message}"
    except OSError as exc:
        return f"failed: {exc}"
    return "alert only"
