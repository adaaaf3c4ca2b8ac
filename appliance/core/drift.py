"""Data drift: a deployment's logged inputs in a window against the model's training data.

The reference is the dataset version the served model version was trained on (its lineage).
Per feature: for numbers, the population stability index over the reference's deciles and
the two-sample Kolmogorov-Smirnov statistic (with its p-value); for categories, PSI and the
chi-square test of the window's counts against the reference's shares, and the categories
the model never saw; for both, the change in the missing-value rate. The output's drift is
the same test on the predictions: the window's against the model's own predictions on its
training data. DuckDB reads the Parquet logs and the training file; the statistics are
numpy over the columns. Each result is stored with its window, and results whose window
ended more than `keep_days()` ago are removed as new ones are stored, every deployment's:
a monitor checked every minute stores one a minute, which on an edge box must not grow
without end, nor stay for a deployment nothing checks any more.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from appliance.core.context import Appliance
from appliance.core.times import clock
from appliance.errors import InvalidInput
from appliance.store.db import utcnow

EPSILON = 1e-4  # a bin with no rows counts as this share (PSI's usual guard)
PSI_BINS = 10
# From this effective sample size (m*n/(m+n)) on, the KS p-value is Kolmogorov's limiting
# distribution: a little above the finite-n one (by about 2% at most where p > 1e-6), in
# milliseconds where the finite-n one can take a second a feature (n = 1e6)
KS_LIMIT_N = 10_000
KEEP_ENV = "APPLIANCE_DRIFT_KEEP_DAYS"  # how long stored results stay (30 days)


def keep_days() -> float:
    """Days a stored result stays after its window ends, read when results are stored (a
    bad value is named before anything is computed); "inf" keeps them all, and an empty
    value is the default, as for the other settings read when used."""
    raw = os.environ.get(KEEP_ENV, "")
    try:
        days = float(raw) if raw.strip() else 30.0
    except ValueError:
        days = float("nan")
    if not days > 0:
        raise InvalidInput(f"{KEEP_ENV}={raw!r}: expected days, more than 0")
    return days


def psi(expected: Any, actual: Any) -> float:
    """Population stability index of two share vectors over the same bins."""
    import numpy as np

    e = np.maximum(np.asarray(expected, dtype=np.float64), EPSILON)
    a = np.maximum(np.asarray(actual, dtype=np.float64), EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def numeric_drift(reference: Any, current: Any) -> dict[str, Any]:
    """PSI over the reference's deciles, KS statistic and p-value, missing rates."""
    import numpy as np
    from scipy.stats import distributions

    ref_all = np.asarray(reference, dtype=np.float64)
    cur_all = np.asarray(current, dtype=np.float64)
    ref = np.sort(ref_all[np.isfinite(ref_all)])
    cur = np.sort(cur_all[np.isfinite(cur_all)])
    out: dict[str, Any] = {
        "type": "numeric",
        "missing_ref": _missing(ref_all, ref),
        "missing": _missing(cur_all, cur),
        "rows": int(cur_all.size),
    }
    if ref.size == 0 or cur.size == 0:
        out.update(psi=None, ks=None, p_value=None)
        return out
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
    cur_counts = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1)
    out["psi"] = psi(ref_counts / ref.size, cur_counts / cur.size)
    # KS: the largest gap between the two empirical CDFs, read at every value of both
    values = np.concatenate([ref, cur])
    gap = np.abs(
        np.searchsorted(ref, values, side="right") / ref.size
        - np.searchsorted(cur, values, side="right") / cur.size
    )
    ks = float(gap.max())
    n = ref.size * cur.size / (ref.size + cur.size)
    out["ks"] = ks
    if n < 1:
        out["p_value"] = None
    elif n < KS_LIMIT_N:  # as scipy's ks_2samp(method="asymp")
        out["p_value"] = float(distributions.kstwo.sf(ks, round(n)))
    else:
        out["p_value"] = float(distributions.kstwobign.sf(ks * math.sqrt(n)))
    out["mean_ref"], out["mean"] = float(ref.mean()), float(cur.mean())
    return out


def categorical_drift(reference: Any, current: Any) -> dict[str, Any]:
    """PSI over the categories, chi-square of the window against the reference's shares,
    the categories the reference never had, missing rates."""
    from collections import Counter

    from scipy.stats import chisquare

    def clean(values: Any) -> tuple[list[str], int]:
        kept = [str(v) for v in values if v is not None and v == v]  # NaN != NaN
        return kept, len(values) - len(kept)

    ref, ref_missing = clean(list(reference))
    cur, cur_missing = clean(list(current))
    out: dict[str, Any] = {
        "type": "categorical",
        "missing_ref": ref_missing / max(1, ref_missing + len(ref)),
        "missing": cur_missing / max(1, cur_missing + len(cur)),
        "rows": len(cur) + cur_missing,
    }
    if not ref or not cur:
        out.update(psi=None, chi2=None, p_value=None, unseen=[], unseen_share=0.0)
        return out
    ref_counts, cur_counts = Counter(ref), Counter(cur)
    levels = sorted(set(ref_counts) | set(cur_counts))
    out["psi"] = psi(
        [ref_counts[k] / len(ref) for k in levels], [cur_counts[k] / len(cur) for k in levels]
    )
    known = sorted(ref_counts)
    seen = sum(cur_counts[k] for k in known)
    if len(known) > 1 and seen:
        expected = [max(ref_counts[k] / len(ref), EPSILON) * seen for k in known]
        scale = seen / sum(expected)
        test = chisquare([cur_counts[k] for k in known], [e * scale for e in expected])
        out["chi2"], out["p_value"] = float(test.statistic), float(test.pvalue)
    else:
        out["chi2"], out["p_value"] = None, None
    unseen = sorted((k for k in cur_counts if k not in ref_counts), key=lambda k: -cur_counts[k])
    out["unseen"] = unseen[:10]
    out["unseen_share"] = sum(cur_counts[k] for k in unseen) / len(cur)
    return out


def _missing(values: Any, finite: Any) -> float:
    return float(1 - finite.size / values.size) if values.size else 0.0


def drift(
    app: Appliance,
    deployment: str,
    window: float = 3600.0,
    end: float | None = None,
    store: bool = True,
    fresh: bool = True,
    behind: dict[str, Any] | None = None,
    only: set[int] | None = None,
) -> dict[str, Any]:
    """Drift of each model version the deployment served in the window ending at `end`
    (now): a row per feature, worst first, and the output's drift. `fresh`: ship the
    spool first, and say in `behind` which inputs still wait (False: what is shipped, for
    callers that just shipped, or the agent's; `behind`: what their pass left waiting).
    `only`: these versions (a monitor's, served now), none of the others computed."""
    import numpy as np

    from appliance.core import duck
    from appliance.core.datasets import get_dataset_version
    from appliance.core.deployments import get_deployment
    from appliance.core.inference import ModelRuntime
    from appliance.core.prediction_log import (
        behind_note,
        log_files,
        ship_for_reading,
        wait_for_open_logs,
    )
    from appliance.core.registry import get_model_version

    if not window > 0:
        raise InvalidInput(f"--window {window!r}: expected a positive duration")
    dep = get_deployment(app, deployment)
    if fresh:
        behind = ship_for_reading(app, deployment, ("inputs",))
    end = time.time() if end is None else end
    start = end - window
    between = f"between {clock(start, True)} and {clock(end, True)}"
    files = log_files(app, deployment, "inputs", start, end)
    if not files and fresh:
        # inputs logged moments ago, in a worker's open file or one closed since the look
        # above: one look more
        wait_for_open_logs(app, deployment, ("inputs",))
        behind = ship_for_reading(app, deployment, ("inputs",))
        files = log_files(app, deployment, "inputs", start, end)
    if not files:
        sample = app.db.scalar("SELECT log_sample FROM deployments WHERE name = ?", (deployment,))
        hint = behind_note(behind) or (
            f"it logs inputs (--sample {float(sample):g}); none was logged in this window"
            if sample
            else f"log them with 'appliance deployments logging {deployment} --sample 0.1'"
        )
        raise InvalidInput(f"deployment {deployment}: no logged inputs {between} ({hint})")
    keep = keep_days() if store else 0.0  # named before the work, not after it
    con = duck.connect(app.settings)
    results = []
    try:
        listing = ", ".join(duck.sql_string(f) for f in files)
        logged = f"read_parquet([{listing}], union_by_name = true)"
        inside = f"ts >= {start!r} AND ts < {end!r}"
        versions = [
            (int(v), int(n))
            for v, n in con.execute(
                f"SELECT version, count(*) FROM {logged} WHERE {inside} GROUP BY 1 ORDER BY 2 DESC"
            ).fetchall()
        ]
        if not versions:
            raise InvalidInput(f"deployment {deployment}: no logged inputs {between}")
        if only is not None:
            versions = [(v, n) for v, n in versions if v in only]
        available = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {logged}").fetchall()}
        for version, rows in versions:
            mv = get_model_version(app, f"{dep['model']}@{version}")
            if not mv.get("dataset"):
                raise InvalidInput(
                    f"{mv['ref']}: no training dataset in its lineage to compare with "
                    "(registered from a run that read none)"
                )
            reference = get_dataset_version(app, mv["dataset"])
            ref_file = duck.sql_string(str(app.objects.get_file(reference["sha256"])))
            features = mv["signature"]["signature"]
            names = [f["name"] for f in features]
            ref_cols = con.execute(
                "SELECT "
                + ", ".join(duck.sql_identifier(n) for n in names)
                + f" FROM read_parquet({ref_file})"
            ).fetchnumpy()
            wanted = [n for n in names if f"x_{n}" in available]
            cur_cols = con.execute(
                "SELECT prediction"
                + "".join(f", {duck.sql_identifier('x_' + n)}" for n in wanted)
                + f" FROM {logged} WHERE {inside} AND version = {version}"
            ).fetchnumpy()
            rows_out = []
            for feature in features:
                name = feature["name"]
                if name not in wanted:
                    continue
                ref_values, cur_values = ref_cols[name], cur_cols[f"x_{name}"]
                if feature["type"] == "category":
                    found = categorical_drift(_objects(ref_values), _objects(cur_values))
                else:
                    found = numeric_drift(_floats(ref_values), _floats(cur_values))
                rows_out.append({"feature": name, **found})
            rows_out.sort(key=lambda r: -(r["psi"] if r["psi"] is not None else -1.0))
            runtime = ModelRuntime(mv, str(app.objects.get_file(mv["sha256"])))
            ref_pred = np.asarray(
                runtime.predict_matrix(
                    runtime.matrix(
                        {
                            n: _objects(ref_cols[n])
                            if runtime.categories.get(n) is not None
                            else _floats(ref_cols[n])
                            for n in names
                        }
                    )
                )
            )
            cur_pred = _predictions(cur_cols["prediction"])
            output = (
                numeric_drift(ref_pred.reshape(-1), cur_pred.reshape(-1))
                if ref_pred.ndim == 1
                else numeric_drift(ref_pred.max(axis=1), cur_pred.max(axis=1))
            )
            results.append(
                {
                    "version": version,
                    "reference": reference["ref"],
                    "rows": rows,
                    "features": rows_out,
                    "prediction": output,
                }
            )
    finally:
        con.close()
    report = {
        "deployment": deployment,
        "window_start": start,
        "window_end": end,
        "window_s": window,
        "versions": results,
    }
    if fresh:
        report["behind"] = behind
    if store:
        with app.db.transaction() as conn:
            conn.execute(
                "DELETE FROM drift_results WHERE window_end < ?", (time.time() - keep * 86400,)
            )
            for item in results:
                conn.execute(
                    "INSERT INTO drift_results (deployment, version, reference, window_start, "
                    "window_end, rows, results_json, computed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        deployment,
                        item["version"],
                        item["reference"],
                        start,
                        end,
                        item["rows"],
                        json.dumps(
                            {"features": item["features"], "prediction": item["prediction"]}
                        ),
                        utcnow(),
                    ),
                )
    return report


def _floats(values: Any) -> Any:
    import numpy as np

    if getattr(values, "dtype", None) is not None and values.dtype.kind in "biuf":
        data = np.ma.getdata(values).astype(np.float64)
        mask = np.ma.getmaskarray(values)
        data[mask] = math.nan
        return data
    return np.array([_float(v) for v in _values(values)], dtype=np.float64)


def _values(values: Any) -> list[Any]:
    """A fetched column as Python values, missing ones as None (np.ma.filled would put its
    fill value there: '?' for text, which would read as a category)."""
    import numpy as np

    data = np.ma.getdata(values)
    mask = np.ma.getmaskarray(values)
    return [None if missing else value for value, missing in zip(data, mask, strict=True)]


def _float(value: Any) -> float:
    """A logged value as a number: numbers, and numbers a client sent as text; else NaN."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip('"'))
        except ValueError:
            return math.nan
    return math.nan


def _objects(values: Any) -> Any:
    import numpy as np

    return np.asarray([None if v is None else str(v) for v in _values(values)], dtype=object)


def _predictions(values: Any) -> Any:
    import numpy as np

    filled = np.ma.filled(values, np.nan) if np.ma.isMaskedArray(values) else values
    if filled.dtype == object:  # multiclass: a list per row
        return np.asarray([np.asarray(v, dtype=np.float64) for v in filled])
    return filled.astype(np.float64)


def drift_history(app: Appliance, deployment: str, limit: int = 50) -> list[dict[str, Any]]:
    """Stored drift results, newest first: per window, the worst feature and its PSI."""
    rows = app.db.rows(
        "SELECT * FROM drift_results WHERE deployment = ? ORDER BY window_end DESC LIMIT ?",
        (deployment, limit),
    )
    out = []
    for row in rows:
        data = json.loads(row["results_json"])
        worst = data["features"][0] if data["features"] else {}
        out.append(
            {
                "version": row["version"],
                "window_start": row["window_start"],
                "window_end": row["window_end"],
                "rows": row["rows"],
                "worst_feature": worst.get("feature"),
                "worst_psi": worst.get("psi"),
                "prediction_psi": data["prediction"].get("psi"),
                "features": data["features"],
                "prediction": data["prediction"],
            }
        )
    return out
