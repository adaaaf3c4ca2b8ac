"""The registry: references, alias moves with history, archive, tags and model cards."""

from __future__ import annotations


def test_references_and_register_json(cli, registry_home: str) -> None:  # type: ignore[no-untyped-def]
    home = ["--home", registry_home]
    by_slash = cli("models", "show", "churn/2", "--json", *home).json()
    assert by_slash["version"] == 2 and by_slash["name"] == "churn"
    assert cli("models", "show", "churn@2", "--json", *home).json()["id"] == by_slash["id"]
    assert cli("models", "show", "churn", "--json", *home).json()["version"] == 2  # latest
    bad = cli("models", "show", "churn/two", *home)
    assert bad.code == 2 and "NAME/VERSION" in bad.err
    missing = cli("models", "show", "churn/9", *home)
    assert missing.code == 3 and "churn/9" in missing.err

    run_id = by_slash["run_id"]
    again = cli("models", "register", "churn", "--run", run_id, "--json", *home)
    assert again.code == 0
    assert {k: again.json()[k] for k in ("name", "version")} == {"name": "churn", "version": 3}


def test_alias_moves_are_kept_with_from_to_who_and_why(cli, registry_home: str) -> None:  # type: ignore[no-untyped-def]
    home = ["--home", registry_home]
    first = cli("models", "alias", "set", "churn", "champion", "1", "--reason", "first", *home)
    assert first.code == 0, first.err
    moved = cli(
        "models", "alias", "set", "churn", "champion", "churn/2", "--reason", "better auc", *home
    )
    assert moved.code == 0, moved.err
    cli("models", "alias", "set", "churn", "challenger", "1", *home)
    assert cli("models", "show", "churn@champion", "--json", *home).json()["version"] == 2
    removed = cli(
        "models", "alias", "rm", "churn", "challenger", "--reason", "done", "--json", *home
    )
    assert removed.json() == {"model": "churn", "alias": "challenger", "removed_from": 1}

    history = cli("models", "alias", "history", "churn", "--json", *home).json()
    moves = [(h["alias"], h["from_version"], h["to_version"], h["reason"]) for h in history]
    assert moves == [
        ("champion", None, 1, "first"),
        ("champion", 1, 2, "better auc"),
        ("challenger", None, 1, None),
        ("challenger", 1, None, "done"),
    ]
    assert all(h["actor"] and h["changed_at"] for h in history)
    only = cli("models", "alias", "history", "churn", "--alias", "champion", "--json", *home)
    assert len(only.json()) == 2

    numeric = cli("models", "alias", "set", "churn", "7", "1", *home)
    assert numeric.code == 2 and "must not be a number" in numeric.err
    other = cli("models", "alias", "set", "churn", "champion", "other/1", *home)
    assert other.code == 3 and "'other/1' not found" in other.err


def test_archive_is_refused_while_used_and_then_blocks_aliases_and_deploys(
    cli, registry_home: str
) -> None:  # type: ignore[no-untyped-def]
    home = ["--home", registry_home]
    served = cli("models", "archive", "churn/1", *home)
    assert served.code == 4 and "deployment(s) churn" in served.err
    cli("models", "alias", "set", "churn", "champion", "2", *home)
    aliased = cli("models", "archive", "churn/2", *home)
    assert aliased.code == 4 and "champion" in aliased.err
    cli("models", "alias", "rm", "churn", "champion", *home)

    archived = cli("models", "archive", "churn/2", "--reason", "leaks a feature", "--json", *home)
    assert archived.code == 0, archived.err
    assert archived.json()["archived_at"] and archived.json()["archive_reason"] == "leaks a feature"
    again = cli("models", "archive", "churn/2", *home)
    assert again.code == 4 and "already archived" in again.err
    alias = cli("models", "alias", "set", "churn", "champion", "2", *home)
    assert alias.code == 4 and "archived" in alias.err
    deploy = cli("deployments", "deploy", "churn", "--model", "churn/2", *home)
    assert deploy.code == 4 and "archived" in deploy.err
    revisions = cli("deployments", "show", "churn", "--json", *home).json()
    assert revisions["current_revision"] == 3 and len(revisions["revisions"]) == 3  # unchanged


def test_tags_and_the_model_card(cli, registry_home: str) -> None:  # type: ignore[no-untyped-def]
    home = ["--home", registry_home]
    tags = cli("models", "tag", "churn/2", "owner=ml-team", "stage=review", "--json", *home)
    assert tags.json() == {"owner": "ml-team", "stage": "review"}
    tags = cli("models", "tag", "churn/2", "stage=approved", "--rm", "owner", "--json", *home)
    assert tags.json() == {"stage": "approved"}
    bad = cli("models", "tag", "churn/2", "no-equals", *home)
    assert bad.code == 2 and "KEY=VALUE" in bad.err

    card = cli("models", "card", "churn/2", *home).out
    assert card.startswith("# churn version 2\n")
    for needed in (
        "- flavor: lightgbm",
        "- training data: dataset churn@1",
        "| auc |",
        "## Inputs",
    ):
        assert needed in card, needed
    assert "| tenure_months | double |  |" in card
    assert "| contract | category | month-to-month, one-year, two-year |" in card
    assert "## Environment" in card and "- lightgbm:" in card
