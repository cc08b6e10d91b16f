#!/usr/bin/env bash
# Runs every check and test of kiln: formatting, clippy, unit, property-based and
# end-to-end tests, and the SDKs' suites. Installs missing Debian packages first.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$KILN_ROOT"
started=$SECONDS

require_root
require_cargo
install_packages
require_sdk_tools

step "the package set-up, from a fresh machine's state (scripts/tests/fresh-install.sh)"
bash scripts/tests/fresh-install.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings

step "building the static guest agent (the boot tests install it in templates)"
KILN_AGENT_BIN=$(build_static_agent)
export KILN_AGENT_BIN

step "cargo test (the boot tests build the base and python templates on first run)"
cargo test --locked --workspace

step "the Python and TypeScript SDKs, the MCP server, the API contract and a 2-minute soak against a daemon of their own (scripts/tests/sdk.sh)"
KILN_BIN="$KILN_ROOT/target/debug/kiln" bash scripts/tests/sdk.sh

step "smoke: kiln bench tti (base, 3 sequential and 2 clients at once, warmed pre-started VMMs; no thresholds)"
target/debug/kiln bench tti --template base --no-network --gap-ms 1000 --iterations 3 \
  --clients 2 --rounds 1

printf '\nall checks passed in %d s\n' "$((SECONDS - started))"
