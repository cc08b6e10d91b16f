#!/usr/bin/env bash
# kiln's main job on this machine: install what is missing, build, start the daemon on the
# embedded default (single node, SQLite, local disk) and run a first sandbox.
#
# The daemon runs in the background (these machines have no systemd; on hosts that do, see
# deploy/kiln.service). Its log: /var/log/kiln/daemon.log; stop it: bash scripts/down.sh.
# Settings (all optional): KILN_LISTEN (127.0.0.1:7070), KILN_DATA_DIR (/var/lib/kiln),
# KILN_CACHE_DIR (/var/cache/kiln), KILN_ACCEL (auto).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$KILN_ROOT"
started=$SECONDS

require_root
require_cargo
install_packages

step "building the static guest agent"
agent=$(build_static_agent)
if readelf -d "$agent" | grep -q NEEDED; then die "$agent links shared libraries; the guest needs a static binary"; fi

step "building the kiln CLI and daemon"
cargo build --release --locked -p kiln-cli
kiln="$KILN_ROOT/target/release/kiln"

step "agent self-test (agent on this host, in private namespaces)"
KILN_AGENT_BIN="$agent" "$kiln" agent selftest

step "building the default template (kernel, initramfs, root filesystem; cached after the first run)"
KILN_AGENT_BIN="$agent" "$kiln" template build python

listen=${KILN_LISTEN:-127.0.0.1:7070}
url="http://$listen"
step "starting the daemon on $listen"
stop_daemon keep
mkdir -p "$(dirname "$KILN_PID_FILE")" "$(dirname "$KILN_LOG_FILE")"
KILN_TEMPLATES_DIR="$KILN_ROOT/templates" KILN_LISTEN="$listen" \
  setsid "$kiln" serve --agent "$agent" >>"$KILN_LOG_FILE" 2>&1 </dev/null &
daemon=$!
echo "$daemon" >"$KILN_PID_FILE"
daemon_up() {
  curl -fsS "$url/v1/health" >/dev/null 2>&1 && return 0
  if ! kill -0 "$daemon" 2>/dev/null; then
    tail -n 20 "$KILN_LOG_FILE" >&2
    die "the daemon exited; its log is $KILN_LOG_FILE"
  fi
  return 1
}
poll 600 daemon_up || die "the daemon does not answer on $url; see $KILN_LOG_FILE"

config="${XDG_CONFIG_HOME:-$HOME/.config}/kiln/cli.toml"
if [ ! -s "$config" ] || ! "$kiln" --url "$url" template ls >/dev/null 2>&1; then
  step "making an admin API key for this user ($config)"
  "$kiln" keys create --tenant default --name "$(id -un)@$(hostname)" --admin --save "$url" >/dev/null
fi

step "a first sandbox (the first create of a template bakes it: a few seconds)"
"$kiln" --url "$url" run -- python3 -c 'import platform; print(f"hello from kiln: Python {platform.python_version()} on {platform.node()}")'

cat <<MSG

kiln is running at $url (log: $KILN_LOG_FILE, stop: bash scripts/down.sh)
  $kiln sandbox create            # prints an id
  $kiln exec <id> -- uname -a
  $kiln run -- python3 -c 'print(6 * 7)'
  curl -H "Authorization: Bearer <key>" $url/v1/sandboxes   (key: $config)
done in $((SECONDS - started)) s
MSG
