#!/usr/bin/env bash
# The quickstart against the k3s cluster, run on the server as root after install.sh:
#   vagrant ssh server -c 'sudo /vagrant/provisioning/smoke.sh'
#
# It checks, in order, and stops at the first failure with a message naming it (exit 1):
#   1. `appliance cluster status`: SMOKE_NODES nodes (default 2), every one Ready;
#   2. `appliance quickstart` with the k3s executor (APPLIANCE_EXECUTOR=k3s): import, train
#      twice, register, serve, predict, deploy, roll back;
#   3. each of its training jobs ran as a Kubernetes Job in the appliance namespace and
#      succeeded there (`k3s kubectl get job job-<id> -n appliance`);
#   4. both models are registered.
#
# The home is the one install.sh --server configured (APPLIANCE_HOME, else
# /var/lib/appliance: S3 store on MinIO, k3s executor), used as its owner (the `appliance`
# user), so no file in it ends up owned by root; the dataset, models and deployment are named
# SMOKE_NAME (default smoke-<epoch>), so runs never collide. The appliance command is
# APPLIANCE_BIN, else `appliance` on PATH, else install.sh's virtual environment.
set -euo pipefail

nodes_expected="${SMOKE_NODES:-2}"
ready_timeout="${SMOKE_READY_TIMEOUT:-300}"
name="${SMOKE_NAME:-smoke-$(date +%s)}"
namespace=appliance
export APPLIANCE_HOME="${APPLIANCE_HOME:-/var/lib/appliance}"

fail() {
  echo "smoke: FAILED: $*" >&2
  exit 1
}
say() { echo "smoke: $*" >&2; }

find_appliance() {
  local candidate
  for candidate in "${APPLIANCE_BIN:-}" "$(command -v appliance || true)" \
    /opt/appliance/.venv/bin/appliance /vagrant/.venv/bin/appliance; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

bin="$(find_appliance)" ||
  fail "no appliance command (set APPLIANCE_BIN, or run install.sh --server first)"
[ -d "$APPLIANCE_HOME" ] ||
  fail "no appliance home at $APPLIANCE_HOME (run install.sh --server first)"
owner="$(stat -c %U "$APPLIANCE_HOME")"
# appliance ARGS: the command as the home's owner, with the home (and any executor) passed on
appliance() {
  local run=(env "APPLIANCE_HOME=$APPLIANCE_HOME")
  [ -z "${APPLIANCE_EXECUTOR:-}" ] || run+=("APPLIANCE_EXECUTOR=$APPLIANCE_EXECUTOR")
  if [ "$(id -un)" != "$owner" ] && [ "$(id -u)" = 0 ]; then
    run=(runuser -u "$owner" -- "${run[@]}")
  fi
  "${run[@]}" "$bin" "$@"
}
if command -v k3s >/dev/null 2>&1; then
  kubectl=(k3s kubectl)
elif command -v kubectl >/dev/null 2>&1; then
  kubectl=(kubectl)
else
  fail "neither k3s nor kubectl is installed on this machine"
fi
command -v python3 >/dev/null 2>&1 || fail "python3 is needed to read the JSON answers"

# json EXPR: evaluate a Python expression over the JSON document on stdin (bound to `d`)
json() { python3 -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# 1. every node Ready
say "waiting up to ${ready_timeout}s for ${nodes_expected} Ready nodes"
deadline=$((SECONDS + ready_timeout))
while :; do
  if appliance cluster status --json >"$scratch/status.json" 2>"$scratch/status.err"; then
    total="$(json 'd["nodes"]' <"$scratch/status.json")"
    ready="$(json 'd["nodes_ready"]' <"$scratch/status.json")"
    if [ "$ready" -ge "$nodes_expected" ] && [ "$ready" -eq "$total" ]; then
      break
    fi
    not_ready="$(json 'd["not_ready"]' <"$scratch/status.json")"
    detail="${ready}/${total} nodes Ready (not ready: ${not_ready})"
  else
    detail="appliance cluster status failed: $(tail -n 1 "$scratch/status.err")"
  fi
  [ "$SECONDS" -lt "$deadline" ] || fail "cluster not ready after ${ready_timeout}s: $detail"
  sleep 5
done
say "cluster: ${ready}/${total} nodes Ready"
say "object store: $(json 'd["object_store"]' <"$scratch/status.json")"

# 2. the quickstart, its training through the k3s executor
say "running the quickstart as '${name}' with the k3s executor"
if ! APPLIANCE_EXECUTOR=k3s appliance quickstart --name "$name" --json \
  >"$scratch/quickstart.json" 2>"$scratch/quickstart.err"; then
  tail -n 20 "$scratch/quickstart.err" >&2
  fail "appliance quickstart failed (its last lines are above)"
fi
[ "$(json 'd["rollback_ok"]' <"$scratch/quickstart.json")" = "True" ] ||
  fail "the quickstart's rollback did not serve version 1 again"

# 3. its jobs ran as Kubernetes Jobs and succeeded there
appliance jobs list --json >"$scratch/jobs.json" || fail "appliance jobs list failed"
mapfile -t jobs < <(json "'\n'.join(j['id'] + ' ' + str(j.get('executor')) for j in d
  if (j.get('run_name') or '').startswith('${name}-'))" <"$scratch/jobs.json")
[ "${#jobs[@]}" -ge 2 ] || fail "expected 2 training jobs named ${name}-*, found ${#jobs[@]}"
for line in "${jobs[@]}"; do
  id="${line%% *}"
  executor="${line#* }"
  [ "$executor" = "k3s" ] || fail "job ${id} ran on the ${executor} executor, not k3s"
  succeeded="$("${kubectl[@]}" get job "job-${id}" -n "$namespace" \
    -o 'jsonpath={.status.succeeded}' 2>"$scratch/kubectl.err")" ||
    fail "job ${id} is not a Kubernetes Job in ${namespace}: $(tail -n 1 "$scratch/kubectl.err")"
  [ "${succeeded:-0}" -ge 1 ] || fail "Kubernetes Job job-${id} has not succeeded"
  say "job ${id}: Kubernetes Job job-${id} succeeded"
done

# 4. both models registered
appliance models versions "$name" --json >"$scratch/versions.json" ||
  fail "model ${name} is not registered"
registered="$(json 'sorted(v["ref"] for v in d)' <"$scratch/versions.json")"
expected="$(json 'sorted(m["ref"] for m in d["models"])' <"$scratch/quickstart.json")"
[ "$registered" = "$expected" ] ||
  fail "registered versions ${registered}, the quickstart registered ${expected}"
say "models: ${registered}"

say "OK: ${total} nodes Ready, training ran as Kubernetes Jobs, models registered"
