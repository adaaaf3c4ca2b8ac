"""The same lifecycle with the s3 backend: jobs and the model server read and write over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.core.context import Appliance
from appliance.core.quickstart import run_quickstart
from appliance.store.objects import S3ObjectStore

from .test_objects import s3_endpoint  # noqa: F401  (module-scoped moto server fixture)


@pytest.mark.slow
def test_quickstart_on_s3(s3_endpoint: str, tmp_path: Path, monkeypatch) -> None:  # noqa: F811  # type: ignore[no-untyped-def]
    env = {
        "APPLIANCE_STORE": "s3",
        "APPLIANCE_S3_ENDPOINT": s3_endpoint,
        "APPLIANCE_S3_BUCKET": "lifecycle",
        "APPLIANCE_S3_ACCESS_KEY": "test",
        "APPLIANCE_S3_SECRET_KEY": "testtest",
        "APPLIANCE_S3_SECURE": "false",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # inherited by job supervisors and the model server
    app = Appliance.open(tmp_path / "h")
    summary = run_quickstart(app)
    assert summary["rollback_ok"] and all(m["auc"] > 0.9 for m in summary["models"])
    store = app.objects
    assert isinstance(store, S3ObjectStore)
    keys = {o.object_name for o in store.client.list_objects("lifecycle", recursive=True)}
    assert len(keys) == 3  # the dataset's Parquet and two model files, nothing temporary
    assert not (tmp_path / "h" / "objects").exists()
    app.close()


def test_import_from_an_s3_url_through_offline_httpfs(
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    import io

    from appliance.core.datasets import import_data

    env = {
        "APPLIANCE_STORE": "s3",
        "APPLIANCE_S3_ENDPOINT": s3_endpoint,
        "APPLIANCE_S3_BUCKET": "landing",
        "APPLIANCE_S3_ACCESS_KEY": "test",
        "APPLIANCE_S3_SECRET_KEY": "testtest",
        "APPLIANCE_S3_SECURE": "false",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    app = Appliance.open(tmp_path / "h")
    store = app.objects
    assert isinstance(store, S3ObjectStore)
    body = b"id,v\n1,a\n2,b\n3,c\n"
    store.client.put_object("landing", "raw/events.csv", io.BytesIO(body), len(body))
    version = import_data(app, "events", "s3://landing/raw/events.csv")
    assert version["row_count"] == 3 and version["source"] == "s3://landing/raw/events.csv"
    app.close()
