#!/usr/bin/env bash
# kiln's main job on this machine: install what is missing, build, and run.
#
# Until the engine lands this builds the static guest agent and the `kiln` CLI, runs the
# agent's end-to-end self-test on this host (in private namespaces) and builds the default
# template. It will grow into: start the daemon on the embedded default and run a first
# sandbox.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$KILN_ROOT"
started=$SECONDS

require_root
require_cargo
install_missing_tools

step "building the static guest agent"
agent=$(build_static_agent)
if readelf -d "$agent" | grep -q NEEDED; then die "$agent links shared libraries; the guest needs a static binary"; fi

step "building the kiln CLI"
cargo build --release --locked -p kiln-cli

step "agent self-test (agent on this host, in private namespaces)"
KILN_AGENT_BIN="$agent" "$KILN_ROOT/target/release/kiln" agent selftest

step "building the default template (kernel, initramfs, root filesystem; cached after the first run)"
KILN_AGENT_BIN="$agent" "$KILN_ROOT/target/release/kiln" template build python

printf '\nkiln is built: %s\n' "$KILN_ROOT/target/release/kiln"
printf 'done in %d s\n' "$((SECONDS - started))"
