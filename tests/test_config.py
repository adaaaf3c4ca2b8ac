from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import load_settings
from appliance.errors import InvalidInput


def test_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "appliance.toml").write_text(
        'store = "s3"\n[s3]\nendpoint = "files:9000"\nbucket = "from-file"\nsecure = true\n'
    )
    settings = load_settings(home)
    assert (settings.store, settings.s3.endpoint, settings.s3.secure) == ("s3", "files:9000", True)

    monkeypatch.setenv("APPLIANCE_S3_BUCKET", "from-env")
    monkeypatch.setenv("APPLIANCE_S3_SECURE", "false")
    settings = load_settings(home)
    assert (settings.s3.bucket, settings.s3.secure, settings.s3.endpoint) == (
        "from-env",
        False,
        "files:9000",
    )
    assert load_settings(home, store="local").store == "local"


def test_home_from_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "env-home"))
    assert load_settings().home == (tmp_path / "env-home").resolve()
    monkeypatch.delenv("APPLIANCE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings().home == (tmp_path / ".local/share/appliance").resolve()


@pytest.mark.parametrize(
    "content, field",
    [
        ('store = "ftp"', "store"),
        ("nonsense = 1", "unknown key"),
        ('[s3]\nsecure = "maybe"', "s3.secure"),
        ("store = ", "invalid TOML"),
        ('executor = "slurm"', "executor: expected one of"),
        ("[k3s]\nnamepsace = 'x'", r"unknown key\(s\) in \[k3s\]"),
        ("[k3s]\nimage = 3", "k3s.image: expected a string"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, content: str, field: str) -> None:
    (tmp_path / "appliance.toml").write_text(content)
    with pytest.raises(InvalidInput, match=field):
        load_settings(tmp_path)


def test_cluster_mode_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "appliance.toml").write_text(
        'executor = "k3s"\n[k3s]\nnamespace = "ml"\nkubeconfig = "/etc/appliance/kube"\n'
    )
    settings = load_settings(tmp_path)
    assert settings.executor == "k3s"
    assert (settings.k3s.namespace, settings.k3s.kubeconfig) == ("ml", "/etc/appliance/kube")
    assert settings.k3s.image == "appliance-runtime:0.1.0"  # the bundle's image by default
    monkeypatch.setenv("APPLIANCE_K3S_IMAGE", "appliance-runtime:0.2.0")
    assert load_settings(tmp_path).k3s.image == "appliance-runtime:0.2.0"
