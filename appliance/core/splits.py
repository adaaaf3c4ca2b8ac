"""Train/valid/test splits: random, stratified, by time or by group; reproducible bit for bit.

Each row's place is a pure function of its row number in the Parquet file (or its group
value) and the seed, so the same seed on the same version writes the same bytes.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from appliance.core import duck
from appliance.core.context import Appliance
from appliance.core.datasets import add_version, describe_parquet, get_dataset_version
from appliance.core.names import validate_name
from appliance.errors import InvalidInput

PARTS = ("train", "valid", "test")
_HASH_SPACE = "18446744073709551616.0"  # 2**64: hash() is a UBIGINT


def parse_fractions(text: str) -> list[float]:
    try:
        fractions = [float(x) for x in text.split(",")]
    except ValueError as exc:
        raise InvalidInput(f"--fractions {text!r}: expected numbers like 0.7,0.15,0.15") from exc
    if len(fractions) not in (2, 3) or any(not math.isfinite(f) or f <= 0 for f in fractions):
        raise InvalidInput(f"--fractions {text!r}: give two or three positive fractions")
    if abs(sum(fractions) - 1) > 1e-9:
        raise InvalidInput(f"--fractions {text!r}: must sum to 1 (they sum to {sum(fractions):g})")
    return fractions


def split(
    app: Appliance,
    ref: str,
    fractions: list[float],
    seed: int = 0,
    stratify: str | None = None,
    time_col: str | None = None,
    group: str | None = None,
    out: str | None = None,
) -> list[dict[str, Any]]:
    """Write NAME_train, NAME_valid[, NAME_test] as new versions with lineage."""
    if sum(1 for m in (stratify, time_col, group) if m) > 1:
        raise InvalidInput("use at most one of --stratify, --time-col and --group")
    version = get_dataset_version(app, ref)
    prefix = out or version["name"]
    names = [validate_name("--out", f"{prefix}_{part}") for part in PARTS[: len(fractions)]]
    columns = {c["name"] for c in version["schema"]}
    if "file_row_number" in columns:
        raise InvalidInput(
            f"{version['ref']}: a column named file_row_number clashes with the row numbers a "
            "split is computed from; rename it with a recipe first"
        )
    for flag, column in (("--stratify", stratify), ("--time-col", time_col), ("--group", group)):
        if column and column not in columns:
            raise InvalidInput(f"{flag} {column!r}: no such column in {version['ref']}")
    rn = "file_row_number"
    if stratify:
        col = duck.sql_identifier(stratify)
        position = (
            f"(row_number() OVER (PARTITION BY {col} ORDER BY hash({rn}, {seed}), {rn}) - 1)"
            f"::DOUBLE / count(*) OVER (PARTITION BY {col})"
        )
        mode = f"stratify={stratify}"
    elif time_col:
        col = duck.sql_identifier(time_col)
        # rank(): rows with the same time share a position, so a cut never splits a timestamp.
        position = f"(rank() OVER (ORDER BY {col} NULLS FIRST) - 1)::DOUBLE / count(*) OVER ()"
        mode = f"time={time_col}"
    elif group:
        position = f"hash({duck.sql_identifier(group)}, {seed})::DOUBLE / {_HASH_SPACE}"
        mode = f"group={group}"
    else:
        position = f"hash({rn}, {seed})::DOUBLE / {_HASH_SPACE}"
        mode = "random"
    cuts = [sum(fractions[: i + 1]) for i in range(len(fractions) - 1)]
    part = (
        "CASE "
        + " ".join(f"WHEN u < {c!r} THEN {i}" for i, c in enumerate(cuts))
        + (f" ELSE {len(cuts)} END")
    )
    source = str(app.objects.get_file(version["sha256"]))
    con = duck.connect(app.settings)
    results = []
    tmp_root = app.settings.cache_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    try:
        con.execute(
            f"CREATE TABLE assigned AS SELECT *, {part} AS __part FROM (SELECT *, {position} AS u "
            f"FROM read_parquet({duck.sql_string(source)}, file_row_number = true))"
        )
        with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
            stored = []
            for i, name in enumerate(names):
                path = Path(tmp) / f"{i}.parquet"
                con.execute(
                    f"COPY (SELECT * EXCLUDE (u, __part, {rn}) FROM assigned WHERE __part = {i} "
                    f"ORDER BY {rn}) TO {duck.sql_string(str(path))} "
                    "(FORMAT parquet, COMPRESSION zstd)"
                )
                rows, schema = describe_parquet(con, f"read_parquet({duck.sql_string(str(path))})")
                if rows == 0:
                    raise InvalidInput(
                        f"split {name}: would be empty ({version['row_count']} rows, "
                        f"fractions {fractions})"
                    )
                stored.append((name, app.objects.put_file(path, move=True), rows, schema))
    finally:
        con.close()
    for name, obj, rows, schema in stored:
        results.append(
            add_version(
                app,
                name,
                obj,
                row_count=rows,
                schema=schema,
                source=f"split of {version['ref']} ({mode}, seed {seed}, {fractions})",
                timestamp_col=version.get("timestamp_col"),
                execution="Split",
                execution_ref=f"split:{version['ref']}:{mode}:{seed}:{name}",
                inputs=[("DatasetVersion", f"dataset:{version['ref']}")],
            )
        )
    return results
