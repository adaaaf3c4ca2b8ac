"""The data stage: import formats and options, versions, explore, recipes, splits, checks."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from appliance.core.context import Appliance
from appliance.core.datasets import ImportOptions, get_dataset_version, import_data

CSV = (
    "id,amount,status,ts\n1,10.5,active,2026-01-01 10:00:00\n2,,closed,2026-01-02 11:00:00\n"
    "3,7.25,active,2026-01-03 12:00:00\n4,100,active,2026-01-04 13:00:00\n"
)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def versions(app: Appliance, name: str) -> list[int]:
    rows = app.db.rows(
        "SELECT dv.version FROM dataset_versions dv JOIN datasets d ON d.id = dv.dataset_id "
        "WHERE d.name = ? ORDER BY dv.version",
        (name,),
    )
    return [r["version"] for r in rows]


# ---- import ---------------------------------------------------------------------------------


def test_formats_all_import_the_same_rows(app: Appliance, tmp_path: Path) -> None:
    import duckdb

    csv = write(tmp_path / "a.csv", CSV)
    write(tmp_path / "a.tsv", CSV.replace(",", "\t"))
    rows = [
        dict(zip(["id", "amount", "status"], r, strict=True))
        for r in [(1, 10.5, "active"), (2, None, "closed"), (3, 7.25, "active")]
    ]
    write(tmp_path / "a.json", json.dumps(rows))
    write(tmp_path / "a.ndjson", "\n".join(json.dumps(r) for r in rows) + "\n")
    write(tmp_path / "g.csv.gz", gzip.compress(CSV.encode()))
    duckdb.sql(f"COPY (SELECT * FROM read_csv('{csv}')) TO '{tmp_path / 'a.parquet'}'")
    counts = {}
    for ext in ("csv", "tsv", "json", "ndjson", "parquet", "csv.gz"):
        source = tmp_path / ("g.csv.gz" if ext == "csv.gz" else f"a.{ext}")
        version = import_data(app, f"f-{ext.replace('.', '-')}", str(source))
        counts[ext] = version["row_count"]
        assert {c["name"] for c in version["schema"]} >= {"id", "amount", "status"}
    assert counts == {"csv": 4, "tsv": 4, "json": 3, "ndjson": 3, "parquet": 4, "csv.gz": 4}


def test_directory_and_glob_sources(app: Appliance, tmp_path: Path) -> None:
    write(tmp_path / "d" / "part1.csv", "id,v\n1,a\n2,b\n")
    write(tmp_path / "d" / "part2.csv", "id,v\n3,c\n")
    write(tmp_path / "d" / ".hidden.csv", "id,v\n99,z\n")
    assert import_data(app, "dir", str(tmp_path / "d"))["row_count"] == 3
    assert import_data(app, "glob", str(tmp_path / "d" / "part*.csv"))["row_count"] == 3


def test_options_delimiter_header_encoding_schema_timestamp(app: Appliance, tmp_path: Path) -> None:
    write(tmp_path / "semi.csv", "1;x\n2;y\n")
    plain = import_data(
        app, "semi", str(tmp_path / "semi.csv"), ImportOptions(delimiter=";", header=False)
    )
    assert plain["row_count"] == 2 and len(plain["schema"]) == 2
    write(tmp_path / "latin.csv", "name,v\ncaf\xe9,1\n".encode("latin-1"))
    latin = import_data(
        app, "latin", str(tmp_path / "latin.csv"), ImportOptions(encoding="latin-1")
    )
    assert latin["row_count"] == 1
    typed = import_data(
        app,
        "typed",
        str(write(tmp_path / "t.csv", CSV)),
        ImportOptions(schema={"id": "VARCHAR"}, timestamp_col="ts"),
    )
    types = {c["name"]: c["type"] for c in typed["schema"]}
    assert types["id"] == "VARCHAR" and types["ts"] == "TIMESTAMP"
    assert typed["timestamp_col"] == "ts" and typed["creator"]


def test_identical_content_makes_no_new_version(app: Appliance, tmp_path: Path) -> None:
    source = write(tmp_path / "a.csv", CSV)
    first = import_data(app, "same", str(source))
    again = import_data(app, "same", str(source))
    assert (first["created"], again["created"]) == (True, False)
    assert versions(app, "same") == [1]
    write(source, CSV + "5,1,active,2026-01-05 00:00:00\n")
    assert import_data(app, "same", str(source))["ref"] == "same@2"
    assert get_dataset_version(app, "same@latest")["version"] == 2


def test_strict_reports_bad_lines_and_rejects_keeps_them(cli, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ragged = write(tmp_path / "ragged.csv", "a,b\n1,2\n3,4,5\n6,7\n8,9,10,11\n")
    strict = cli("data", "import", "r", str(ragged), "--home", str(home))
    assert strict.code == 2
    assert "line 3" in strict.err and "line 5" in strict.err and "ragged.csv" in strict.err
    assert cli("data", "list", "--json", "--home", str(home)).json() == []
    kept = cli("data", "import", "r", str(ragged), "--rejects", "--json", "--home", str(home))
    assert kept.code == 0, kept.err
    version = kept.json()
    assert version["row_count"] == 2 and version["rejects_count"] == 2
    rejects = cli("data", "rejects", "r@1", "--json", "--home", str(home)).json()
    assert [r["line"] for r in rejects] == [3, 5]
    assert all(r["error_type"] == "TOO MANY COLUMNS" for r in rejects)


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("latin.csv", "name,v\ncaf\xe9,1\n".encode("latin-1"), "--encoding"),
        ("dups.csv", "a,b,A\n1,2,3\n", "duplicate column name 'A'"),
        ("empty.csv", "", "file is empty"),
        ("header.csv", "a,b\n", "no data rows"),
        ("broken.parquet", b"PAR1" + b"\x00" * 64, "broken.parquet"),
    ],
)
def test_bad_files_name_the_problem_and_leave_nothing(  # type: ignore[no-untyped-def]
    cli, home: Path, tmp_path: Path, name, content, needle
) -> None:
    path = write(tmp_path / name, content)
    result = cli("data", "import", "bad", str(path), "--home", str(home))
    assert result.code != 0 and needle in result.err, result.err
    assert "Traceback" not in result.err
    assert cli("data", "list", "--json", "--home", str(home)).json() == []


def test_truncated_parquet_and_empty_glob(cli, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import duckdb

    good = tmp_path / "good.parquet"
    duckdb.sql(f"COPY (SELECT range AS x FROM range(10000)) TO '{good}'")
    cut = write(tmp_path / "cut.parquet", good.read_bytes()[: good.stat().st_size // 2])
    result = cli("data", "import", "cut", str(cut), "--home", str(home))
    assert result.code == 2 and "cut.parquet" in result.err
    result = cli("data", "import", "none", str(tmp_path / "nothing-*.csv"), "--home", str(home))
    assert result.code == 2 and "matches no file" in result.err


@pytest.mark.slow
def test_import_killed_halfway_leaves_no_version(home: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    import duckdb

    big = tmp_path / "big.csv"
    duckdb.sql(
        f"COPY (SELECT range AS id, random() AS x, 'row ' || range AS s FROM range(4000000)) "
        f"TO '{big}'"
    )
    app = Appliance.open(home)
    import_data(app, "big", str(write(tmp_path / "small.csv", "id,x,s\n1,0.5,a\n")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "data", "import", "big", str(big), "--home", str(home)]
    )
    deadline = time.monotonic() + 60
    while not list(home.glob("cache/tmp/*/data.parquet")) and time.monotonic() < deadline:
        time.sleep(0.005)  # kill it while DuckDB is writing the Parquet
    assert proc.poll() is None, "the import finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert versions(app, "big") == [1]
    again = import_data(app, "big", str(big))
    assert again["ref"] == "big@2" and again["row_count"] == 4_000_000
    app.close()


# ---- versions -------------------------------------------------------------------------------


def test_diff_export_and_remove(cli, app: Appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(app.settings.home)
    import_data(app, "d", str(write(tmp_path / "a.csv", CSV)))
    changed = CSV.replace("4,100,active", "4,200,active") + "5,1,new,2026-01-05 00:00:00\n"
    write(
        tmp_path / "b.csv",
        "id,amount,status,ts,extra\n" + "".join(line + ",x\n" for line in changed.splitlines()[1:]),
    )
    import_data(app, "d", str(tmp_path / "b.csv"))
    diff = cli("data", "diff", "d@1", "d@2", "--json", "--home", home).json()
    assert diff["rows"] == [4, 5]
    assert (diff["rows_added"], diff["rows_removed"]) == (2, 1)
    assert diff["schema"]["added"] == ["extra"]
    amount = next(c for c in diff["columns"] if c["column"] == "amount")
    assert amount["mean_delta"] > 0

    out_csv, out_pq = tmp_path / "out.csv", tmp_path / "out.parquet"
    assert cli("data", "export", "d@1", str(out_csv), "--home", home).code == 0
    assert out_csv.read_text().splitlines()[0] == "id,amount,status,ts"
    assert cli("data", "export", "d@2", str(out_pq), "--home", home).code == 0
    assert cli("data", "export", "d@2", str(out_pq), "--home", home).code == 4  # exists
    reimported = import_data(app, "roundtrip", str(out_pq))
    assert reimported["row_count"] == 5

    cli("data", "split", "d@2", "--fractions", "0.6,0.4", "--home", home)
    refused = cli("data", "rm", "d@2", "--home", home)
    assert refused.code == 4 and "d_train@1" in refused.err
    assert cli("data", "rm", "d@1", "--home", home).code == 0
    assert cli("data", "rm", "d@2", "--force", "--home", home).code == 0
    assert versions(app, "d") == []


# ---- explore --------------------------------------------------------------------------------


def test_preview_pages(cli, app: Appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import_data(app, "p", str(write(tmp_path / "a.csv", CSV)))
    page = cli(
        "data",
        "preview",
        "p",
        "--limit",
        "2",
        "--offset",
        "1",
        "--json",
        "--home",
        str(app.settings.home),
    ).json()
    assert [r[0] for r in page["rows"]] == [2, 3] and page["total"] == 4


def test_profile_is_complete_and_cached(app: Appliance, tmp_path: Path) -> None:
    from appliance.core.profiles import profile

    lines = ["x,y,label,cat"] + [
        f"{i},{i * 2 if i % 10 else ''},{int(i > 50)},{'ab'[i % 2]}" for i in range(100)
    ]
    import_data(app, "prof", str(write(tmp_path / "p.csv", "\n".join(lines) + "\n")))
    result = profile(app, "prof", label="label")
    assert result["cached"] is False and result["rows"] == 100
    cols = {c["name"]: c for c in result["columns"]}
    x, y, cat = cols["x"], cols["y"], cols["cat"]
    assert (x["min"], x["max"], x["count"], x["nulls"]) == (0, 99, 100, 0)
    assert x["mean"] == pytest.approx(49.5) and x["q50"] == pytest.approx(49.5, abs=1)
    assert sum(x["histogram"]["counts"]) == 100 and len(x["histogram"]["counts"]) == 20
    assert y["nulls"] == 10 and y["null_pct"] == 10.0
    assert cat["top"] == [{"value": "a", "count": 50}, {"value": "b", "count": 50}]
    assert x["vs_label"]["correlation"] > 0.8
    assert cat["vs_label"]["mutual_information"] == pytest.approx(0, abs=0.01)
    assert profile(app, "prof", label="label")["cached"] is True


def test_sql_reads_datasets_and_nothing_else(cli, app: Appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(app.settings.home)
    import_data(app, "s", str(write(tmp_path / "a.csv", CSV)))
    import_data(app, "s", str(write(tmp_path / "b.csv", CSV + "5,1,x,2026-01-05 00:00:00\n")))
    result = cli(
        "data",
        "sql",
        'SELECT (SELECT count(*) FROM s) AS latest, (SELECT count(*) FROM "s@1") AS first',
        "--json",
        "--home",
        home,
    ).json()
    assert result["rows"] == [[5, 4]] and result["datasets"] == ["s@1", "s@2"]
    csv_out = cli("data", "sql", "SELECT id FROM s ORDER BY id LIMIT 2", "--csv", "--home", home)
    assert csv_out.out.splitlines() == ["id", "1", "2"]
    for sql, needle in [
        ("DROP TABLE s", "not allowed"),
        ("COPY (SELECT 1) TO '/tmp/x.csv'", "not allowed"),
        ("SELECT * FROM read_csv('/etc/passwd')", "disabled"),
        ("SELEC 1", "syntax error"),
    ]:
        bad = cli("data", "sql", sql, "--home", home)
        assert bad.code == 2 and needle in bad.err, bad.err


# ---- recipes --------------------------------------------------------------------------------

RECIPE = """
CREATE MACRO share(a, b) AS a / b;
CREATE TEMP TABLE totals AS SELECT status, sum(amount) AS total FROM orders GROUP BY ALL;
SELECT o.id, o.status, o.amount,
       share(o.amount, t.total) AS share_of_status,
       sum(o.amount) OVER (PARTITION BY o.status ORDER BY o.ts) AS running,
       p.price
FROM orders o
JOIN totals t USING (status)
ASOF JOIN prices p ON o.ts >= p.ts
ORDER BY o.id
"""


def _orders_and_prices(app: Appliance, tmp_path: Path) -> None:
    import_data(app, "orders", str(write(tmp_path / "o.csv", CSV)))
    write(tmp_path / "p.csv", "ts,price\n2026-01-01 00:00:00,1.0\n2026-01-03 00:00:00,2.0\n")
    import_data(app, "prices", str(tmp_path / "p.csv"))


def test_recipe_runs_as_a_job_with_lineage_and_cache(cli, app: Appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from appliance.core.lineage import lineage

    home = str(app.settings.home)
    _orders_and_prices(app, tmp_path)
    recipe = write(tmp_path / "enrich.sql", RECIPE)
    first = cli("data", "recipe", "run", str(recipe), "--out", "enriched", "--json", "--home", home)
    assert first.code == 0, first.err
    made = first.json()
    assert made["cached"] is False and made["ref"] == "enriched@1" and made["row_count"] == 4
    rows = cli(
        "data",
        "sql",
        "SELECT id, price, running FROM enriched ORDER BY id",
        "--json",
        "--home",
        home,
    ).json()["rows"]
    assert rows[0][1] == 1.0 and rows[2][1] == 2.0  # ASOF join picked the right price
    second = cli(
        "data", "recipe", "run", str(recipe), "--out", "enriched", "--json", "--home", home
    )
    assert second.json()["cached"] is True and second.json()["ref"] == "enriched@1"
    assert len(cli("jobs", "list", "--json", "--home", home).json()) == 1  # no recomputation
    graph = lineage(app, "dataset:enriched@1")
    upstream = {n["ref"] for n in graph["upstream"]}
    assert {"dataset:orders@1", "dataset:prices@1"} <= upstream
    assert any(r.startswith("recipe:enrich@") for r in upstream)
    import_data(app, "orders", str(write(tmp_path / "o.csv", CSV + "5,1,x,2026-01-05 00:00:00\n")))
    third = cli("data", "recipe", "run", str(recipe), "--out", "enriched", "--json", "--home", home)
    assert third.json()["ref"] == "enriched@2" and third.json()["row_count"] == 5


@pytest.mark.parametrize(
    "sql, needle",
    [
        ("SELECT * FROM orders;\nSELECT * FRM orders", "LINE 2"),
        ("DROP TABLE orders; SELECT 1", "DROP"),
        ("COPY (SELECT 1) TO '/tmp/out.csv'; SELECT 1", "COPY"),
        ("ATTACH '/tmp/other.db'; SELECT 1", "ATTACH"),
        ("SELECT * FROM missing_dataset", "missing_dataset"),
        ("SELECT * FROM read_csv('/etc/passwd')", "disabled"),
        ("CREATE TABLE t AS SELECT 1", "last statement"),
    ],
)
def test_bad_recipes_are_refused_before_a_job(
    cli, app: Appliance, tmp_path: Path, sql, needle
) -> None:  # type: ignore[no-untyped-def]
    home = str(app.settings.home)
    _orders_and_prices(app, tmp_path)
    recipe = write(tmp_path / "bad.sql", sql)
    result = cli("data", "recipe", "run", str(recipe), "--out", "x", "--home", home)
    assert result.code == 2 and needle in result.err, result.err
    assert cli("jobs", "list", "--json", "--home", home).json() == []


# ---- splits ---------------------------------------------------------------------------------


def _numbers(app: Appliance, tmp_path: Path, n: int = 1000) -> None:
    lines = ["id,label,grp,ts"] + [
        f"{i},{int(i % 4 == 0)},g{i % 37},{2026 - (i % 3)}-01-{1 + i % 28:02d} 00:00:00"
        for i in range(n)
    ]
    import_data(app, "n", str(write(tmp_path / "n.csv", "\n".join(lines) + "\n")))


def _count(app: Appliance, sql: str) -> list:
    from appliance.core.query import run_sql

    return run_sql(app, sql)["rows"]


def test_random_split_is_reproducible_bit_for_bit(app: Appliance, tmp_path: Path) -> None:
    from appliance.core.splits import split

    _numbers(app, tmp_path)
    first = split(app, "n", [0.7, 0.15, 0.15], seed=7)
    sizes = [v["row_count"] for v in first]
    assert sum(sizes) == 1000 and 620 < sizes[0] < 780
    again = split(app, "n", [0.7, 0.15, 0.15], seed=7)
    assert [v["sha256"] for v in again] == [v["sha256"] for v in first]
    assert not any(v["created"] for v in again)
    other = split(app, "n", [0.7, 0.15, 0.15], seed=8)
    assert other[0]["sha256"] != first[0]["sha256"]
    overlap = _count(app, "SELECT count(*) FROM n_train JOIN n_test USING (id)")
    assert overlap == [[0]]


def test_stratified_time_and_group_splits(app: Appliance, tmp_path: Path) -> None:
    from appliance.core.splits import split

    _numbers(app, tmp_path)
    split(app, "n", [0.6, 0.2, 0.2], seed=1, stratify="label", out="st")
    rates = _count(
        app,
        "SELECT (SELECT avg(label) FROM st_train), (SELECT avg(label) FROM "
        "st_valid), (SELECT avg(label) FROM st_test)",
    )[0]
    assert all(r == pytest.approx(0.25, abs=0.01) for r in rates)
    split(app, "n", [0.6, 0.2, 0.2], time_col="ts", out="tm")
    # Every timestamp lands in one split only: the cuts are strict (84 distinct times, 1000 rows).
    order = _count(
        app,
        "SELECT (SELECT max(ts) FROM tm_train) < (SELECT min(ts) FROM tm_valid),"
        " (SELECT max(ts) FROM tm_valid) < (SELECT min(ts) FROM tm_test)",
    )[0]
    assert order == [True, True]
    split(app, "n", [0.6, 0.2, 0.2], seed=3, group="grp", out="gr")
    crossing = _count(
        app,
        "SELECT count(*) FROM (SELECT DISTINCT grp FROM gr_train) a "
        "JOIN (SELECT DISTINCT grp FROM gr_test UNION SELECT DISTINCT grp "
        "FROM gr_valid) b USING (grp)",
    )
    assert crossing == [[0]]


def test_split_bad_fractions(cli, app: Appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _numbers(app, tmp_path, 50)
    result = cli(
        "data", "split", "n", "--fractions", "0.7,0.2,0.2", "--home", str(app.settings.home)
    )
    assert result.code == 2 and "must sum to 1" in result.err
    assert versions(app, "n_train") == []


# ---- checks ---------------------------------------------------------------------------------

CHECKS = """
checks:
  - not_null: [id, status]
  - unique: id
  - range: {column: amount, min: 0, max: 50}
  - allowed_values: {column: status, values: [active, closed]}
  - regex: {column: status, pattern: "[a-z]+"}
  - row_count: {min: 1, max: 100}
  - max_null_fraction: {column: amount, max: 0.5}
"""


def test_failing_checks_block_the_version(cli, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = write(tmp_path / "a.csv", CSV)
    checks = write(tmp_path / "checks.yaml", CHECKS)
    result = cli("data", "import", "c", str(source), "--checks", str(checks), "--home", str(home))
    assert result.code == 7
    assert "range(column=amount, min=0, max=50): 1 failing" in result.err
    assert "'amount': 100.0" in result.err  # the offending row is shown
    assert cli("data", "list", "--json", "--home", str(home)).json() == []
    allowed = cli(
        "data",
        "import",
        "c",
        str(source),
        "--checks",
        str(checks),
        "--allow-invalid",
        "--json",
        "--home",
        str(home),
    )
    assert allowed.code == 0
    failing = [v for v in allowed.json()["validation"] if v["failing"]]
    assert [v["check"].split("(")[0] for v in failing] == ["range"]
    # The checks were stored with the dataset: the next import is checked too.
    write(source, CSV + "4,1,active,2026-01-05 00:00:00\n")
    again = cli("data", "import", "c", str(source), "--home", str(home))
    assert again.code == 7 and "unique" in again.err


def test_freshness_and_bad_check_files(cli, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = write(tmp_path / "a.csv", CSV)
    stale = write(tmp_path / "fresh.yaml", "checks:\n  - freshness: {max_age: 1d}\n")
    result = cli(
        "data",
        "import",
        "f",
        str(source),
        "--timestamp-col",
        "ts",
        "--checks",
        str(stale),
        "--home",
        str(home),
    )
    assert result.code == 7 and "freshness" in result.err
    wrong = write(tmp_path / "wrong.yaml", "checks:\n  - unique_ish: id\n")
    result = cli("data", "import", "f", str(source), "--checks", str(wrong), "--home", str(home))
    assert result.code == 2 and "check 1" in result.err and "unique_ish" in result.err


def test_recipe_output_is_validated(cli, app: Appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(app.settings.home)
    import_data(app, "orders", str(write(tmp_path / "o.csv", CSV)))
    checks = write(tmp_path / "c.yaml", "checks:\n  - not_null: amount\n")
    recipe = write(tmp_path / "r.sql", "SELECT * FROM orders")
    result = cli(
        "data", "recipe", "run", str(recipe), "--out", "o2", "--checks", str(checks), "--home", home
    )
    assert result.code == 1 and "not_null" in result.err
    assert versions(app, "o2") == []


# ---- edge cases found in review -------------------------------------------------------------


def test_recipe_with_trailing_semicolon_and_comment(cli, app: Appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(app.settings.home)
    import_data(app, "orders", str(write(tmp_path / "o.csv", CSV)))
    recipe = write(tmp_path / "r.sql", "SELECT id, amount FROM orders; -- the output")
    made = cli("data", "recipe", "run", str(recipe), "--out", "o2", "--json", "--home", home)
    assert made.code == 0, made.err
    assert made.json()["row_count"] == 4


def test_recipe_that_writes_to_an_input_is_refused_up_front(
    cli, app: Appliance, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    home = str(app.settings.home)
    import_data(app, "orders", str(write(tmp_path / "o.csv", CSV)))
    recipe = write(tmp_path / "r.sql", "INSERT INTO orders VALUES (9, 1, 'x', NULL); SELECT 1")
    result = cli("data", "recipe", "run", str(recipe), "--out", "o3", "--home", home)
    assert result.code == 2 and "statement 1" in result.err
    assert cli("jobs", "list", "--json", "--home", home).json() == []


def test_version_numbers_are_never_reused(app: Appliance, tmp_path: Path) -> None:
    from appliance.core.datasets import remove_version

    import_data(app, "v", str(write(tmp_path / "a.csv", CSV)))
    import_data(app, "v", str(write(tmp_path / "b.csv", CSV + "5,1,x,2026-01-05 00:00:00\n")))
    remove_version(app, "v@2")
    again = import_data(
        app, "v", str(write(tmp_path / "c.csv", CSV + "6,2,y,2026-01-06 00:00:00\n"))
    )
    assert again["ref"] == "v@3"


def test_names_in_any_case_and_not_in_strings(app: Appliance, tmp_path: Path) -> None:
    from appliance.core.query import run_sql

    import_data(app, "sales", str(write(tmp_path / "a.csv", CSV)))
    import_data(app, "other", str(write(tmp_path / "b.csv", CSV)))
    result = run_sql(
        app, "SELECT count(*) FROM sales s1 JOIN Sales s2 USING (id) WHERE 'other' <> '' -- other"
    )
    assert result["rows"] == [[4]] and result["datasets"] == ["sales@1"]


def test_diff_without_shared_columns(app: Appliance, tmp_path: Path) -> None:
    from appliance.core.query import diff

    import_data(app, "x", str(write(tmp_path / "a.csv", "a\n1\n2\n")))
    import_data(app, "x", str(write(tmp_path / "b.csv", "b\n1\n")))
    result = diff(app, "x@1", "x@2")
    assert (result["rows_added"], result["rows_removed"]) == (1, 2)
    assert result["schema"]["added"] == ["b"] and result["schema"]["removed"] == ["a"]


@pytest.mark.parametrize(
    "check, needle",
    [
        ("- range: {column: status, min: 0}", "cannot run on this data"),
        ("- allowed_values: {column: status, values: []}", "non-empty list"),
        ("- max_null_fraction: {column: amount, max: abc}", "must be a number"),
        ("- row_count: {min: many}", "must be a number"),
    ],
)
def test_badly_typed_checks_are_named(cli, home: Path, tmp_path: Path, check, needle) -> None:  # type: ignore[no-untyped-def]
    checks = write(tmp_path / "c.yaml", f"checks:\n  {check}\n")
    source = write(tmp_path / "a.csv", CSV)
    result = cli("data", "import", "c", str(source), "--checks", str(checks), "--home", str(home))
    assert result.code == 2 and needle in result.err, result.err
    assert "unexpected" not in result.err


def test_quoted_empty_string_is_not_null_and_rejects_name_the_file(
    cli,
    home: Path,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    source = write(tmp_path / "q.csv", 'id,note\n1,""\n2,\n3,x,extra\n')
    made = cli("data", "import", "q", str(source), "--rejects", "--json", "--home", str(home))
    assert made.code == 0, made.err
    rows = cli(
        "data", "sql", "SELECT id, note IS NULL FROM q ORDER BY id", "--json", "--home", str(home)
    ).json()["rows"]
    assert rows == [[1, False], [2, True]]
    rejects = cli("data", "rejects", "q@1", "--json", "--home", str(home)).json()
    assert [r["file"] for r in rejects] == [str(source)]


def test_profile_of_booleans_and_awkward_column_names(app: Appliance, tmp_path: Path) -> None:
    from appliance.core.profiles import profile

    source = write(tmp_path / "b.csv", 'b,"n ""q""",t\ntrue,1,x\nfalse,2,y\ntrue,3,x\n')
    import_data(app, "awkward", str(source))
    cols = {c["name"]: c for c in profile(app, "awkward", label='n "q"')["columns"]}
    assert cols["b"]["mean"] == pytest.approx(2 / 3)
    assert sum(cols["b"]["histogram"]["counts"]) == 3
    assert cols["t"]["top"][0] == {"value": "x", "count": 2}
