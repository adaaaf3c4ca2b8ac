"""Canary, automatic rollback, alias following, worker processes and the traffic figures, on
real servers over 127.0.0.1."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from appliance.core import deployments, registry
from appliance.core.context import Appliance
from appliance.core.quickstart import sample_rows
from appliance.core.traffic import BOUNDS, Window, merge, parse_rule, quantile, window
from appliance.errors import ApplianceError, Conflict, InvalidInput, NotFound
from tests.clients import predict


@pytest.fixture(scope="module")
def app(trained_home: Path) -> Iterator[Appliance]:
    appliance = Appliance.open(trained_home)
    yield appliance
    for dep in deployments.list_deployments(appliance):
        if dep["state"] == "serving":
            deployments.stop_deployment(appliance, dep["name"])
    appliance.close()


def until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.05)


def test_canary_splits_sticky_counts_apart_and_promotes(app: Appliance) -> None:
    dep = deployments.create_deployment(app, "canary-a", "churn@1")
    url = dep["url"]
    with_canary = deployments.deploy_model(app, "churn@2", "canary-a", canary=30)
    assert with_canary["canary_version"] == 2 and with_canary["canary_percent"] == 30
    assert with_canary["model_version"] == 1 and with_canary["current_revision"] == 1

    seen = Counter(predict(url, request_id=f"user-{i}") for i in range(300))
    assert set(seen) == {"1", "2"} and 50 <= seen["2"] <= 130, seen  # ~30% of 300
    for rid in ("user-1", "user-2", "user-3"):  # sticky: one id, one version
        assert len({predict(url, request_id=rid) for _ in range(8)}) == 1
    with urllib.request.urlopen(url + "/v2/models/churn", timeout=10) as response:
        assert json.loads(response.read())["versions"] == ["1", "2"]
    assert predict(url, version=2) == "2" and predict(url, version=1) == "1"

    live = until(lambda: (t := deployments.traffic(app, "canary-a"))["canary"]["requests"] and t)
    assert live["stable"]["requests"] > 0 and live["canary"]["p99_ms"] is not None
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'version="2",role="canary",code="200"' in metrics
    assert 'version="1",role="stable",code="200"' in metrics

    with pytest.raises(Conflict, match="canary revision 2"):
        deployments.deploy(app, "canary-a", "churn@1")
    promoted = deployments.promote_canary(app, "canary-a", reason="looks good")
    assert promoted["current_revision"] == 2 and promoted["canary_revision"] is None
    assert {predict(url, request_id=f"user-{i}") for i in range(30)} == {"2"}
    history = deployments.list_revisions(app, "canary-a")
    assert [(h["revision"], h["action"], h["outcome"]) for h in history] == [
        (1, "deploy", None),
        (2, "canary", "promoted"),
    ]
    assert history[1]["reason"] == "looks good" and history[1]["actor"]
    with pytest.raises(Conflict, match="no canary to promote"):
        deployments.promote_canary(app, "canary-a")
    with pytest.raises(Conflict, match="no canary to abort"):
        deployments.abort_canary(app, "canary-a")
    deployments.stop_deployment(app, "canary-a")


def test_abort_keeps_why_and_an_aborted_canary_is_no_rollback_target(app: Appliance) -> None:
    dep = deployments.create_deployment(app, "canary-b", "churn@1")
    deployments.deploy_model(app, "churn@2", "canary-b", canary=50)
    aborted = deployments.abort_canary(app, "canary-b", reason="latency regression")
    assert aborted["canary_revision"] is None and aborted["model_version"] == 1
    assert {predict(dep["url"], request_id=f"u{i}") for i in range(20)} == {"1"}
    last = deployments.list_revisions(app, "canary-b")[-1]
    assert (last["outcome"], last["reason"]) == ("aborted", "latency regression")
    before = deployments.list_revisions(app, "canary-b")
    with pytest.raises(Conflict, match="no earlier revision"):
        deployments.rollback(app, "canary-b")
    assert deployments.list_revisions(app, "canary-b") == before
    deployments.deploy(app, "canary-b", "churn@2")  # revision 3
    with pytest.raises(NotFound, match="aborted canary cannot be a rollback target"):
        deployments.rollback(app, "canary-b", to_revision=2)
    assert deployments.rollback(app, "canary-b")["model_version"] == 1  # revision 1's version
    deployments.stop_deployment(app, "canary-b")


def test_a_canary_that_breaks_its_rule_is_rolled_back_by_the_server(app: Appliance) -> None:
    dep = deployments.create_deployment(app, "canary-c", "churn@1")
    deployments.deploy_model(
        app, "churn@2", "canary-c", canary=50, auto_rollback="p99_ms > 0.001", window="5s"
    )
    for i in range(80):  # ~40 canary requests: every one slower than a microsecond
        predict(dep["url"], request_id=f"r{i}")
    rolled = until(
        lambda: (d := deployments.get_deployment(app, "canary-c"))["canary_revision"] is None and d,
        timeout=15,
    )
    assert rolled["model_version"] == 1
    canary = deployments.list_revisions(app, "canary-c")[-1]
    assert canary["outcome"] == "aborted" and canary["actor"] == "server"
    assert canary["reason"].startswith("auto-rollback: p99_ms")
    assert "canary requests" in canary["reason"]
    assert {predict(dep["url"], request_id=f"r{i}") for i in range(20)} == {"1"}
    deployments.stop_deployment(app, "canary-c")


def test_canary_requests_are_checked(app: Appliance) -> None:
    deployments.create_deployment(app, "canary-d", "churn@1", start=False)
    before = deployments.list_revisions(app, "canary-d")
    for kwargs, needle in [
        ({"canary": 0}, "--canary 0"),
        ({"canary": 100}, "--canary 100"),
        (
            {"canary": 10, "auto_rollback": "errors > 1"},
            "--auto-rollback: cannot read 'errors > 1'",
        ),
        ({"canary": 10, "auto_rollback": "p99_ms > 5", "window": "2h"}, "--window 2h"),
        (
            {"canary": 10, "auto_rollback": "error_rate > 0.5 or p99_ms > 1" + "0" * 400},
            "--auto-rollback: p99_ms's threshold is not a finite number",
        ),
        ({"auto_rollback": "p99_ms > 5"}, "only with --canary"),
    ]:
        with pytest.raises(InvalidInput, match=needle.replace("(", r"\(")):
            deployments.deploy_model(app, "churn@2", "canary-d", **kwargs)
    with pytest.raises(Conflict, match="already the stable version"):
        deployments.deploy_model(app, "churn@1", "canary-d", canary=10)
    with pytest.raises(InvalidInput, match="does not exist yet"):
        deployments.deploy_model(app, "churn@2", "canary-new", canary=10)
    assert deployments.list_revisions(app, "canary-d") == before


def test_follow_alias_deploys_when_the_alias_moves(app: Appliance) -> None:
    registry.set_alias(app, "churn", "staging", 1, reason="first")
    dep = deployments.deploy_model(app, "churn@staging", "follower", follow_alias=True)
    assert dep["follow_alias"] == "staging" and dep["model_version"] == 1
    moved = registry.set_alias(app, "churn", "staging", 2, reason="better")
    assert moved["deployments_followed"] == ["follower"]
    assert predict(dep["url"]) == "2"  # the alias move returned after the swap
    last = deployments.list_revisions(app, "follower")[-1]
    assert (last["action"], last["model_version"]) == ("follow", 2)
    assert "churn@staging moved" in last["reason"]
    with pytest.raises(InvalidInput, match="names a version"):
        deployments.deploy_model(app, "churn/1", "follower", follow_alias=True)
    pinned = deployments.deploy_model(app, "churn/1", "follower")  # pinned by hand
    assert pinned["follow_alias"] is None and pinned["model_version"] == 1
    assert registry.set_alias(app, "churn", "staging", 1)["deployments_followed"] == []
    deployments.stop_deployment(app, "follower")


def test_every_worker_serves_the_new_revision_when_deploy_returns(app: Appliance) -> None:
    dep = deployments.create_deployment(app, "multi", "churn@1", workers=2)
    snapshots = list((app.settings.home / "run" / "deployments" / "multi").glob("worker-*.json"))
    assert len(snapshots) == 2 and dep["workers"] == 2
    for target, action in (("2", "deploy"), ("1", "rollback"), ("2", "deploy")):
        if action == "deploy":
            deployments.deploy(app, "multi", f"churn@{target}")
        else:
            deployments.rollback(app, "multi")
        # fresh connections land on either worker: every one already answers the target
        assert {predict(dep["url"]) for _ in range(24)} == {target}
    with pytest.raises(Conflict, match="keeps its address and workers"):
        deployments.deploy_model(app, "churn@1", "multi", workers=3)
    deployments.stop_deployment(app, "multi")
    assert not list((app.settings.home / "run" / "deployments" / "multi").glob("worker-*"))


def test_deployments_list_shows_revision_version_port_state_and_traffic(
    app: Appliance,
    cli,  # type: ignore[no-untyped-def]
) -> None:
    dep = deployments.create_deployment(app, "listed", "churn@1")
    for i in range(40):
        predict(dep["url"], request_id=str(i))
    row = until(
        lambda: next(
            (r for r in deployments.list_deployments(app) if r["name"] == "listed" and r["rps"]),
            None,
        ),
        timeout=15,
    )
    assert row["revision"] == 1 and row["model_version"] == 1 and row["state"] == "serving"
    assert row["port"] == dep["port"] and row["url"] == dep["url"]
    assert row["rps"] > 0 and row["p99_ms"] > 0 and row["error_rate"] == 0
    listed = cli("deployments", "list", "--json", "--home", str(app.settings.home))
    assert listed.code == 0, listed.err
    row = next(r for r in listed.json() if r["name"] == "listed")
    assert {"name", "url", "revision", "model_version", "state", "rps", "p99_ms"} <= set(row)
    table = cli("deployments", "list", "--home", str(app.settings.home))
    assert "P99_MS" in table.out.upper() and "listed" in table.out
    deployments.stop_deployment(app, "listed")


def test_a_100_mb_body_is_refused_before_it_is_read(app: Appliance) -> None:
    dep = deployments.create_deployment(app, "big", "churn@1")
    with socket.create_connection(("127.0.0.1", dep["port"]), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/churn/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n" + b"{" * 65536
        )
        answer = b""
        while b"byte limit" not in answer:  # the head and the body may come apart
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413") and "byte limit" in answer
    assert predict(dep["url"]) == "1"  # and it keeps serving
    deployments.stop_deployment(app, "big")


def test_rules_windows_and_quantiles() -> None:
    rule = parse_rule("error_rate > 0.01 or p99_ms >= 50")
    assert rule.breach(Window(requests=5, errors=5)) is None  # too few to judge
    assert "error_rate 0.2 > 0.01" in (rule.breach(Window(requests=50, errors=10)) or "")
    assert rule.breach(Window(requests=50, p99_ms=50.0)) is not None
    assert rule.breach(Window(requests=50, p99_ms=49.9)) is None
    # two workers' snapshots merge into one window; the current second is left out
    now = 1_000_000
    hist = [0] * (len(BOUNDS) + 1)
    hist[4] = 10  # 0.75 ms < t <= 1 ms
    series = {
        "version": 3,
        "role": "canary",
        "codes": {"200": 10},
        "hist": hist,
        "sum": 0.009,
        "seconds": {str(now - 1): [10, 1, 0, *hist], str(now): [10, 0, 0, *hist]},
    }
    merged = merge([{"traffic": {"series": [series]}}, {"traffic": {"series": [series]}}])
    stats = window(merged, 10, role="canary", now=now)
    assert (stats.requests, stats.errors) == (20, 2)
    assert 0.75 < (stats.p99_ms or 0) <= 1.0
    assert quantile([0] * len(hist), 0.99) is None


def test_rollback_under_load_loses_no_request(app: Appliance) -> None:
    """20 deploy/rollback cycles under 8 connections of closed-loop load: zero failures, and
    each swap has taken effect (the next request gets the target) when the command returns."""
    from benchmarks.loadgen import http_request, run_load

    dep = deployments.create_deployment(app, "loaded", "churn@1")
    features, rows = sample_rows(1)
    body = json.dumps({"dataframe_split": {"columns": features, "data": rows}}).encode()
    swaps: list[float] = []
    wrong: list[str] = []

    def cycles() -> None:
        for i in range(40):
            target = "2" if i % 2 == 0 else "1"
            started = time.perf_counter()
            if target == "2":
                deployments.deploy(app, "loaded", "churn@2")
            else:
                deployments.rollback(app, "loaded")
            swaps.append(time.perf_counter() - started)
            answered = predict(dep["url"])
            if answered != target:
                wrong.append(f"cycle {i}: {answered} instead of {target}")

    result = run_load(
        dep["port"], http_request("/invocations", body), connections=8, seconds=120, during=cycles
    )
    deployments.stop_deployment(app, "loaded")
    assert result.failures == 0, result.errors[:5]
    assert result.requests > 200 and not wrong, wrong
    # the next request already got the target when each command returned; how fast that is
    # (the 100 ms target) is the benchmark's to measure on a quiet machine: here only the
    # median is held to it, and the slowest to a bound a busy CI machine cannot break
    swaps.sort()
    assert len(swaps) == 40 and swaps[20] < 0.1 and swaps[-1] < 1.0, swaps[-5:]
    history = deployments.list_revisions(app, "loaded")
    assert len(history) == 41 and history[-1]["action"] == "rollback"


def test_a_crashed_worker_is_replaced(app: Appliance) -> None:
    import os
    import signal

    dep = deployments.create_deployment(app, "phoenix", "churn@1", workers=2)
    directory = app.settings.home / "run" / "deployments" / "phoenix"
    pids = {int(p.stem.split("-")[1]) for p in directory.glob("worker-*.json")}
    os.kill(next(iter(pids)), signal.SIGKILL)
    until(
        lambda: (
            len({int(p.stem.split("-")[1]) for p in directory.glob("worker-*.json")} - pids) == 1
        ),
        timeout=20,
    )
    assert {predict(dep["url"]) for _ in range(10)} == {"1"}
    assert deployments.get_deployment(app, "phoenix")["pid"] == dep["pid"]  # same supervisor
    deployments.stop_deployment(app, "phoenix")


@contextmanager
def damaged(app: Appliance, ref: str) -> Iterator[None]:
    """The model file of `ref` altered on disk (its sha256 no longer matches) for a while."""
    sha = registry.get_model_version(app, ref)["sha256"]
    path = app.settings.objects_dir / "sha256" / sha[:2] / sha
    original = path.read_bytes()
    path.write_bytes(original[:-10] + b"0123456789")
    try:
        yield
    finally:
        path.write_bytes(original)


def _state(app: Appliance, name: str) -> tuple[Any, ...]:
    dep = deployments.get_deployment(app, name)
    keys = ("current_revision", "canary_revision", "follow_alias", "generation")
    return (*(dep[k] for k in keys), len(deployments.list_revisions(app, name)))


def test_refused_commands_change_nothing_and_the_current_revision_keeps_serving(
    app: Appliance,
) -> None:
    registry.set_alias(app, "churn", "blue", 1)
    dep = deployments.deploy_model(app, "churn@blue", "refuse", follow_alias=True)
    url = dep["url"]
    with damaged(app, "churn/2"):
        before = _state(app, "refuse")
        with pytest.raises(ApplianceError, match="corrupted"):
            deployments.deploy_model(app, "churn/2", "refuse")  # would also unpin
        with pytest.raises(Conflict, match="churn@blue not moved: deployment"):
            registry.set_alias(app, "churn", "blue", 2)
        assert registry.get_model_version(app, "churn@blue")["version"] == 1
        assert _state(app, "refuse") == before and predict(url) == "1"
    deployments.deploy_model(app, "churn/2", "refuse")  # revision 2 (and pinned)
    deployments.rollback(app, "refuse")  # revision 3 serves version 1
    deployments.deploy_model(app, "churn/2", "refuse", canary=20)  # revision 4
    with damaged(app, "churn/2"):
        before = _state(app, "refuse")
        with pytest.raises(ApplianceError, match="corrupted"):
            deployments.rollback(app, "refuse", to_revision=2)  # it would end the canary too
        assert _state(app, "refuse") == before
    assert deployments.abort_canary(app, "refuse", expected=99)["canary_revision"] is not None
    with pytest.raises(Conflict, match="is served by deployment"):
        registry.archive_version(app, "churn/2")  # the canary serves it
    with pytest.raises(InvalidInput, match="--workers 0"):
        deployments.deploy_model(app, "churn/1", "fresh-name", workers=0)
    with pytest.raises(InvalidInput, match="--window: only with --canary"):
        deployments.deploy_model(app, "churn/1", "refuse", window="30s")
    with pytest.raises(InvalidInput, match="must not contain"):
        deployments.traffic(app, "../../etc")
    with pytest.raises(ApplianceError, match="not found"):
        deployments.traffic(app, "nowhere")
    deployments.abort_canary(app, "refuse")
    revisions = len(deployments.list_revisions(app, "refuse"))
    deployments.deploy(app, "refuse", "churn/1")  # already served: nothing to add
    assert len(deployments.list_revisions(app, "refuse")) == revisions
    deployments.stop_deployment(app, "refuse")


def test_a_moving_alias_ends_a_canary_on_a_follower_and_a_hand_deploy_pins(
    app: Appliance,
    cli,  # type: ignore[no-untyped-def]
) -> None:
    registry.set_alias(app, "churn", "green", 1)
    dep = deployments.deploy_model(app, "churn@green", "greenie", follow_alias=True)
    deployments.deploy_model(app, "churn/2", "greenie", canary=50)
    # pointing the alias where it already points is no move: the canary keeps running
    assert registry.set_alias(app, "churn", "green", 1)["deployments_followed"] == []
    assert deployments.get_deployment(app, "greenie")["canary_revision"] is not None
    assert registry.set_alias(app, "churn", "green", 2)["deployments_followed"] == ["greenie"]
    now = deployments.get_deployment(app, "greenie")
    assert now["canary_revision"] is None and now["model_version"] == 2
    history = deployments.list_revisions(app, "greenie")
    assert [(h["action"], h["outcome"]) for h in history[-2:]] == [
        ("canary", "aborted"),
        ("follow", None),
    ]
    assert "churn@green moved to churn@2" in history[-1]["reason"]
    home = ["--home", str(app.settings.home)]
    pinned = cli("deployments", "deploy", "greenie", "--model", "churn/1", "--json", *home)
    assert pinned.code == 0, pinned.err
    assert pinned.json()["follow_alias"] is None and predict(dep["url"]) == "1"
    typo = cli("deployments", "deploy", "greenei", "--model", "churn/1", *home)
    assert typo.code == 3 and "not found" in typo.err  # this verb never creates a deployment
    deployments.stop_deployment(app, "greenie")


def test_rollback_during_a_canary_ends_it_and_hand_choices_stop_following(
    app: Appliance,
) -> None:
    registry.set_alias(app, "churn", "amber", 1)
    dep = deployments.deploy_model(app, "churn@amber", "amber", follow_alias=True)
    deployments.deploy_model(app, "churn/2", "amber", canary=50)
    revisions = len(deployments.list_revisions(app, "amber"))
    back = deployments.rollback(app, "amber")
    assert back["canary_revision"] is None and back["model_version"] == 1
    assert len(deployments.list_revisions(app, "amber")) == revisions  # stable stays
    last = deployments.list_revisions(app, "amber")[-1]
    assert (last["outcome"], last["reason"]) == ("aborted", "rolled back")
    assert back["follow_alias"] == "amber"  # ending a canary chose nothing new
    assert {predict(dep["url"], request_id=f"a{i}") for i in range(20)} == {"1"}
    deployments.deploy_model(app, "churn/2", "amber", canary=50)
    promoted = deployments.promote_canary(app, "amber")
    assert promoted["model_version"] == 2 and promoted["follow_alias"] is None
    assert registry.set_alias(app, "churn", "amber", 2)["deployments_followed"] == []
    deployments.stop_deployment(app, "amber")


def test_a_worker_restarted_on_a_damaged_current_version_serves_the_previous_one(
    app: Appliance,
) -> None:
    import os
    import signal

    dep = deployments.create_deployment(app, "survivor", "churn@1")
    deployments.deploy(app, "survivor", "churn@2")
    directory = app.settings.home / "run" / "deployments" / "survivor"
    with damaged(app, "churn/2"):
        (first,) = directory.glob("worker-*.json")
        os.kill(int(first.stem.split("-")[1]), signal.SIGKILL)  # comes back on a broken file
        until(lambda: [p for p in directory.glob("worker-*.json") if p != first], timeout=20)
        assert predict(dep["url"]) == "1"  # the last live version, not nothing
        row = next(r for r in deployments.list_deployments(app) if r["name"] == "survivor")
        assert row["state"] == "degraded" and "revision 2 cannot be served" in row["degraded"][0]
        with pytest.raises(ApplianceError, match="did not adopt"):
            deployments.wait_served(app, "survivor", timeout=1)  # and it says it is behind
    deployments.deploy(app, "survivor", "churn@1")  # an explicit fix: adopted at once
    assert predict(dep["url"]) == "1"
    deployments.stop_deployment(app, "survivor")


def test_client_and_server_errors_are_counted_apart() -> None:
    from appliance.core.traffic import TrafficStats

    stats = TrafficStats()
    for status in (200, 200, 404, 500):
        stats.observe(3, "canary", status, 0.001)
    merged = merge([{"traffic": stats.snapshot()}])
    got = window(merged, 10, role="canary", now=time.time() + 1)
    assert (got.requests, got.errors, got.client_errors) == (4, 1, 1)
    assert got.error_rate == 0.25 and got.client_error_rate == 0.25
    assert parse_rule("client_error_rate > 0.1").terms == (("client_error_rate", ">", 0.1),)
    assert (
        window(merged, 10, role="canary", now=time.time() + 1, since=time.time() + 5).requests == 0  # noqa: E501
    )
