"""Promotion gates: the rule's grammar, and a real evaluation job deciding an alias move."""

from __future__ import annotations

import pytest

from appliance.core.promotion import Condition, Term, check_gate, parse_gate
from appliance.errors import Conflict, InvalidInput


def test_gate_grammar() -> None:
    assert parse_gate("auc >= champion.auc + 0.002") == [Condition("auc", ">=", Term("auc", 0.002))]
    assert parse_gate("logloss<=current.logloss-1e-3 and accuracy > 0.8") == [
        Condition("logloss", "<=", Term("logloss", -0.001)),
        Condition("accuracy", ">", Term(None, 0.8)),
    ]
    assert parse_gate("auc > challenger.auc", alias="challenger")[0].right == Term("auc", 0.0)
    for bad, needle in [
        ("", "a metric name"),
        ("auc", "a comparison"),
        ("auc >= ", "a number or ALIAS.METRIC"),
        ("auc >= champion", "ALIAS.METRIC or a number"),
        ("auc >= other.auc", "champion.auc"),
        ("champion.auc <= auc", "the left side"),
        ("auc >= 1 or auc < 2", "'and' or the end"),
        ("auc >= 1; rm -rf", "cannot read"),
        ("auc >= champion.auc + x", "a number after +"),
    ]:
        with pytest.raises(InvalidInput, match=needle):
            parse_gate(bad)


def test_gate_check() -> None:
    rule = parse_gate("auc >= champion.auc + 0.01 and logloss <= 0.5")
    passed = check_gate(rule, {"auc": 0.92, "logloss": 0.3}, {"auc": 0.90, "logloss": 0.4})
    assert [r["holds"] for r in passed] == [True, True]
    assert passed[0]["threshold"] == pytest.approx(0.91)
    failed = check_gate(rule, {"auc": 0.905, "logloss": 0.3}, {"auc": 0.90, "logloss": 0.4})
    assert [r["holds"] for r in failed] == [False, True]
    nan = check_gate(parse_gate("auc > 0.5"), {"auc": float("nan")}, None)
    assert nan[0]["holds"] is False  # an undefined metric never passes
    with pytest.raises(InvalidInput, match="no metric 'f1'"):
        check_gate(parse_gate("f1 > 0.5"), {"auc": 0.9}, None)
    with pytest.raises(Conflict, match="has none"):
        check_gate(rule, {"auc": 0.9, "logloss": 0.3}, None)


def test_promote_moves_the_alias_only_when_the_gate_holds(cli, registry_home: str) -> None:  # type: ignore[no-untyped-def]
    home = ["--home", registry_home]
    assert cli("models", "alias", "set", "churn", "champion", "1", *home).code == 0
    base = ["models", "promote", "--to", "champion", "--dataset", "churn@1", "--json", *home]

    refused = cli(*base[:2], "churn/2", *base[2:], "--gate", "auc >= champion.auc + 0.5")
    assert refused.code == 1
    report = refused.json()
    assert report["passed"] is False and report["dataset"] == "churn@1"
    assert set(report["metrics"]) == {"candidate", "champion"}
    assert report["metrics"]["candidate"]["auc"] > 0.9
    assert cli("models", "show", "churn@champion", "--json", *home).json()["version"] == 1

    gate = "auc >= champion.auc - 0.05 and logloss <= 1"
    promoted = cli(*base[:2], "churn/2", *base[2:], "--gate", gate, "--reason", "weekly")
    assert promoted.code == 0, promoted.err
    assert promoted.json()["passed"] is True
    assert cli("models", "show", "churn@champion", "--json", *home).json()["version"] == 2
    last = cli("models", "alias", "history", "churn", "--json", *home).json()[-1]
    assert (last["from_version"], last["to_version"], last["reason"]) == (1, 2, "weekly")
    assert last["report"]["metrics"]["champion"]["auc"] == report["metrics"]["champion"]["auc"]
    assert last["report"]["dataset"] == "churn@1" and last["report"]["gate"] == gate

    same = cli(*base[:2], "churn/2", *base[2:], "--gate", "auc > 0")
    assert same.code == 4 and "already is churn@champion" in same.err
    no_holder = cli(
        "models", "promote", "churn/2", "--to", "staging", "--dataset", "churn@1",
        "--gate", "auc >= staging.auc", *home,
    )  # fmt: skip
    assert no_holder.code == 4 and "does not exist yet" in no_holder.err
    no_data = cli(*base[:2], "churn/1", *base[2:], "--gate", "auc > 0", "--dataset", "nope@1")
    assert no_data.code == 3
    cli("models", "alias", "rm", "churn", "champion", *home)
    cli("deployments", "deploy", "churn", "--model", "churn/2", *home)
    assert cli("models", "archive", "churn/1", *home).code == 0
    archived = cli(*base[:2], "churn/1", *base[2:], "--gate", "auc > 0")
    assert archived.code == 4 and "archived" in archived.err
