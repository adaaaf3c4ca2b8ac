#!/usr/bin/env bash
# Set up appliance. Local mode (the default) needs only python3 >= 3.11:
#   ./install.sh               virtual environment in ./.venv with pinned dependencies
#   ./install.sh --dev         ... plus the test and lint tools
#   ./install.sh --prefix DIR  the virtual environment in DIR instead
#   ./install.sh --dry-run     print the plan (the venv, the exact pip commands), change nothing
# Running it again is safe: it reuses the environment and re-applies the pins.
#
# Cluster mode (Linux as root, amd64 or arm64; see provisioning/README.md):
#   sudo ./install.sh --server --bundle FILE
#        a k3s server with MinIO and the appliance agent (k3s executor, S3 store)
#   sudo ./install.sh --agent --server https://HOST:6443 --token-file FILE --bundle FILE
#        join an edge node to that server (the same bundle, for this node's architecture)
#   sudo ./install.sh --uninstall [--purge]
#        remove what cluster mode installed; keeps the appliance home and MinIO data
#        unless --purge
# Options of --server and --agent:
#   --bundle FILE             install only from this offline bundle: no network access at all
#                             (without it: the artifacts pinned in bundles/manifest.toml are
#                             fetched, images and Python packages come from their registries)
#   --advertise-address IP    this node's address, one it holds (default: the first of
#                             `hostname -I`)
#   --gpu-slices N            advertise every GPU as N (NVIDIA time-slicing; --server only)
#   --minio-port P            MinIO's S3 port (default 9000; --server only)
# Options of every cluster mode:
#   --dry-run                 print the plan (files, commands, services) and change nothing
#   --root DIR                write every file under DIR and run no system command (a staging
#                             tree); this machine's memory, disk, ports, cgroups and addresses
#                             are not checked
# Every mode can run again: what is in place is left alone, what changed is updated (except a
# /var/lib/appliance/appliance.toml changed by hand: it is kept, with a warning).
# Python is $PYTHON (default python3), e.g. sudo PYTHON=python3.11 ./install.sh ...; with
# --bundle, --server needs the CPython version the bundle's wheels are for.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="$here/.venv"
dev=0
python="${PYTHON:-python3}"

die() { echo "install.sh: $*" >&2; exit 2; }
warn() { echo "install.sh: warning: $*" >&2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

# ---------------------------------------------------------------------------------------------
# Arguments. Local mode keeps its options (--dev, --prefix) and its output exactly as before.

want_server=0 want_agent=0 want_uninstall=0
server_url="" token_file="" bundle="" dry_run=0 staging=0 root="" gpu_slices="" minio_port=9000
advertise="" advertise_given="" purge=0
given=()

while [ $# -gt 0 ]; do
  opt=$1 value="" inline=0
  case "$opt" in
    --*=*) value=${opt#*=}; opt=${opt%%=*}; inline=1 ;;
  esac
  case "$opt" in
    --prefix|--bundle|--token-file|--root|--gpu-slices|--minio-port|--advertise-address)
      case "$opt" in
        --prefix) what="a directory" ;;
        --bundle|--token-file) what="a file" ;;
        --root) what="a directory" ;;
        --gpu-slices) what="a number" ;;
        --minio-port) what="a port number" ;;
        *) what="an IP address" ;;
      esac
      if [ "$inline" = 0 ]; then
        [ $# -ge 2 ] || die "$opt needs $what"
        value=$2
        shift
      fi
      [ -n "$value" ] || die "$opt needs $what"
      case "$value" in -*) die "$opt needs $what (got the option $value)" ;; esac
      ;;
    --dev|--agent|--dry-run|--uninstall|--purge|-h|--help)
      [ "$inline" = 0 ] || die "$opt takes no value"
      ;;
  esac
  case "$opt" in
    --dev) dev=1 ;;
    --prefix) prefix="$value" ;;
    --server)
      want_server=1
      if [ "$inline" = 1 ]; then
        server_url=$value
      elif [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#-}" = "$2" ]; then
        server_url=$2
        shift
      fi
      ;;
    --agent) want_agent=1 ;;
    --token-file) token_file=$value ;;
    --bundle) bundle=$value ;;
    --dry-run) dry_run=1 ;;
    --root) staging=1; root=$value ;;
    --gpu-slices) gpu_slices=$value ;;
    --minio-port) minio_port=$value ;;
    --advertise-address) advertise=$value advertise_given=1 ;;
    --uninstall) want_uninstall=1 ;;
    --purge) purge=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (try --help)" ;;
  esac
  given+=("$opt")
  shift
done

if [ "$want_uninstall" = 1 ]; then
  [ "$want_server$want_agent" = 00 ] \
    || die "--uninstall takes no --server or --agent: it removes what /etc/appliance/install.state lists"
  mode=uninstall
elif [ "$want_agent" = 1 ]; then
  mode=agent
elif [ "$want_server" = 1 ]; then
  [ -z "$server_url" ] \
    || die "--server $server_url: a server URL is for --agent (joining a server); --server alone installs one"
  mode=server
else
  mode=local
fi

declare -A allowed=(
  [--dev]=local [--prefix]=local
  [--bundle]="server agent" [--advertise-address]="server agent"
  [--gpu-slices]=server [--minio-port]=server [--token-file]=agent
  [--dry-run]="local server agent uninstall" [--root]="server agent uninstall" [--purge]=uninstall
)
declare -A mode_names=(
  [local]="the local install" [server]="--server" [agent]="--agent" [uninstall]="--uninstall"
)
for opt in ${given[@]+"${given[@]}"}; do
  modes=${allowed[$opt]:-}
  [ -z "$modes" ] && continue
  case " $modes " in
    *" $mode "*) ;;
    *)
      names=""
      for m in $modes; do names="${names:+$names, }${mode_names[$m]}"; done
      die "$opt does not go with ${mode_names[$mode]} (it is for $names)"
      ;;
  esac
done

if [ "$mode" = agent ]; then
  [ -n "$server_url" ] || die "--agent needs --server https://HOST:6443 (the k3s server to join)"
  [ -n "$token_file" ] \
    || die "--agent needs --token-file FILE (a copy of the server's /var/lib/rancher/k3s/server/node-token)"
fi
if [ -n "$gpu_slices" ] && ! [[ $gpu_slices =~ ^[1-9][0-9]{0,3}$ ]]; then
  die "--gpu-slices $gpu_slices: expected a whole number from 1 to 9999"
fi
if ! [[ $minio_port =~ ^[1-9][0-9]{0,4}$ ]] || [ "$minio_port" -gt 65535 ]; then
  die "--minio-port $minio_port: expected a port number (1-65535)"
fi
[ "$minio_port" != 6443 ] || die "--minio-port 6443: that is the k3s API's port"
ipv4='^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$'
if [ -n "$advertise" ] && ! [[ $advertise =~ $ipv4 ]]; then
  die "--advertise-address $advertise: expected an IPv4 address"
fi
url_re='^https://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):[0-9]{1,5}/?$'
if [ "$mode" = agent ] && ! [[ $server_url =~ $url_re ]]; then
  die "--server $server_url: expected https://HOST:PORT (k3s listens on 6443)"
fi
server_url=${server_url%/}

# ---------------------------------------------------------------------------------------------
# Plan lines (every mode): a kind padded to 8 columns, then its fields (see below).

secrets=()          # values masked in every printed command
say() { printf '%-8s%s\n' "$1" "$2"; }

mask() {  # TEXT: TEXT with every secret replaced by <generated>
  local text=$1 secret
  for secret in ${secrets[@]+"${secrets[@]}"}; do
    [ -n "$secret" ] && text=${text//"$secret"/<generated>}
  done
  printf '%s' "$text"
}

show_cmd() {  # ARGS: the command line as a shell would read it, secrets masked
  local out="" arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]]; then
      out+="${arg%%=*}=$(printf '%q' "${arg#*=}") "
    else
      out+="$(printf '%q' "$arg") "
    fi
  done
  mask "${out% }"
}

# ---------------------------------------------------------------------------------------------
# Local mode: a virtual environment with pinned dependencies.

if [ "$mode" = local ]; then
  command -v "$python" >/dev/null 2>&1 || die "$python not found; install Python 3.11 or newer"
  "$python" - <<'PY' || die "Python 3.11 or newer is required (found $("$python" --version 2>&1))"
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

  pip=("$prefix/bin/python" -m pip install --disable-pip-version-check -q -c "$here/constraints.txt")
  if [ "$dry_run" = 1 ]; then  # the plan: the same commands, in the cluster modes' format
    if [ -x "$prefix/bin/python" ]; then
      say ok "$prefix exists"
    else
      say run "$(show_cmd "$python" -m venv "$prefix")"
    fi
    say run "$(show_cmd "${pip[@]}" "torch==2.13.0")"
    if [ "$dev" = 1 ]; then
      say run "$(show_cmd "${pip[@]}" -e "${here}[dev]")"
    else
      say run "$(show_cmd "${pip[@]}" "$here")"
    fi
    say run "$(show_cmd "$prefix/bin/appliance" version)"
    say next "$(show_cmd "$prefix/bin/appliance" quickstart)"
    say note "dry run: nothing was changed"
    exit 0
  fi

  if [ ! -x "$prefix/bin/python" ]; then
    echo "==> creating virtual environment in $prefix"
    "$python" -m venv "$prefix"
  fi

  # torch first and pinned, so nothing below resolves a different (CUDA, GBs) build of it.
  "${pip[@]}" "torch==2.13.0"
  if [ "$dev" = 1 ]; then
    echo "==> installing appliance (editable) with test tools"
    "${pip[@]}" -e "${here}[dev]"
  else
    echo "==> installing appliance"
    "${pip[@]}" "$here"
  fi

  "$prefix/bin/appliance" version >/dev/null
  echo "==> installed appliance $("$prefix/bin/appliance" version) in $prefix"
  echo "next: $prefix/bin/appliance quickstart"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Cluster mode. Paths on the node (every file is written under $root, empty on a real run).

K3S_CONFIG=/etc/rancher/k3s/config.yaml
K3S_KUBECONFIG=/etc/rancher/k3s/k3s.yaml
K3S_BIN=/usr/local/bin/k3s
K3S_IMAGES=/var/lib/rancher/k3s/agent/images
K3S_MANIFESTS=/var/lib/rancher/k3s/server/manifests
K3S_NODE_TOKEN=/var/lib/rancher/k3s/server/node-token
K3S_JOIN_TOKEN=/etc/rancher/k3s/join-token
K3S_API_PORT=6443
ETC=/etc/appliance
STATE=$ETC/install.state
SECRETS=$ETC/secrets.env
MC_CONFIG=$ETC/mc
OPT=/opt/appliance
BUNDLE_DIR=$OPT/bundle
VENV=$OPT/.venv
HOME_DIR=/var/lib/appliance
MINIO_DATA_ROOT=/srv/appliance
MINIO_DATA=$MINIO_DATA_ROOT/minio
MINIO_ENV=/etc/default/minio
UNITS=/etc/systemd/system
GPU_LABEL=appliance.dev/gpu=true
DEVICE_PLUGIN_IMAGE=nvcr.io/nvidia/k8s-device-plugin:v0.20.0  # unless the manifest names one
RUNTIME_IMAGE_ARTIFACT=appliance-runtime

umask 022
shopt -s lastpipe  # `... | step_file` runs step_file in this shell (it sets variables)
if [ "$staging" = 1 ]; then
  case "$root" in /*) ;; *) root="$PWD/$root" ;; esac
  while [ "${root%/}" != "$root" ]; do root=${root%/}; done
fi

# ---------------------------------------------------------------------------------------------
# The step vocabulary: every step prints one plan line, and the plan (--dry-run) and the run
# share this code. Line format: a kind padded to 8 columns, then its fields:
#   file  PATH MODE OWNER STATUS          copy/fetch  PATH MODE OWNER STATUS SOURCE
#   dir   PATH MODE OWNER STATUS          run   COMMAND     (skip COMMAND: not run, --root)
#   user  NAME exists                     remove PATH       keep PATH
#   check WHAT                            wait  WHAT        ok  WHAT        next  WHAT
# STATUS is new, changed or unchanged; an unchanged step does nothing. Secrets never appear:
# a command argument holding one prints as <generated>.

recorded=()         # state lines (file=, tree=, keep=, user=, service=, written=) of this run
pending_tmp=""      # a temp file being written, removed if the run stops
changed_any=0       # whether this run changed something (the state is then written)
state_written=0

act() { if [ "$staging" = 1 ]; then say skip "$2"; else say "$1" "$2"; fi; }
live() { [ "$dry_run" = 0 ] && [ "$staging" = 0 ]; }
record() { recorded+=("$1"); }

run_cmd() {  # [NAME=value...] COMMAND ARGS: run it with those environment variables
  (
    while [ $# -gt 0 ] && [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
      export "${1%%=*}=${1#*=}"
      shift
    done
    exec "$@"
  )
}

step_run() {  # [--hint TEXT] [--input TEXT] [--ok-if TEXT] [NAME=value...] COMMAND ARGS
  local hint="" input="" has_input=0 ok_if="" line rc=0 out=""
  while :; do
    case "$1" in
      --hint) hint=$2; shift 2 ;;
      --input) input=$2; has_input=1; shift 2 ;;
      --ok-if) ok_if=$2; shift 2 ;;
      *) break ;;
    esac
  done
  line=$(show_cmd "$@")
  [ "$has_input" = 0 ] || line+=" <<< <generated>"
  act run "$line"
  live || return 0
  changed_any=1
  if [ -n "$ok_if" ]; then
    out=$(run_cmd "$@" 2>&1) || rc=$?
    if [ "$rc" != 0 ] && [[ $out == *"$ok_if"* ]]; then rc=0; fi
    [ "$rc" = 0 ] || mask "$out" >&2
  elif [ "$has_input" = 1 ]; then
    printf '%s\n' "$input" | run_cmd "$@" >&2 || rc=$?
  else
    run_cmd "$@" >&2 || rc=$?  # stdout is the plan and its record; what tools say goes aside
  fi
  [ "$rc" = 0 ] || die "this step failed (exit $rc): $line${hint:+; $hint}"
}

meta_ok() {  # PATH MODE OWNER: the mode (and, unless staging, the owner) are these
  [ "$(stat -c %a "$1")" = "$(printf '%o' "$((8#$2))")" ] || return 1
  [ "$staging" = 1 ] || [ "$(stat -c %U "$1")" = "$3" ]
}

content_status() {  # PATH MODE OWNER CONTENT
  local path="$root$1" current
  [ -e "$path" ] || { echo new; return; }
  current=$(cat "$path" 2>/dev/null; printf x) || { echo changed; return; }
  if [ "${current%x}" = "$4" ] && meta_ok "$path" "$2" "$3"; then echo unchanged; else echo changed; fi
}

new_tmp() {  # DIR: a temp file in DIR (same file system as the target, for the rename)
  mkdir -p "$1"
  pending_tmp=$(mktemp "$1/.install.XXXXXX")
}

finish_tmp() {  # DEST MODE OWNER: chmod (and chown) the temp file, then rename it into place
  chmod "$2" "$pending_tmp"
  [ "$staging" = 1 ] || chown "$3:$3" "$pending_tmp"
  mv -f "$pending_tmp" "$root$1"
  pending_tmp=""
  changed_any=1
}

last_status=""
step_file() {  # DEST MODE [OWNER]: write stdin to DEST (temp file, chmod, rename)
  local dest=$1 mode=$2 owner=${3:-root} content
  content=$(cat; printf x)
  content=${content%x}
  last_status=$(content_status "$dest" "$mode" "$owner" "$content")
  record "file=$dest"
  say file "$dest $mode $owner $last_status"
  [ "$last_status" != unchanged ] && [ "$dry_run" = 0 ] || return 0
  new_tmp "$(dirname "$root$dest")"
  printf '%s' "$content" >"$pending_tmp"
  finish_tmp "$dest" "$mode" "$owner"
}

# What appliance.toml's settings would change, as `key = value` lines (stdin: the content
# install.sh would write; argv[1]: the file as it is).
PY_SETTINGS='
import json, sys, tomllib
def flat(table, prefix=""):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
want = dict(flat(tomllib.loads(sys.stdin.read())))
try:
    with open(sys.argv[1], "rb") as file:
        have = dict(flat(tomllib.load(file)))
except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
    print(f"(it does not read as TOML: {exc})")
    have = {}
for key, value in want.items():
    if key not in have or have[key] != value:
        print(f"{key} = {json.dumps(value)}")
'

written_sha() {  # PATH: the sha256 install.sh recorded of what it last wrote to PATH
  [ -f "$root$STATE" ] || return 0
  awk -v p="written=$1 sha256:" 'index($0, p) == 1 { print substr($0, length(p) + 1); exit }' \
    "$root$STATE"
}

step_settings() {  # DEST MODE OWNER: step_file for a file the operator may edit: one that is not
  # what install.sh last wrote there (its sha256 is in the state) is kept as it is, with a
  # warning naming the settings install.sh would have set
  local dest=$1 mode=$2 owner=$3 content digest why diff
  content=$(cat; printf x)
  content=${content%x}
  digest=$(printf '%s' "$content" | sha256sum | cut -d' ' -f1)
  if [ -f "$root$dest" ] && ! printf '%s' "$content" | cmp -s - "$root$dest" \
    && [ "$(sha256_of "$root$dest")" != "$(written_sha "$dest")" ]; then
    record "file=$dest"
    last_status=kept
    if [ -n "$(written_sha "$dest")" ]; then why="changed since install.sh wrote it"
    else why="install.sh has no record of writing it"
    fi
    diff=$(printf '%s' "$content" | "$python" -I -c "$PY_SETTINGS" "$root$dest" 2>&1) || true
    if [ -z "$diff" ]; then
      say keep "$dest ($why; it has every setting install.sh sets)"
      return 0
    fi
    say keep "$dest ($why; see the warning)"
    diff=$(mask "$diff")
    warn "$dest: $why, so it is left as it is; install.sh would set: ${diff//$'\n'/; }. Set these by hand, or move the file aside and run install.sh again to have it written afresh"
    return 0
  fi
  printf '%s' "$content" | step_file "$dest" "$mode" "$owner"
  record "written=$dest sha256:$digest"  # once it is there (a failed write keeps the old one)
}

step_touch() {  # DEST MODE: create an empty file if there is none (its content is not ours)
  local dest=$1 mode=$2
  record "file=$dest"
  if [ -e "$root$dest" ]; then last_status=unchanged; else last_status=new; fi
  say file "$dest $mode root $last_status"
  [ "$last_status" = new ] && [ "$dry_run" = 0 ] || return 0
  new_tmp "$(dirname "$root$dest")"
  finish_tmp "$dest" "$mode" root
}

step_dir() {  # PATH MODE [OWNER] [keep|tree]: a directory (kept or removed on uninstall)
  local path=$1 mode=$2 owner=${3:-root} kind=${4:-}
  [ -z "$kind" ] || record "$kind=$path"
  if [ ! -d "$root$path" ]; then last_status=new
  elif meta_ok "$root$path" "$mode" "$owner"; then last_status=unchanged
  else last_status=changed
  fi
  say dir "$path $mode $owner $last_status"
  [ "$last_status" != unchanged ] && [ "$dry_run" = 0 ] || return 0
  mkdir -p "$root$path"
  chmod "$mode" "$root$path"
  [ "$staging" = 1 ] || chown "$owner:$owner" "$root$path"
  changed_any=1
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

step_artifact() {  # INDEX DEST MODE: an artifact from the bundle (or fetched, pinned sha256)
  local i=$1 dest=$2 mode=$3 path="$root$2" got
  record "file=$dest"
  if [ ! -e "$path" ]; then last_status=new
  elif [ "$(sha256_of "$path")" = "${art_sha[$i]}" ] && meta_ok "$path" "$mode" root; then
    last_status=unchanged
  else last_status=changed
  fi
  if [ -n "$bundle" ]; then
    say copy "$dest $mode root $last_status bundle:${art_path[$i]}"
  else
    say fetch "$dest $mode root $last_status ${art_url[$i]}"
  fi
  [ "$last_status" != unchanged ] && [ "$dry_run" = 0 ] || return 0
  new_tmp "$(dirname "$path")"
  if [ -n "$bundle" ]; then
    tar -xOf "$bundle" "${art_path[$i]}" >"$pending_tmp" \
      || die "$bundle: cannot extract ${art_path[$i]}"
  else
    curl -fsSL --retry 3 -o "$pending_tmp" "${art_url[$i]}" \
      || die "cannot fetch ${art_name[$i]} from ${art_url[$i]}"
  fi
  got=$(sha256_of "$pending_tmp")
  [ "$got" = "${art_sha[$i]}" ] \
    || die "${art_name[$i]}: ${art_url[$i]} has sha256 $got, the manifest pins ${art_sha[$i]}"
  finish_tmp "$dest" "$mode" root
}

step_copy_from() {  # SRC DEST MODE OWNER: copy a file another step made (k3s' kubeconfig)
  local src=$1 dest=$2 mode=$3 owner=$4
  record "file=$dest"
  if [ "$staging" = 1 ]; then
    say skip "copy $src to $dest $mode $owner (made by k3s when it starts)"
    return 0
  fi
  if [ ! -e "$root$dest" ]; then last_status=new
  elif [ -e "$root$src" ] && cmp -s "$root$src" "$root$dest" && meta_ok "$root$dest" "$mode" "$owner"; then
    last_status=unchanged
  else last_status=changed
  fi
  say copy "$dest $mode $owner $last_status $src"
  [ "$last_status" != unchanged ] && [ "$dry_run" = 0 ] || return 0
  new_tmp "$(dirname "$root$dest")"
  cat "$root$src" >"$pending_tmp"
  finish_tmp "$dest" "$mode" "$owner"
}

step_user() {  # NAME HOME: a system user and its group, created unless present
  local name=$1 home=$2
  if [ "$staging" = 0 ] && id -u "$name" >/dev/null 2>&1; then
    say user "$name exists"
    return 0
  fi
  record "user=$name"
  step_run useradd --system --user-group --no-create-home --home-dir "$home" \
    --shell /usr/sbin/nologin "$name"
}

step_wait_file() {  # PATH SECONDS: wait for a file another process writes
  if [ "$staging" = 1 ]; then
    say skip "wait for $1 (written by k3s when it starts)"
    return 0
  fi
  say wait "$1 (written by k3s; up to $2 s)"
  [ "$dry_run" = 0 ] || return 0
  local waited=0
  while [ ! -s "$1" ]; do
    [ "$waited" -lt "$2" ] \
      || die "k3s did not write $1 within $2 s; see: journalctl -u k3s --no-pager | tail -n 50"
    sleep 2
    waited=$((waited + 2))
  done
}

render() {  # TEMPLATE [NAME=VALUE...]: the template with @NAME@ replaced (bash, not sed: no
  # secret on a command line); "# @time-slicing" lines kept only when GPU_SLICES is given
  local text name value pair slices=""
  text=$(cat "$here/bundles/k8s/$1"; printf x)
  text=${text%x}
  shift
  for pair in "$@"; do
    name=${pair%%=*} value=${pair#*=}
    [ "$name" = GPU_SLICES ] && slices=$value
    text=${text//"@$name@"/$value}
  done
  if [ -n "$slices" ]; then
    printf '%s' "$text" | sed -e 's/  # @time-slicing$//'
  else
    printf '%s' "$text" | sed -e '/# @time-slicing$/d'
  fi
}

on_exit() {
  local rc=$?
  [ -z "$pending_tmp" ] || rm -f "$pending_tmp"
  if [ "$rc" != 0 ] && [ "$changed_any" = 1 ] && [ "$state_written" = 0 ] && [ "$dry_run" = 0 ]; then
    echo "install.sh: stopped part way; what was installed so far is recorded for --uninstall" >&2
    write_state >/dev/null || true
  fi
}
trap on_exit EXIT

# ---------------------------------------------------------------------------------------------
# Checks, all before the first change. Each failure says what and how to fix it; exit 2.

problems=()
problem() { problems+=("$1"); }
stop_if_problems() {
  [ ${#problems[@]} -gt 0 ] || return 0
  local p
  for p in "${problems[@]}"; do echo "install.sh: $p" >&2; done
  echo "install.sh: nothing was changed" >&2
  exit 2
}

check_root() {
  if [ "$dry_run" = 0 ] && [ "$staging" = 0 ] && [ "$EUID" -ne 0 ]; then
    die "--$mode changes the system (k3s, systemd units, users): run it as root (sudo ./install.sh ...); --dry-run shows the plan without root"
  fi
}

check_python() {
  command -v "$python" >/dev/null 2>&1 || die "$python not found; cluster mode needs Python 3.11 or newer"
  "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "Python 3.11 or newer is required (found $("$python" --version 2>&1))"
}

arch=""
check_platform() {
  local kernel machine
  kernel=$(uname -s)
  if [ "$staging" = 0 ] && [ "$kernel" != Linux ]; then
    die "cluster mode runs on Linux (this is $kernel)"
  fi
  machine=$(uname -m)
  case "$machine" in
    x86_64|amd64) arch=amd64 ;;
    aarch64|arm64) arch=arm64 ;;
    *) die "unsupported architecture $machine: k3s nodes here are amd64 (x86_64) or arm64 (aarch64)" ;;
  esac
  say check "arch $arch"
}

# The artifacts: from the bundle (verified first) or, without one, from bundles/manifest.toml.
art_name=() art_version=() art_kind=() art_path=() art_sha=() art_url=() art_ref=()
declare -A image_refs=()  # name -> REPOSITORY:TAG, of the images the artifacts hold or name
bundle_label=""
PY_ARTIFACTS='
import sys, tarfile
sys.path.insert(0, sys.argv[1])
from appliance.core.bundles import MANIFEST, load_manifest, parse_manifest, verify_bundle
from appliance.errors import ApplianceError
source, arch, is_bundle = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
try:
    if is_bundle:
        info = verify_bundle(source, arch)
        with tarfile.open(source) as tar:
            text = tar.extractfile(MANIFEST).read().decode("utf-8")
        manifest = parse_manifest(text, MANIFEST)
        head = (info["name"], info["version"], info["arch"])
    else:
        manifest = load_manifest(source)
        head = (manifest["bundle"]["name"], manifest["bundle"]["version"], arch)
except (ApplianceError, tarfile.TarError, OSError, UnicodeDecodeError, EOFError) as exc:
    reason = getattr(exc, "message", None) or str(exc)
    print(f"install.sh: refusing bundle {source}: {reason}" if is_bundle
          else f"install.sh: {source}: {reason}", file=sys.stderr)
    sys.exit(2)
print("\t".join(("bundle", *head)))
for a in manifest["artifacts"]:
    if a["arch"] in (arch, "any"):
        # an image the build saved names itself in its url: docker:REPOSITORY:TAG[@DIGEST]
        ref = a["url"].removeprefix("docker:").split("@")[0] if a["url"].startswith("docker:") else ""
        print("\t".join(("artifact", a["name"], a["version"], a["kind"], a["path"], a["sha256"], a["url"], ref)))
for i in manifest.get("images", []):
    if i["arch"] in (arch, "any"):
        print("\t".join(("image", i["name"], i["ref"])))
'

# Which Python the bundle's wheels install on, read from their tags (PEP 425, as pip matches
# them): cpXY-cpXY and cpXY-none only on CPython X.Y, cpXY-abi3 and pyXY-none on X.Y or newer.
PY_WHEELS='
import platform, re, sys
cpython = sys.implementation.name == "cpython"
major, minor = sys.version_info[:2]
def alternatives(wheel):  # (exact or min, minor, CPython only) for each tag of the wheel
    m = re.match(r"^.+-(?P<py>[^-]+)-(?P<abi>[^-]+)-[^-]+\.whl$", wheel)
    if m is None:
        return [("min", 0, False)]
    out = []
    for py in m["py"].split("."):
        for abi in m["abi"].split("."):
            t = re.fullmatch(r"(cp|py)3(\d*)", py)
            k = int(t[2]) if t and t[2] else 0
            if t is None or (t[1] == "py" and abi != "none"):
                out.append(("never", 0, False))
            elif t[1] == "py":
                out.append(("min", k, False))
            elif abi == "abi3":
                out.append(("min", k, True))
            elif abi == "none" or re.fullmatch(rf"cp3{k}[a-z]*", abi):
                out.append(("exact", k, True))
            else:
                out.append(("never", 0, False))
    return out
def fits(kind, k, cp_only):
    if kind == "never" or major != 3 or (cp_only and not cpython):
        return False
    return minor == k if kind == "exact" else minor >= k
def describe(kind, k, cp_only):
    if kind == "never":
        return "no CPython 3"
    name = "CPython" if cp_only else "Python"
    return f"{name} 3.{k}" if kind == "exact" else f"{name} 3.{k} or newer" if k else "Python 3"
exact, low, misfits = set(), ("min", 0, False), []
for wheel in sys.argv[1:]:
    alts = alternatives(wheel)
    if not any(fits(*a) for a in alts):
        misfits.append((describe(*alts[0]), wheel))
    if all(a[0] == "exact" for a in alts) and len({a[1] for a in alts}) == 1:
        exact.add(alts[0][1])
    elif all(a[0] == "min" for a in alts):
        low = max(low, min(alts, key=lambda a: a[1]), key=lambda a: a[1])
if exact:
    needs = " and ".join(f"CPython 3.{k}" for k in sorted(exact))
else:
    needs = describe(*low) if low[1] else "any Python 3"
found = "CPython" if cpython else sys.implementation.name
print(f"found\t{found} {platform.python_version()}")
print(f"needs\t{needs}")
for need, wheel in misfits:
    print(f"misfit\t{need}\t{wheel}")
'

check_wheels_python() {  # --bundle: the interpreter that runs pip can install the wheelhouse
  local interp=$python where="" wheels=() i listing kind a b found="" needs="" n=0 need="" \
    example="" fix
  if [ "$staging" = 0 ] && [ -x "$VENV/bin/python" ]; then
    interp=$VENV/bin/python where=" (the virtual environment an earlier run made)"
  fi
  for i in "${!art_kind[@]}"; do
    [ "${art_kind[$i]}" != wheel ] || wheels+=("$(basename "${art_path[$i]}")")
  done
  if ! listing=$("$interp" -I -c "$PY_WHEELS" ${wheels[@]+"${wheels[@]}"} 2>&1); then
    problem "$interp$where does not run (${listing##*$'\n'})"
    return 0
  fi
  while IFS=$'\t' read -r kind a b; do
    case "$kind" in
      found) found=$a ;;
      needs) needs=$a ;;
      misfit) n=$((n + 1)); [ -n "$example" ] || need=$a example=$b ;;
    esac
  done <<<"$listing"
  if [ "$n" = 0 ]; then
    say check "python: $interp is $found; the bundle's wheels are for $needs"
    return 0
  fi
  if [[ $needs =~ ^CPython\ 3\.([0-9]+)$ ]]; then fix="python3.${BASH_REMATCH[1]}"
  else fix="/path/to/python3"
  fi
  if [ -n "$where" ]; then
    fix="remove $VENV (it is remade), then run install.sh with an interpreter that fits: sudo PYTHON=$fix ./install.sh --$mode ..."
  else
    fix="install that Python and run install.sh with it: sudo PYTHON=$fix ./install.sh --$mode ..."
  fi
  problem "the bundle's wheels are for $needs ($n of them, e.g. $example needs $need), and $interp$where is $found, so pip could not install the appliance: $fix"
}

load_artifacts() {
  local listing source is_bundle kind a b c d e f g
  if [ -n "$bundle" ]; then
    [ -f "$bundle" ] || die "--bundle $bundle: no such file"
    case "$bundle" in /*) ;; *) bundle="$PWD/$bundle" ;; esac
    source=$bundle is_bundle=1
  else
    source="$here/bundles/manifest.toml" is_bundle=0
    [ -f "$source" ] || die "--$mode without --bundle fetches the artifacts pinned in bundles/manifest.toml, and this source tree has none (install.sh pins no checksums of its own): give --bundle FILE, built on a connected machine with \`appliance bundle build --arch $arch\`"
  fi
  listing=$("$python" -I -c "$PY_ARTIFACTS" "$here" "$source" "$arch" "$is_bundle") || exit 2
  while IFS=$'\t' read -r kind a b c d e f g; do
    case "$kind" in
      bundle) bundle_label="$a $b $c" ;;
      artifact)
        art_name+=("$a") art_version+=("$b") art_kind+=("$c") art_path+=("$d") art_sha+=("$e")
        art_url+=("$f") art_ref+=("$g")
        [ -z "$g" ] || image_refs[$a]=$g
        ;;
      image) [ -n "${image_refs[$a]:-}" ] || image_refs[$a]=$b ;;
    esac
  done <<<"$listing"
  if [ -n "$bundle" ]; then
    say check "bundle $bundle_label verified (${#art_name[@]} artifacts): $bundle"
  else
    say check "manifest bundles/manifest.toml (${bundle_label% *}): ${#art_name[@]} artifacts for $arch"
  fi
}

artifact_index() {  # NAME -> index, or nothing
  local i
  for i in "${!art_name[@]}"; do
    [ "${art_name[$i]}" = "$1" ] && { echo "$i"; return 0; }
  done
  return 0
}

require_artifacts() {  # NAME...: every one must be listed
  local name where
  if [ -n "$bundle" ]; then where="bundle $bundle"; else where="bundles/manifest.toml"; fi
  for name in "$@"; do
    [ -n "$(artifact_index "$name")" ] \
      || problem "$where has no artifact named '$name' for $arch (see bundles/README.md)"
  done
}

warn_without_runtime_image() {  # online: the runtime image is in no registry
  [ -n "$(artifact_index "$RUNTIME_IMAGE_ARTIFACT")" ] && return 0
  warn "bundles/manifest.toml has no '$RUNTIME_IMAGE_ARTIFACT' image to fetch: jobs on the k3s executor need it on every node (import it with k3s ctr images import, or install from a bundle)"
}

gpus=0
check_gpus() {
  local out rc=0
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    say check "gpu: none (no nvidia-smi)"
    return 0
  fi
  out=$(nvidia-smi -L 2>&1) || rc=$?
  if [ "$rc" != 0 ]; then
    # 6: the driver is loaded and found no GPU; anything else: a driver problem worth a word
    [ "$rc" = 6 ] || warn "nvidia-smi -L failed (exit $rc: ${out%%$'\n'*}); installing without GPU support"
    say check "gpu: none (nvidia-smi -L exit $rc)"
    return 0
  fi
  gpus=$(grep -c '^GPU [0-9]' <<<"$out" || true)
  if [ "$gpus" = 0 ]; then
    say check "gpu: none (nvidia-smi -L lists no GPU)"
    return 0
  fi
  if ! command -v nvidia-container-runtime >/dev/null 2>&1; then
    problem "$gpus NVIDIA GPU(s) found but the NVIDIA container toolkit is not installed (no nvidia-container-runtime): install the nvidia-container-toolkit package (offline: its .deb/.rpm packages), then run install.sh again; k3s adds the nvidia runtime only when the toolkit is there when it starts"
    say check "gpu: $gpus NVIDIA GPU(s), no container toolkit"
    return 0
  fi
  say check "gpu: $gpus NVIDIA GPU(s), NVIDIA container toolkit present"
}

valid_ipv4() { [[ $1 =~ $ipv4 ]]; }

detect_address() {
  local a
  [ -z "$advertise" ] || return 0
  for a in $(hostname -I 2>/dev/null || true); do
    if valid_ipv4 "$a"; then advertise=$a; return 0; fi
  done
  a=$(ip -4 route get 1.1.1.1 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "src") { print $(i + 1); exit } }' || true)
  if [ -n "$a" ] && valid_ipv4 "$a"; then advertise=$a; return 0; fi
  die "cannot tell this node's address (hostname -I and ip route found none): pass --advertise-address IP"
}

machine_addresses() {  # the IPv4 addresses this machine holds (hostname -I, ip -o -4 addr)
  local a
  for a in $(hostname -I 2>/dev/null || true); do
    if valid_ipv4 "$a"; then echo "$a"; fi
  done
  if command -v ip >/dev/null 2>&1; then
    ip -o -4 addr show 2>/dev/null \
      | awk '{ for (i = 1; i < NF; i++) if ($i == "inet") { sub(/\/.*/, "", $(i + 1)); print $(i + 1) } }' \
      || true
  fi
}

check_address() {  # --advertise-address: an address this machine holds (not with --root)
  local held
  [ -n "$advertise_given" ] || return 0
  if [ "$staging" = 1 ]; then
    say check "address $advertise: not checked (--root stages files for another machine)"
    return 0
  fi
  held=$(machine_addresses | awk '!seen[$0]++' | tr '\n' ' ')
  held=${held% }
  if [ -z "$held" ]; then
    warn "--advertise-address $advertise: cannot list this machine's addresses (hostname -I, ip -o -4 addr); not checked"
    say check "address $advertise: not checked (no address list)"
    return 0
  fi
  case " $held " in
    *" $advertise "*) say check "address $advertise: held by this machine" ;;
    *) problem "--advertise-address $advertise: this machine holds no such address (it has $held): give one of them, or leave the option out (the first address of hostname -I)" ;;
  esac
}

port_in_use() {  # PORT: something listens on it (ss when present, else a connect to 127.0.0.1)
  if command -v ss >/dev/null 2>&1 && [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; then
    return 0
  fi
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

ours_active() {  # SERVICE: our own service, installed before, runs (a re-run keeps its port)
  [ -f "$root$STATE" ] && command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$1"
}

check_machine() {  # memory, disk, ports, cgroups, swap: this machine only (not with --root)
  local min_kib min_label disk_kib port service
  if [ "$staging" = 1 ]; then
    say check "memory, disk, ports, cgroups: not checked (--root stages files for another machine)"
    return 0
  fi
  if [ "$mode" = server ]; then min_kib=$((1900 * 1024)) min_label="2 GB (a k3s server)"
  else min_kib=$((450 * 1024)) min_label="512 MB (a k3s agent)"
  fi
  local mem_kib
  mem_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo 2>/dev/null || echo 0)
  [ "${mem_kib:-0}" -ge "$min_kib" ] \
    || problem "this machine has $((${mem_kib:-0} / 1024)) MiB of memory; it needs at least $min_label"
  local probe=/var/lib
  disk_kib=$(df -Pk "$probe" 2>/dev/null | awk 'NR == 2 { print $4 }' || echo 0)
  [ "${disk_kib:-0}" -ge $((10 * 1024 * 1024)) ] \
    || problem "$probe has $((${disk_kib:-0} / 1024 / 1024)) GiB free; k3s, its images and the object store need at least 10 GiB there"
  if [ "$mode" = server ]; then
    for port in "$K3S_API_PORT:k3s" "$minio_port:minio"; do
      service=${port#*:} port=${port%%:*}
      if port_in_use "$port" && ! ours_active "$service"; then
        if [ "$service" = k3s ]; then
          problem "port $port (the k3s API) is in use: stop what listens there (ss -ltnp 'sport = :$port')"
        else
          problem "port $port (MinIO's S3 API) is in use: stop what listens there (ss -ltnp 'sport = :$port') or choose another with --minio-port"
        fi
      fi
    done
  fi
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    grep -qw memory /sys/fs/cgroup/cgroup.controllers \
      || problem "cgroup v2 without the memory controller: enable it (kernel command line cgroup_enable=memory), then reboot"
  elif [ ! -d /sys/fs/cgroup/memory ]; then
    problem "no memory cgroup (neither cgroup v2 nor the v1 memory controller): add cgroup_memory=1 cgroup_enable=memory to the kernel command line, then reboot"
  fi
  if [ -r /proc/swaps ] && [ "$(awk 'NR > 1' /proc/swaps | wc -l)" -gt 0 ]; then
    warn "swap is on: k3s runs, but memory limits of jobs are less exact; consider swapoff -a (and removing swap from /etc/fstab)"
  fi
  if [ -n "$bundle" ] && command -v ip >/dev/null 2>&1 && [ -z "$(ip route show default 2>/dev/null)" ]; then
    warn "no default route: k3s needs one, even a dummy one, to pick its node IP; e.g. ip link add dummy0 type dummy; ip link set dummy0 up; ip addr add 203.0.113.254/31 dev dummy0; ip route add default via 203.0.113.255 dev dummy0 metric 1000"
  fi
  if [ "$mode" = server ]; then say check "memory, disk, ports, cgroups: ok"
  else say check "memory, disk, cgroups: ok"
  fi
}

state_value() {  # KEY: the first value of KEY in the recorded state, if any
  [ -f "$root$STATE" ] || return 0
  awk -v key="$1" 'index($0, key "=") == 1 { print substr($0, length(key) + 2); exit }' "$root$STATE"
}

check_not_foreign() {  # another mode, or k3s/MinIO installed by something else: stop
  local installed
  installed=$(state_value mode)
  if [ -n "$installed" ] && [ "$installed" != "$mode" ]; then
    problem "this node is already a k3s $installed (see $STATE): run ./install.sh --uninstall first"
  fi
  if [ -z "$installed" ]; then
    [ ! -e "$root$K3S_BIN" ] \
      || problem "k3s is already installed here ($K3S_BIN), not by install.sh: remove it first (/usr/local/bin/k3s-uninstall.sh, or k3s-agent-uninstall.sh)"
    if [ "$mode" = server ] && [ -e "$root$MINIO_ENV" ]; then
      problem "MinIO is already configured here ($MINIO_ENV), not by install.sh: move it aside first"
    fi
  fi
}

# ---------------------------------------------------------------------------------------------
# Secrets: generated once, kept in /etc/appliance/secrets.env (0600) and reused on a re-run.

minio_root_user="" minio_root_password="" s3_secret=""
random_secret() { head -c 24 /dev/urandom | base64 | tr -d '/+=\n'; }
load_secrets() {
  local key value
  if [ -f "$root$SECRETS" ]; then
    [ -r "$root$SECRETS" ] || warn "cannot read $SECRETS: lines of files with credentials may show changed"
    while IFS='=' read -r key value; do
      case "$key" in
        MINIO_ROOT_USER) minio_root_user=$value ;;
        MINIO_ROOT_PASSWORD) minio_root_password=$value ;;
        APPLIANCE_S3_SECRET_KEY) s3_secret=$value ;;
      esac
    done <"$root$SECRETS" 2>/dev/null || true
  fi
  [ -n "$minio_root_user" ] || minio_root_user="admin-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  [ -n "$minio_root_password" ] || minio_root_password=$(random_secret)
  [ -n "$s3_secret" ] || s3_secret=$(random_secret)
  secrets+=("$minio_root_password" "$s3_secret")
}

# ---------------------------------------------------------------------------------------------
# Shared by --server and --agent: k3s from the artifacts.

k3s_config_changed=0
install_k3s_files() {  # ROLE (server|agent): config.yaml, binary, images, install script
  local role=$1 i dest
  {
    echo "# Written by install.sh --$role; a re-run rewrites it (keys are k3s' command-line flags)."
    if [ "$role" = agent ]; then
      echo "server: $server_url"
      echo "token-file: $K3S_JOIN_TOKEN"
    else
      echo 'write-kubeconfig-mode: "0600"'
      echo "advertise-address: $advertise"
      echo "tls-san:"
      echo "  - $advertise"
      echo "disable:"
      echo "  - traefik"
    fi
    # an agent without --advertise-address: k3s picks the address of its default route
    [ -z "$advertise" ] || echo "node-ip: $advertise"
    if [ -n "$bundle" ]; then
      echo "disable-default-registry-endpoint: true"
    fi
    if [ "$gpus" -gt 0 ]; then
      echo "node-label:"
      echo "  - $GPU_LABEL"
    fi
  } | step_file "$K3S_CONFIG" 0600
  [ "$last_status" = unchanged ] || k3s_config_changed=1

  i=$(artifact_index k3s)
  step_artifact "$i" "$K3S_BIN" 0755
  [ "$last_status" = unchanged ] || k3s_config_changed=1
  i=$(artifact_index k3s-install)
  step_artifact "$i" "$BUNDLE_DIR/scripts/k3s-install.sh" 0755
  for i in "${!art_name[@]}"; do
    case "${art_kind[$i]}" in images|image) ;; *) continue ;; esac
    if [ -z "$bundle" ] && [ "${art_name[$i]}" != "$RUNTIME_IMAGE_ARTIFACT" ]; then
      continue  # online, k3s and the device plugin pull their own images
    fi
    dest="$K3S_IMAGES/$(basename "${art_path[$i]}")"
    step_artifact "$i" "$dest" 0644
    [ "$last_status" = unchanged ] || k3s_config_changed=1
  done
  # k3s releases with conditional image import re-import only archives whose size or time
  # changed; a release without it ignores the file (and imports them all at each start)
  step_touch "$K3S_IMAGES/.cache.json" 0644
}

run_k3s_installer() {  # ROLE: the k3s install script, no download (the binary is in place)
  local role=$1 unit env=(INSTALL_K3S_SKIP_DOWNLOAD=true)
  if [ "$role" = server ]; then unit=$UNITS/k3s.service; else unit=$UNITS/k3s-agent.service; fi
  if [ -e "$root$unit" ] && [ "$k3s_config_changed" = 0 ]; then
    say ok "k3s $role is installed and its configuration is unchanged"
    return 0
  fi
  [ ! -e "$root$unit" ] || env+=(INSTALL_K3S_FORCE_RESTART=true)
  step_run --hint "see: journalctl -u ${unit##*/} --no-pager | tail -n 50" \
    "${env[@]}" "INSTALL_K3S_EXEC=$role" sh "$BUNDLE_DIR/scripts/k3s-install.sh"
}

# ---------------------------------------------------------------------------------------------
# --server

server_install() {
  local i changed unit_status s3_endpoint runtime_image
  check_root
  check_platform
  check_python
  load_artifacts
  check_gpus
  require_artifacts k3s k3s-install minio mc
  if [ -n "$bundle" ]; then
    require_artifacts k3s-airgap-images "$RUNTIME_IMAGE_ARTIFACT" appliance
    [ "$gpus" = 0 ] || require_artifacts nvidia-device-plugin
  else
    warn_without_runtime_image
  fi
  if [ -n "$gpu_slices" ] && [ "$gpus" = 0 ]; then
    warn "--gpu-slices $gpu_slices: no NVIDIA GPU on this server; nothing to slice (the device plugin is deployed only when the server has a GPU)"
  fi
  "$python" -c 'import ensurepip, venv' 2>/dev/null \
    || problem "$python cannot make a virtual environment: install its venv module (Debian and Ubuntu: the python3-venv package)"
  [ -z "$bundle" ] || check_wheels_python
  detect_address
  check_address
  check_not_foreign
  check_machine
  stop_if_problems

  # Nothing changed up to here.
  load_secrets
  step_dir "$ETC" 0755
  {
    echo "# Generated once by install.sh --server; a re-run reuses these. Keep this file private."
    echo "MINIO_ROOT_USER=$minio_root_user"
    echo "MINIO_ROOT_PASSWORD=$minio_root_password"
    echo "APPLIANCE_S3_SECRET_KEY=$s3_secret"
  } | step_file "$SECRETS" 0600
  record "keep=$SECRETS"
  step_user minio-user "$MINIO_DATA"
  step_user appliance "$HOME_DIR"
  step_dir "$OPT" 0755 root tree
  step_dir "$HOME_DIR" 0750 appliance keep
  step_dir "$MINIO_DATA_ROOT" 0755 root keep
  step_dir "$MINIO_DATA" 0750 minio-user

  # k3s: configuration, binary, images, auto-deploy manifests, then its install script.
  install_k3s_files server
  render namespace.yaml | step_file "$K3S_MANIFESTS/appliance-namespace.yaml" 0644
  render s3-secret.yaml S3_ACCESS_KEY=appliance "S3_SECRET_KEY=$s3_secret" \
    | step_file "$K3S_MANIFESTS/appliance-s3-secret.yaml" 0600
  if [ "$gpus" -gt 0 ]; then
    render nvidia-runtimeclass.yaml | step_file "$K3S_MANIFESTS/appliance-nvidia-runtimeclass.yaml" 0644
    {
      if [ -n "$gpu_slices" ]; then
        render nvidia-time-slicing.yaml "GPU_SLICES=$gpu_slices"
        echo "---"
        render nvidia-device-plugin.yaml \
          "DEVICE_PLUGIN_IMAGE=${image_refs[nvidia-device-plugin]:-$DEVICE_PLUGIN_IMAGE}" \
          "GPU_SLICES=$gpu_slices"
      else
        render nvidia-device-plugin.yaml \
          "DEVICE_PLUGIN_IMAGE=${image_refs[nvidia-device-plugin]:-$DEVICE_PLUGIN_IMAGE}"
      fi
    } | step_file "$K3S_MANIFESTS/appliance-nvidia-device-plugin.yaml" 0644
  fi
  run_k3s_installer server

  # MinIO: a host service, data in /srv/appliance/minio (outside anything k3s deletes).
  changed=0
  i=$(artifact_index minio)
  step_artifact "$i" /usr/local/bin/minio 0755
  [ "$last_status" != changed ] || changed=1
  i=$(artifact_index mc)
  step_artifact "$i" /usr/local/bin/mc 0755
  {
    echo "# Written by install.sh --server. The root credentials are generated (never the defaults)."
    echo "MINIO_ROOT_USER=$minio_root_user"
    echo "MINIO_ROOT_PASSWORD=$minio_root_password"
    echo "MINIO_VOLUMES=\"$MINIO_DATA\""
    echo "# Every address, not 127.0.0.1: k3s pods and agent nodes reach the store at $advertise."
    echo "MINIO_OPTS=\"--address :$minio_port\""
    echo "# No web console: administration is scripted with mc."
    echo "MINIO_BROWSER=off"
  } | step_file "$MINIO_ENV" 0600
  [ "$last_status" != changed ] || changed=1
  step_file "$UNITS/minio.service" 0644 <"$here/provisioning/systemd/minio.service"
  unit_status=$last_status
  [ "$unit_status" != changed ] || changed=1
  [ "$unit_status" = unchanged ] || step_run systemctl daemon-reload
  [ "$changed" = 0 ] || step_run systemctl try-restart minio
  step_run systemctl enable --now minio
  record service=minio
  step_run --hint "MinIO is not ready; see: journalctl -u minio --no-pager | tail -n 50" \
    curl -fsS -o /dev/null --retry 30 --retry-delay 2 --retry-connrefused \
    "http://127.0.0.1:$minio_port/minio/health/ready"
  step_dir "$MC_CONFIG" 0700 root tree
  local mc=(MC_CONFIG_DIR="$MC_CONFIG" /usr/local/bin/mc)
  step_run --input "$minio_root_user"$'\n'"$minio_root_password" \
    "${mc[@]}" alias set appliance "http://127.0.0.1:$minio_port"
  step_run "${mc[@]}" mb --ignore-existing appliance/appliance
  step_run "${mc[@]}" admin user add appliance appliance "$s3_secret"
  step_run --ok-if "already in effect" "${mc[@]}" admin policy attach appliance readwrite --user appliance

  # The appliance: its virtual environment, its home and settings, the agent service.
  changed=0
  if [ -x "$root$VENV/bin/python" ]; then
    say ok "$VENV exists"
  else
    step_run "$python" -m venv "$VENV"
  fi
  local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
  if [ -n "$bundle" ]; then
    local wheels=() wheel
    for i in "${!art_kind[@]}"; do
      [ "${art_kind[$i]}" = wheel ] || continue
      wheels+=("$(basename "${art_path[$i]}")")
      step_artifact "$i" "$BUNDLE_DIR/wheels/${wheels[-1]}" 0644
    done
    for wheel in "$root$BUNDLE_DIR"/wheels/*.whl; do  # an earlier bundle's: not to be picked
      [ -e "$wheel" ] || continue
      case " ${wheels[*]} " in *" ${wheel##*/} "*) continue ;; esac
      say remove "$BUNDLE_DIR/wheels/${wheel##*/} (not in this bundle)"
      [ "$dry_run" = 1 ] || rm -f "$wheel"
    done
    i=$(artifact_index appliance)
    step_run "${pip[@]}" --no-index --find-links "$BUNDLE_DIR/wheels" "appliance==${art_version[$i]}"
  else
    step_run "${pip[@]}" -c "$here/constraints.txt" "torch==2.13.0"
    step_run "${pip[@]}" -c "$here/constraints.txt" "$here"
  fi
  s3_endpoint="$advertise:$minio_port"
  runtime_image=${image_refs[$RUNTIME_IMAGE_ARTIFACT]:-$RUNTIME_IMAGE_ARTIFACT:$(appliance_version)}
  {
    echo "# Written by install.sh --server: the k3s executor and MinIO (keys: appliance/config.py)."
    echo 'store = "s3"'
    echo 'executor = "k3s"'
    echo
    echo "[s3]"
    echo "endpoint = \"$s3_endpoint\""
    echo 'bucket = "appliance"'
    echo 'access_key = "appliance"'
    echo "secret_key = \"$s3_secret\""
    echo
    echo "[k3s]"
    echo 'namespace = "appliance"'
    echo "image = \"$runtime_image\""
    echo "kubeconfig = \"$HOME_DIR/kubeconfig\""
  } | step_settings "$HOME_DIR/appliance.toml" 0600 appliance
  [ "$last_status" != changed ] || changed=1
  step_wait_file "$K3S_KUBECONFIG" 120
  step_copy_from "$K3S_KUBECONFIG" "$HOME_DIR/kubeconfig" 0600 appliance
  [ "$last_status" != changed ] || changed=1
  step_file "$UNITS/appliance-agent.service" 0644 <"$here/provisioning/systemd/appliance-agent.service"
  unit_status=$last_status
  [ "$unit_status" != changed ] || changed=1
  [ "$unit_status" = unchanged ] || step_run systemctl daemon-reload
  [ "$changed" = 0 ] || step_run systemctl try-restart appliance-agent
  step_run systemctl enable --now appliance-agent
  record service=appliance-agent

  write_state
  # quoted as a shell reads it, so that it pastes as it is (a bundle name with spaces, say)
  local join=(sudo ./install.sh --agent --server "https://$advertise:$K3S_API_PORT" --token-file ./node-token)
  [ -z "$bundle" ] || join+=(--bundle "$(basename "$bundle")")
  say next "status: sudo -u appliance $VENV/bin/appliance cluster status --home $HOME_DIR"
  say next "join an agent: copy $K3S_NODE_TOKEN to it as ./node-token (mode 0600), then run there:"
  say next "$(show_cmd "${join[@]}")"
  [ "$dry_run" = 0 ] || say note "dry run: nothing was changed"
}

# ---------------------------------------------------------------------------------------------
# --agent

token="" token_hash="" token_password="" token_bearer=""
read_token() {
  if [ ! -f "$token_file" ] || [ ! -r "$token_file" ]; then
    die "--token-file $token_file: cannot read it; copy the server's $K3S_NODE_TOKEN here (mode 0600)"
  fi
  token=$(head -n 1 "$token_file" | tr -d '[:space:]')
  [ -n "$token" ] || die "--token-file $token_file: the file is empty; copy the server's $K3S_NODE_TOKEN here"
  secrets+=("$token")
  if [[ $token =~ ^K10([0-9a-f]{64})::([^:]+):(.+)$ ]]; then
    token_hash=${BASH_REMATCH[1]} token_password=${BASH_REMATCH[3]}
  elif [[ $token =~ ^K10([0-9a-f]{64})::([a-z0-9]{6}\.[a-z0-9]{16})$ ]]; then
    token_hash=${BASH_REMATCH[1]} token_bearer=${BASH_REMATCH[2]}
  elif [[ $token == K10* ]]; then
    die "--token-file $token_file: not a k3s token (K10<CA hash>::<user>:<password>); copy the server's $K3S_NODE_TOKEN"
  elif [[ $token =~ ^[a-z0-9]{6}\.[a-z0-9]{16}$ ]]; then
    token_bearer=$token
  else
    token_password=$token
  fi
  secrets+=("$token_password" "$token_bearer")
}

PY_CA_HASH='
import base64, hashlib, re, sys
data = base64.b64decode(sys.stdin.read())
blocks = re.findall(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", data, re.S)
if not blocks:
    print("none")
    sys.exit(0)
# k3s hashes the bundle as served when it holds one certificate, else its root (DER)
hashes = {hashlib.sha256(data).hexdigest()}
if len(blocks) > 1:
    hashes |= {hashlib.sha256(base64.b64decode(b"".join(b.split()))).hexdigest() for b in blocks}
print("match" if sys.argv[1] in hashes else "mismatch")
'

check_server() {  # the server answers and accepts the token, before anything changes
  local host_port=${server_url#https://} cacerts rc=0 verdict code config
  cacerts=$(curl -fsSk --max-time 10 "$server_url/cacerts" 2>/dev/null | base64 -w0) || rc=$?
  if [ "$rc" != 0 ]; then
    case "$rc" in
      6) verdict="cannot resolve the host" ;;
      7) verdict="nothing answers at $host_port" ;;
      28) verdict="no answer within 10 s" ;;
      35|60) verdict="TLS handshake failed" ;;
      22) verdict="it answered /cacerts with an HTTP error: is it a k3s server?" ;;
      *) verdict="curl exit $rc" ;;
    esac
    die "--server $server_url: cannot reach the k3s server ($verdict); check the address, that k3s runs there, and that port $K3S_API_PORT is open to this node"
  fi
  verdict=$(printf '%s' "$cacerts" | "$python" -I -c "$PY_CA_HASH" "$token_hash")
  if [ "$verdict" = none ]; then
    die "--server $server_url: it answered /cacerts without a certificate: is it a k3s server?"
  fi
  if [ -n "$token_hash" ] && [ "$verdict" != match ]; then
    die "--token-file $token_file: the token's CA hash does not match the CA of $server_url: a token from another server, or another server at this address"
  fi
  if [ -z "$token_hash" ]; then
    warn "--token-file $token_file: a short token (no K10 CA hash): the server's CA is not checked; the full token in the server's $K3S_NODE_TOKEN lets it be"
  fi
  # the password: the agent's own first request, /v1-k3s/readyz as user "node"
  if [ -n "$token_bearer" ]; then
    config="header = \"Authorization: Bearer $token_bearer\""
  else
    local pw=${token_password//\\/\\\\}
    pw=${pw//\"/\\\"}
    config="user = \"node:$pw\""
  fi
  code=$(printf '%s\n' "$config" \
    | curl -sk --max-time 10 -K - -o /dev/null -w '%{http_code}' "$server_url/v1-k3s/readyz" || true)
  case "$code" in
    200) ;;
    401|403) die "--token-file $token_file: $server_url refused the token (HTTP $code): copy the server's $K3S_NODE_TOKEN again" ;;
    503) die "--server $server_url: the server is not ready yet (HTTP 503); try again in a minute" ;;
    *) die "--server $server_url: unexpected answer to the token check (HTTP ${code:-none})" ;;
  esac
  if [ -n "$token_hash" ]; then
    say check "server $server_url: reachable, its CA matches the token, the token is accepted"
  else
    say check "server $server_url: reachable, the token is accepted (CA not checked: short token)"
  fi
}

agent_install() {
  check_root
  check_platform
  check_python
  read_token
  load_artifacts
  check_gpus
  require_artifacts k3s k3s-install
  if [ -n "$bundle" ]; then
    require_artifacts k3s-airgap-images "$RUNTIME_IMAGE_ARTIFACT"
    [ "$gpus" = 0 ] || require_artifacts nvidia-device-plugin
  else
    warn_without_runtime_image
  fi
  check_address
  check_not_foreign
  check_machine
  stop_if_problems
  check_server

  # Nothing changed up to here.
  step_dir "$OPT" 0755 root tree
  step_dir "$ETC" 0755
  printf '%s\n' "$token" | step_file "$K3S_JOIN_TOKEN" 0600
  [ "$last_status" = unchanged ] || k3s_config_changed=1
  install_k3s_files agent
  run_k3s_installer agent
  write_state
  say next "check on the server: appliance cluster nodes"
  [ "$gpus" = 0 ] || say next "its GPUs: the server's device plugin starts here (node label $GPU_LABEL)"
  [ "$dry_run" = 0 ] || say note "dry run: nothing was changed"
}

# ---------------------------------------------------------------------------------------------
# The record of what was installed: /etc/appliance/install.state, read by --uninstall.

appliance_version() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$here/appliance/__init__.py"; }

write_state() {
  local version line path old=()
  version=$(appliance_version)
  if [ -f "$root$STATE" ]; then  # keep what an earlier run recorded and is still there
    while IFS= read -r line; do
      case "$line" in
        file=*|tree=*|keep=*) [ -e "$root${line#*=}" ] && old+=("$line") ;;
        user=*|service=*) old+=("$line") ;;
        written=*)  # the sha256 of what install.sh last wrote, unless this run wrote anew
          path=${line#written=} path=${path% sha256:*}
          [ -e "$root$path" ] || continue
          case " ${recorded[*]-} " in *" written=$path sha256:"*) continue ;; esac
          old+=("$line")
          ;;
      esac
    done <"$root$STATE"
  fi
  {
    echo "# What install.sh installed on this node; ./install.sh --uninstall reads it."
    echo "mode=$mode"
    echo "version=$version"
    echo "bundle=${bundle_label:-none}"
    echo "k3s=$mode"
    printf '%s\n' ${recorded[@]+"${recorded[@]}"} ${old[@]+"${old[@]}"} | LC_ALL=C sort -u
  } | step_file "$STATE" 0644
  state_written=1
}

# ---------------------------------------------------------------------------------------------
# --uninstall

prune_dirs() {  # DIR: remove DIR and its parents while empty, up to the system's own dirs
  local dir=$1
  while :; do
    case "$dir" in
      /|/etc|/etc/default|/etc/systemd|/etc/systemd/system|/usr|/usr/local|/usr/local/bin|/opt|/var|/var/lib|/srv) return 0 ;;
    esac
    rmdir "$root$dir" 2>/dev/null || return 0
    dir=$(dirname "$dir")
  done
}

uninstall() {
  local line kind path installed k3s_role script units_removed=0
  local files=() trees=() keeps=() users=() services=() writtens=() emptied=()
  check_root
  if [ ! -f "$root$STATE" ]; then
    say ok "nothing to uninstall: install.sh installed nothing here (no $STATE)"
    exit 0
  fi
  while IFS= read -r line; do
    kind=${line%%=*} path=${line#*=}
    case "$kind" in
      mode) installed=$path ;;
      k3s) k3s_role=$path ;;
      file) files+=("$path") ;;
      tree) trees+=("$path") ;;
      keep) keeps+=("$path") ;;
      user) users+=("$path") ;;
      service) services+=("$path") ;;
      written) writtens+=("$line") ;;
    esac
  done <"$root$STATE"
  if [ -n "${installed:-}" ]; then
    say check "installed: $installed (from $STATE)"
  else
    say check "installed: nothing; data kept by an earlier --uninstall (from $STATE)"
  fi
  under_keep() {  # PATH: inside a kept path (the home, the MinIO data, the credentials),
    # which the last step keeps, or removes with --purge
    local k
    for k in ${keeps[@]+"${keeps[@]}"}; do
      [ "$1" = "$k" ] || [ "${1#"$k"/}" != "$1" ] && return 0
    done
    return 1
  }

  for path in ${services[@]+"${services[@]}"}; do
    if [ -e "$root$UNITS/$path.service" ]; then
      step_run systemctl disable --now "$path"
    fi
  done
  if [ -n "${k3s_role:-}" ]; then
    if [ "$k3s_role" = agent ]; then script=/usr/local/bin/k3s-agent-uninstall.sh
    else script=/usr/local/bin/k3s-uninstall.sh
    fi
    if [ -x "$root$script" ]; then
      step_run "$script"
    else
      say ok "no $script: k3s is not installed"
    fi
  fi
  for path in ${files[@]+"${files[@]}"}; do
    [ "$path" != "$STATE" ] || continue
    if under_keep "$path"; then continue; fi
    if [ -e "$root$path" ] || [ -L "$root$path" ]; then
      say remove "$path"
      case "$path" in "$UNITS"/*) units_removed=1 ;; esac
      [ "$dry_run" = 1 ] || rm -f "$root$path"
      emptied+=("$(dirname "$path")")
    fi
  done
  for path in ${trees[@]+"${trees[@]}"}; do
    if under_keep "$path"; then continue; fi
    if [ -e "$root$path" ]; then
      say remove "$path (and everything in it)"
      [ "$dry_run" = 1 ] || rm -rf -- "$root${path:?}"
    fi
  done
  [ "$units_removed" = 0 ] || step_run systemctl daemon-reload
  local kept=()
  for path in ${keeps[@]+"${keeps[@]}"}; do
    [ -e "$root$path" ] || continue
    if [ "$purge" = 1 ]; then
      say remove "$path (--purge)"
      [ "$dry_run" = 1 ] || rm -rf -- "$root${path:?}"
    else
      say keep "$path (--purge removes it)"
      kept+=("keep=$path")
    fi
  done
  if [ "$purge" = 1 ]; then
    for path in ${users[@]+"${users[@]}"}; do
      if [ "$staging" = 1 ] || id -u "$path" >/dev/null 2>&1; then step_run userdel "$path"; fi
    done
  elif [ ${#users[@]} -gt 0 ]; then
    say keep "users ${users[*]} (they own the kept data; --purge removes them)"
    for path in "${users[@]}"; do kept+=("user=$path"); done
  fi
  if [ "$purge" = 0 ]; then  # a kept file's record: a re-install still updates it if untouched
    for line in ${writtens[@]+"${writtens[@]}"}; do
      path=${line#written=} path=${path% sha256:*}
      if [ -e "$root$path" ] && under_keep "$path"; then kept+=("$line"); fi
    done
  fi
  if [ ${#kept[@]} -gt 0 ]; then  # what was kept, for a later --uninstall --purge
    {
      echo "# Kept by ./install.sh --uninstall; ./install.sh --uninstall --purge removes them."
      printf '%s\n' "${kept[@]}"
    } | step_file "$STATE" 0644
  else
    say remove "$STATE"
    [ "$dry_run" = 1 ] || rm -f "$root$STATE"
  fi
  if [ "$dry_run" = 0 ]; then
    for path in ${emptied[@]+"${emptied[@]}"} "$ETC"; do prune_dirs "$path"; done
  fi
  [ "$dry_run" = 0 ] || say note "dry run: nothing was changed"
}

case "$mode" in
  server) server_install ;;
  agent) agent_install ;;
  uninstall) uninstall ;;
esac
