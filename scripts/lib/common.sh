# Shared helpers of kiln's scripts. Source it; do not run it.

KILN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export KILN_ROOT

# A step's heading, with the seconds since the script started (where CI time goes).
step() { printf '\n==> [%d s] %s\n' "$SECONDS" "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

source "$KILN_ROOT/scripts/lib/packages.sh"

# Runs "$@" every 0.1 s until it succeeds, at most N times; fails if it never does.
poll() {
  local times=$1
  shift
  for _ in $(seq 1 "$times"); do
    "$@" && return 0
    sleep 0.1
  done
  return 1
}

process_gone() { ! kill -0 "$1" 2>/dev/null; }

require_root() {
  [ "$(id -u)" -eq 0 ] || die "run as root: kiln installs packages and creates namespaces, cgroups, disks and VMs"
}

require_cargo() {
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (stable, via rustup) and re-run"
}

# The SDKs' test suites need Python 3 with venv and Node.js 20+ with npm (both on kiln's
# build machines; Debian 12's own nodejs is 18). Checked before the long test run starts.
require_sdk_tools() {
  python3 -c 'import venv, ensurepip' 2>/dev/null ||
    die "the SDK tests need Python 3 with venv: apt-get install python3-venv (or a python3 that has it first in PATH)"
  command -v node >/dev/null && command -v npm >/dev/null ||
    die "the SDK tests need Node.js 20 or later with npm (https://nodejs.org; Debian 12's nodejs is 18)"
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  [ "$major" -ge 20 ] || die "Node.js $(node --version) is too old: the TypeScript SDK needs 20 or later"
}

# Builds the static guest agent; prints its path.
build_static_agent() {
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu -p kiln-agent >&2
  echo "$KILN_ROOT/target/x86_64-unknown-linux-gnu/release/kiln-agent"
}

# Where scripts/up.sh keeps the daemon's pid and log.
KILN_PID_FILE=${KILN_PID_FILE:-/run/kiln/kiln.pid}
KILN_LOG_FILE=${KILN_LOG_FILE:-/var/log/kiln/daemon.log}

# Stops the daemon recorded in $KILN_PID_FILE, if that pid still is a kiln daemon (a pid
# alone may have been reused: its command line must be `kiln serve`). With `keep` its
# sandboxes keep running (SIGTERM; the next start re-adopts them), else they are destroyed
# (SIGINT).
stop_daemon() {
  [ -s "$KILN_PID_FILE" ] || return 0
  local pid signal=INT
  [ "${1:-}" = keep ] && signal=TERM
  pid=$(cat "$KILN_PID_FILE")
  if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "kiln serve"; then
    step "stopping the daemon (pid $pid, SIG$signal)"
    kill -"$signal" "$pid"
    poll 300 process_gone "$pid" || die "the daemon (pid $pid) did not stop; see $KILN_LOG_FILE"
  fi
  rm -f "$KILN_PID_FILE"
}
