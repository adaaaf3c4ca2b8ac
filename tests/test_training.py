"""Training inputs: missing values stay missing, whatever the column type."""

from __future__ import annotations

import math

import duckdb

from appliance.core.training import build_signature


def test_nulls_from_duckdb_become_missing_values() -> None:
    data = duckdb.sql(
        "SELECT * FROM (VALUES (1.5, 'a'), (NULL, NULL), (3.0, 'b')) t(x, k)"
    ).fetchnumpy()
    schema = [{"name": "x", "type": "DOUBLE"}, {"name": "k", "type": "VARCHAR"}]
    signature, matrix = build_signature(schema, ["x", "k"], data)
    assert signature[1] == {"name": "k", "type": "category", "categories": ["a", "b"]}
    assert matrix[0].tolist() == [1.5, 0.0] and matrix[2].tolist() == [3.0, 1.0]
    assert math.isnan(matrix[1][0]) and math.isnan(matrix[1][1])
