"""Settings: defaults < appliance.toml in the home < APPLIANCE_* environment < flags.

Everything the platform keeps lives under one home directory, so a backup or a wipe is one path.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from appliance.errors import InvalidInput

DEFAULT_HOME = Path("~/.local/share/appliance")
CONFIG_FILE = "appliance.toml"


@dataclass(frozen=True)
class S3Settings:
    """Where the s3 object-store backend talks to (MinIO or any S3 server)."""

    endpoint: str = "127.0.0.1:9000"
    bucket: str = "appliance"
    access_key: str = ""
    secret_key: str = ""
    secure: bool = False
    region: str = "us-east-1"


@dataclass(frozen=True)
class K3sSettings:
    """How the k3s executor and serving backend reach the cluster (cluster mode only)."""

    namespace: str = "appliance"
    image: str = "appliance-runtime:0.1.0"  # imported from the bundle on every node: never pulled
    kubeconfig: str = ""  # empty: KUBECONFIG, else /etc/rancher/k3s/k3s.yaml on a server


EXECUTORS = ("local", "k3s")


@dataclass(frozen=True)
class Settings:
    """The resolved configuration of one appliance home."""

    home: Path
    store: str = "local"  # "local" or "s3"
    s3: S3Settings = field(default_factory=S3Settings)
    executor: str = "local"
    k3s: K3sSettings = field(default_factory=K3sSettings)

    @property
    def metadata_path(self) -> Path:
        return self.home / "metadata.db"

    @property
    def objects_dir(self) -> Path:
        return self.home / "objects"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_FILE


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise InvalidInput(f"{name}: expected true or false, got {value!r}")


def resolve_home(home: str | Path | None = None) -> Path:
    """The home directory: the flag, else APPLIANCE_HOME, else the per-user default."""
    raw = home if home is not None else os.environ.get("APPLIANCE_HOME") or DEFAULT_HOME
    path = Path(raw).expanduser()
    if path.exists() and not path.is_dir():
        source = "--home" if home is not None else "APPLIANCE_HOME"
        raise InvalidInput(f"{source} {path}: exists and is not a directory")
    return path.resolve()


def _from_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: invalid TOML: {exc}") from exc


_S3_ENV = {
    "endpoint": "APPLIANCE_S3_ENDPOINT",
    "bucket": "APPLIANCE_S3_BUCKET",
    "access_key": "APPLIANCE_S3_ACCESS_KEY",
    "secret_key": "APPLIANCE_S3_SECRET_KEY",
    "secure": "APPLIANCE_S3_SECURE",
    "region": "APPLIANCE_S3_REGION",
}


def load_settings(home: str | Path | None = None, **overrides: Any) -> Settings:
    """Resolve settings for a home; `overrides` are flags the user typed (None = not typed)."""
    home_path = resolve_home(home)
    data = _from_file(home_path / CONFIG_FILE)
    unknown = set(data) - {"store", "s3", "executor", "k3s"}
    if unknown:
        raise InvalidInput(f"{home_path / CONFIG_FILE}: unknown key(s) {sorted(unknown)}")
    s3_raw = dict(data.get("s3", {}))
    bad = set(s3_raw) - {f.name for f in fields(S3Settings)}
    if bad:
        raise InvalidInput(f"{home_path / CONFIG_FILE}: unknown key(s) in [s3]: {sorted(bad)}")
    for key, env in _S3_ENV.items():
        if env in os.environ:
            s3_raw[key] = os.environ[env]
    if "secure" in s3_raw:
        s3_raw["secure"] = _as_bool("s3.secure", s3_raw["secure"])
    k3s_raw = dict(data.get("k3s", {}))
    bad = set(k3s_raw) - {f.name for f in fields(K3sSettings)}
    if bad:
        raise InvalidInput(f"{home_path / CONFIG_FILE}: unknown key(s) in [k3s]: {sorted(bad)}")
    for key in ("namespace", "image", "kubeconfig"):
        env = f"APPLIANCE_K3S_{key.upper()}"
        if env in os.environ:
            k3s_raw[key] = os.environ[env]
        if not isinstance(k3s_raw.get(key, ""), str):
            raise InvalidInput(f"k3s.{key}: expected a string, got {k3s_raw[key]!r}")
    store = os.environ.get("APPLIANCE_STORE", data.get("store", "local"))
    executor = os.environ.get("APPLIANCE_EXECUTOR", data.get("executor", "local"))
    settings = Settings(
        home=home_path,
        store=store,
        s3=S3Settings(**s3_raw),
        executor=executor,
        k3s=K3sSettings(**k3s_raw),
    )
    typed = {k: v for k, v in overrides.items() if v is not None}
    if typed:
        settings = replace(settings, **typed)
    if settings.store not in ("local", "s3"):
        raise InvalidInput(f"store: expected 'local' or 's3', got {settings.store!r}")
    if settings.executor not in EXECUTORS:
        raise InvalidInput(
            f"executor: expected one of {list(EXECUTORS)}, got {settings.executor!r}"
        )
    return settings
