"""Bad input: a clear one-line error, a non-zero exit, and nothing stored changes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.core.context import Appliance
from appliance.core.quickstart import sample_csv


def _snapshot(home: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(home / "metadata.db")
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    snap = {t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
    conn.close()
    return snap


@pytest.fixture
def seeded(home: Path) -> Path:
    app = Appliance.open(home)
    from appliance.core.datasets import import_csv

    import_csv(app, sample_csv(), "seed")
    app.close()
    return home


def _assert_clean_failure(result, field: str) -> None:  # type: ignore[no-untyped-def]
    assert result.code != 0
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert field in lines[0]
    assert "Traceback" not in result.err + result.out


@pytest.mark.parametrize(
    "setup, args, field",
    [
        (None, ["data", "import", "x", "{tmp}/missing.csv"], "missing.csv: no such file"),
        ("", ["data", "import", "x", "{tmp}/in.csv"], "in.csv: file is empty"),
        ("a,b\n", ["data", "import", "x", "{tmp}/in.csv"], "no data rows"),
        ("a,b\n1,2\n", ["data", "import", "a/b", "{tmp}/in.csv"], "'a/b'"),
        ("a,b\n1,2\n", ["data", "import", "..", "{tmp}/in.csv"], "'..'"),
        ("a,b\n1,2\n", ["data", "import", "has space", "{tmp}/in.csv"], "'has space'"),
        (None, ["models", "register", "../evil", "--run", "abc"], "'../evil'"),
        (None, ["models", "register", "ok", "--run", "ffffffff"], "run 'ffffffff' not found"),
        (None, ["deployments", "create", "bad name", "--model", "seed"], "'bad name'"),
        (None, ["jobs", "train", "--dataset", "seed", "--target", "nope"], "--label 'nope'"),
        (
            None,
            ["jobs", "train", "--dataset", "seed", "--target", "churned", "--param", "x"],
            "expected KEY=VALUE",
        ),
        (None, ["data", "show", "seed@9"], "'seed@9' not found"),
        (None, ["lineage", "widget:1"], "unknown kind"),
        ("\n\n\n", ["data", "import", "x", "{tmp}/in.csv"], "no data rows"),
        ('a,b\n"open,2\n3,4\n', ["data", "import", "x", "{tmp}/in.csv"], "in.csv"),
        (None, ["deployments", "rollback", "nope", "--to-revision", "0"], "--to-revision 0"),
    ],
)
def test_bad_input_changes_nothing(cli, seeded: Path, tmp_path: Path, setup, args, field) -> None:  # type: ignore[no-untyped-def]
    if setup is not None:
        (tmp_path / "in.csv").write_text(setup)
    before = _snapshot(seeded)
    result = cli(*[a.format(tmp=tmp_path) for a in args], "--home", str(seeded))
    _assert_clean_failure(result, field)
    assert _snapshot(seeded) == before


def test_rollback_without_earlier_revision(cli, trained_home: Path) -> None:  # type: ignore[no-untyped-def]
    home = str(trained_home)
    assert (
        cli(
            "deployments", "create", "lonely", "--model", "churn@1", "--no-start", "--home", home
        ).code
        == 0
    )
    before = _snapshot(trained_home)
    result = cli("deployments", "rollback", "lonely", "--home", home)
    _assert_clean_failure(result, "no earlier revision")
    assert _snapshot(trained_home) == before


def test_home_pointing_at_a_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    result = cli("--home", str(target), "data", "list")
    _assert_clean_failure(result, "not a directory")
    assert target.read_text() == "not a directory"
    result = cli("data", "list", "--home", str(target / "below"))
    _assert_clean_failure(result, "cannot create directory")


def test_unreadable_csv_is_named(cli, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "binary.csv"
    bad.write_bytes(b"\x00\xff\xfe" * 1000)
    result = cli("data", "import", "bin", str(bad), "--home", str(home))
    assert result.code != 0 and "binary.csv" in result.err


def test_glob_characters_in_a_path_are_taken_literally(cli, home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for name in ("x1.csv", "x2.csv"):
        (tmp_path / name).write_text("a,b\n9,9\n9,9\n")
    literal = tmp_path / "x*.csv"
    literal.write_text("a,b\n1,2\n")
    result = cli("data", "import", "lit", str(literal), "--home", str(home), "--json")
    assert result.code == 0 and result.json()["row_count"] == 1


def test_registering_a_model_without_a_signature_is_refused(cli, home: Path) -> None:  # type: ignore[no-untyped-def]
    import sys

    from appliance.core.jobs import wait_job

    code = (
        "import json, pathlib, tempfile\n"
        "from appliance.config import load_settings\n"
        "from appliance.store.objects import open_object_store\n"
        "p = pathlib.Path(tempfile.mkdtemp()) / 'm.txt'; p.write_text('not a model')\n"
        "s = open_object_store(load_settings()).put_file(p)\n"
        "print(json.dumps({'type': 'artifact', 'name': 'model', 'sha256': s.sha256,\n"
        "    'size': s.size, 'uri': s.uri, 'meta': {'dataset': 'foo'}}))\n"
    )
    job = cli("jobs", "run", "--json", "--home", str(home), "--", sys.executable, "-c", code)
    assert job.code == 0
    app = Appliance.open(home)
    done = wait_job(app, job.json()["id"], timeout=60)
    assert done["state"] == "succeeded"
    before = _snapshot(home)
    result = cli("models", "register", "m", "--run", done["run_id"], "--home", str(home))
    _assert_clean_failure(result, "flavor")
    assert _snapshot(home) == before
    app.close()
