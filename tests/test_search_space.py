"""Search spaces for tuning and the ask/tell suggester: bounds checked naming the parameter,
plain values (never indices), parallel suggestions that differ, failures that never steer."""

from __future__ import annotations

import math

import pytest

from appliance.core.search_space import Suggester, grid_points, parse_space
from appliance.errors import InvalidInput

SPACE = {
    "num_leaves": {"randint": [8, 128]},
    "learning_rate": {"loguniform": [0.01, 0.3]},
    "feature_fraction": {"uniform": [0.5, 1.0]},
    "boosting": {
        "choice": ["gbdt", {"kind": {"choice": ["dart"]}, "drop_rate": {"uniform": [0.05, 0.3]}}]
    },
}


def test_bad_spaces_name_the_parameter() -> None:
    cases = [
        ({"lr": {"gaussian": [0, 1]}}, "space.lr: unknown distribution 'gaussian'"),
        ({"lr": {"uniform": [1, 1]}}, r"space.lr: uniform needs low < high, got \[1, 1\]"),
        ({"lr": {"loguniform": [0, 1]}}, "space.lr: loguniform needs a positive low bound"),
        ({"lr": {"qloguniform": [-1, 1, 0.1]}}, "space.lr: qloguniform needs a positive low"),
        ({"lr": {"quniform": [0, 1, 0]}}, "space.lr: quniform needs q > 0"),
        ({"lr": {"normal": [0, 0]}}, "space.lr: normal needs sigma > 0"),
        ({"n": {"randint": [1.5, 4]}}, "space.n: randint takes whole numbers"),
        ({"lr": {"uniform": [0, "x"]}}, "space.lr.high: expected a finite number"),
        ({"lr": {"uniform": [0]}}, r"space.lr: uniform takes \[low, high\]"),
        ({"b": {"choice": []}}, "space.b: choice needs a non-empty list"),
        ({"b": {"choice": [{"x": {"uniform": [2, 1]}}]}}, r"space.b\[0\].x: uniform needs low"),
        ({}, "space: expected a mapping"),
        (  # would collide with hyperopt's label for the nested x
            {"m": {"choice": [{"x": {"uniform": [0, 1]}}]}, "m.0.x": {"uniform": [0, 1]}},
            "space.m.0.x: a parameter name must be non-empty text without '.'",
        ),
    ]
    for spec, needle in cases:
        with pytest.raises(InvalidInput, match=needle):
            parse_space(spec)


@pytest.mark.parametrize("algorithm", ["tpe", "random", "anneal"])
def test_suggestions_are_plain_values_within_bounds_and_parallel_asks_differ(
    algorithm: str,
) -> None:
    suggester = Suggester(parse_space(SPACE), algorithm, seed=3)
    first, second = suggester.ask(), suggester.ask()  # both pending: asked in parallel
    assert first is not None and second is not None
    assert first["params"] != second["params"]
    for trial in (first, second):
        p = trial["params"]
        assert type(p["num_leaves"]) is int and 8 <= p["num_leaves"] <= 128
        assert type(p["learning_rate"]) is float and 0.01 <= p["learning_rate"] <= 0.3
        assert 0.5 <= p["feature_fraction"] <= 1.0
        # a choice comes back as the option itself (a value or a nested mapping), not an index
        assert p["boosting"] == "gbdt" or (
            p["boosting"]["kind"] == "dart" and 0.05 <= p["boosting"]["drop_rate"] <= 0.3
        )


def test_tpe_learns_from_told_results_and_failures_never_steer() -> None:
    space = parse_space({"x": {"uniform": [-10, 10]}, "y": {"uniform": [-10, 10]}})
    suggester = Suggester(space, "tpe", seed=1)
    best = math.inf
    for i in range(60):
        trial = suggester.ask()
        assert trial is not None
        x, y = trial["params"]["x"], trial["params"]["y"]
        if i % 7 == 3:
            suggester.tell(trial["trial"], None, "failed")  # kept out of the model
            continue
        loss = (x - 3) ** 2 + (y + 2) ** 2
        best = min(best, loss)
        suggester.tell(trial["trial"], loss)
    assert best < 2.0  # random search on this box rarely gets there in 50 tries
    with pytest.raises(InvalidInput, match="trial 999: never asked for"):
        suggester.tell(999, 1.0)


def test_grid_enumerates_discrete_spaces_and_refuses_continuous_ones() -> None:
    space = parse_space(
        {"n": {"randint": [1, 3]}, "q": {"quniform": [0, 1, 0.5]}, "b": {"choice": ["a", "b"]}}
    )
    points = grid_points(space)
    assert len(points) == 3 * 3 * 2 and points[0] == {"n": 1, "q": 0.0, "b": "a"}
    suggester = Suggester(space, "grid")
    asked = [suggester.ask() for _ in range(len(points))]
    assert [a["params"] for a in asked if a] == points and suggester.ask() is None
    with pytest.raises(InvalidInput, match="space.lr: grid needs a discrete space"):
        Suggester(parse_space({"lr": {"uniform": [0, 1]}}), "grid")
    with pytest.raises(InvalidInput, match="algorithm: 'bayes' is not one of"):
        Suggester(space, "bayes")


@pytest.mark.parametrize("algorithm", ["tpe", "random", "anneal"])
def test_quantized_and_normal_values_stay_in_their_support(algorithm: str) -> None:
    # hyperopt's qloguniform rounds exp(u) to q and can fall below low (to 0 even): the
    # values a trial gets are multiples of q within [low, high], ints for a whole step
    space = parse_space(
        {
            "leaves": {"qloguniform": [1, 100, 5]},
            "rate": {"qloguniform": [0.01, 1, 0.05]},
            "depth": {"quniform": [0.3, 2.2, 0.5]},
            "shift": {"normal": [0, 1]},
        }
    )
    suggester = Suggester(space, algorithm, seed=0)
    seen = []
    for _ in range(150):
        trial = suggester.ask()
        assert trial is not None
        seen.append(trial["params"])
        suggester.tell(trial["trial"], trial["params"]["shift"] ** 2)
    assert all(type(p["leaves"]) is int and 5 <= p["leaves"] <= 100 for p in seen)
    assert all(p["leaves"] % 5 == 0 for p in seen)
    assert all(0.05 <= p["rate"] <= 1 and round(p["rate"] / 0.05, 6).is_integer() for p in seen)
    assert {p["depth"] for p in seen} <= {0.5, 1.0, 1.5, 2.0}
    assert all(type(p["shift"]) is float for p in seen)
    assert any(abs(p["shift"]) > 1 for p in seen)  # unbounded, unlike the others
    with pytest.raises(InvalidInput, match=r"space.x: no multiple of q=5 lies in \[1, 2\]"):
        parse_space({"x": {"quniform": [1, 2, 5]}})


def test_grid_enumerates_quantized_log_spaces() -> None:
    points = grid_points(parse_space({"r": {"qloguniform": [0.01, 0.2, 0.05]}}))
    assert points == [{"r": 0.05}, {"r": 0.1}, {"r": 0.15}, {"r": 0.2}]


def test_options_sharing_a_name_each_keep_their_own_values() -> None:
    space = parse_space(
        {"b": {"choice": [{"n": {"quniform": [8, 32, 8]}}, {"n": {"quniform": [64, 256, 64]}}]}}
    )
    suggester = Suggester(space, "random", seed=0)
    for _ in range(40):
        trial = suggester.ask()
        assert trial is not None
        n = trial["params"]["b"]["n"]
        if trial["vals"]["b"] == [1]:  # the option hyperopt chose decides the bounds
            assert n in (64, 128, 192, 256)
        else:
            assert n in (8, 16, 24, 32)


def test_parameters_taken_together_must_not_share_a_name() -> None:
    with pytest.raises(InvalidInput, match="space.b: parameter 'x' is also set by space.x"):
        parse_space({"x": {"uniform": [-3, -2]}, "b": {"choice": [{"x": {"uniform": [10, 11]}}]}})
    with pytest.raises(InvalidInput, match=r"space.b\[0\].c: parameter 'y' is also set by"):
        parse_space(
            {
                "b": {
                    "choice": [
                        {"y": {"uniform": [0, 1]}, "c": {"choice": [{"y": {"uniform": [2, 3]}}]}}
                    ]
                }
            }
        )
