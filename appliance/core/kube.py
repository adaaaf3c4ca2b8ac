"""The one boundary to k3s: every `kubectl`/`k3s` call goes through `Kube`.

It finds the binary (`kubectl`, else `k3s kubectl`, the symlink and the multi-call binary a
k3s install provides), passes the kubeconfig explicitly, bounds each call with a timeout,
parses JSON output, and turns every failure into an error that names the command and quotes
its stderr. Tests put recording fakes first on PATH; nothing else in the package runs these
binaries.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.config import Settings

K3S_KUBECONFIG = Path("/etc/rancher/k3s/k3s.yaml")
DEFAULT_TIMEOUT = 15.0
INSTALL_HINT = (
    "k3s is not installed on this machine (no kubectl or k3s on PATH); install it with "
    "`sudo ./install.sh --server`, or join this machine to a server with "
    "`sudo ./install.sh --agent --server URL --token-file FILE` (offline: add `--bundle FILE`)"
)


class ClusterUnavailable(ApplianceError):
    """k3s is not installed, not running, or refused a command."""

    exit_code = 7


@dataclass(frozen=True)
class Kube:
    """How to reach the cluster: the kubeconfig (None: kubectl's own default) and a timeout."""

    kubeconfig: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_environment(cls, kubeconfig: str = "") -> Kube:
        """The kubeconfig given (settings' `k3s.kubeconfig`), else KUBECONFIG, else k3s' own
        kubeconfig when this machine is a k3s server."""
        configured = kubeconfig or os.environ.get("KUBECONFIG")
        if configured:
            return cls(configured)
        return cls(str(K3S_KUBECONFIG) if K3S_KUBECONFIG.exists() else None)

    @classmethod
    def for_settings(cls, settings: Settings) -> Kube:
        """The cluster a home works with: its `k3s.kubeconfig`, else as from_environment."""
        return cls.from_environment(settings.k3s.kubeconfig)

    def kubectl(self) -> list[str]:
        """The kubectl command line prefix: `kubectl`, or `k3s kubectl` on a bare k3s node."""
        if shutil.which("kubectl"):
            base = ["kubectl"]
        elif shutil.which("k3s"):
            base = ["k3s", "kubectl"]
        else:
            raise ClusterUnavailable(INSTALL_HINT)
        return [*base, *(["--kubeconfig", self.kubeconfig] if self.kubeconfig else [])]

    def run(self, argv: list[str], stdin: str | None = None, timeout: float | None = None) -> str:
        """Run a command and return its stdout; any failure names the command."""
        shown = shlex.join(argv)
        limit = self.timeout if timeout is None else timeout
        try:
            done = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=limit,
                check=False,
            )
        except FileNotFoundError as exc:
            raise ClusterUnavailable(INSTALL_HINT) from exc
        except subprocess.TimeoutExpired as exc:
            raise ClusterUnavailable(
                f"`{shown}` did not answer within {limit:g} s; is k3s running? "
                "(`systemctl status k3s`)"
            ) from exc
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
            said = " | ".join(lines[-3:]) or "no error output"
            raise ClusterUnavailable(f"`{shown}` failed (exit {done.returncode}): {said}")
        return done.stdout

    def json(self, *args: str) -> Any:
        """`kubectl ARGS -o json`, parsed; output that is not JSON is named, not a traceback."""
        argv = [*self.kubectl(), *args, "-o", "json"]
        out = self.run(argv)
        try:
            return json.loads(out)
        except json.JSONDecodeError as exc:
            raise ClusterUnavailable(
                f"`{shlex.join(argv)}` printed something that is not JSON: {out[:200]!r}"
            ) from exc

    def get(self, *args: str) -> Any:
        """`kubectl get ARGS -o json`, parsed."""
        return self.json("get", *args)

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """`kubectl apply -f -` of one object (or a v1 List), sent as JSON on stdin; returns
        what the API server stored."""
        argv = [*self.kubectl(), "apply", "-f", "-", "-o", "json"]
        out = self.run(argv, stdin=json.dumps(manifest))
        try:
            return dict(json.loads(out))
        except json.JSONDecodeError as exc:
            raise ClusterUnavailable(
                f"`{shlex.join(argv)}` printed something that is not JSON: {out[:200]!r}"
            ) from exc

    def delete(self, namespace: str, *resources: str) -> None:
        """`kubectl delete RESOURCES -n NS --ignore-not-found --wait=false`: gone or going."""
        self.run(
            [
                *self.kubectl(),
                "delete",
                *resources,
                "-n",
                namespace,
                "--ignore-not-found",
                "--wait=false",
            ]
        )

    def stream(self, *args: str) -> subprocess.Popen[bytes]:
        """A long-running kubectl (`logs -f`): its stdout as bytes, split only at b"\n" (a
        line may hold a carriage return), stderr kept apart."""
        argv = [*self.kubectl(), *args]
        try:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError as exc:
            raise ClusterUnavailable(f"`{shlex.join(argv)}` could not start: {exc}") from exc

    def version(self) -> dict[str, Any]:
        """`kubectl version -o json`: the client's and the server's versions."""
        return dict(self.json("version"))
