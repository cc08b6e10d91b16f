#!/usr/bin/env bash
# The clients' test suites against a real daemon with real sandboxes: the SDKs' and the MCP
# server's (through the official MCP Python SDK, over the daemon's /mcp and `kiln mcp`).
#
# Starts `kiln serve` on a free loopback port with a data directory of its own (sandbox
# networking off: nothing leaves the sandboxes), makes a key for each of two tenants, then
# runs the Python SDK's checks (mypy --strict, pytest), the TypeScript SDK's (tsc,
# node --test), the MCP tests (pytest), the API contract test (schemathesis) and the
# reliability suite's soak, fault and abuse checks (`kiln check soak`, $KILN_SOAK_SECS,
# default 120 s; `kiln check faults`; `kiln check abuse`) against it.
# Each tenant may have 16 live sandboxes, so the contract test's stateful phase cannot fill
# the host.
# The daemon is stopped with SIGINT on exit, also on failure, which destroys every sandbox
# it made; its log is printed when a suite fails.
#
# The test environments come from the lock files and are cached under $KILN_CACHE_DIR/sdk/,
# keyed on them: sdk/python/requirements-test.txt, sdk/typescript/package-lock.json,
# tests/mcp/requirements.txt, tests/contract/requirements.txt.
#
# Needs: the kiln binary ($KILN_BIN, default target/debug/kiln) and the static agent
# ($KILN_AGENT_BIN), as scripts/test.sh builds them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
cd "$KILN_ROOT"
require_root
require_sdk_tools
started=$SECONDS

kiln_bin=${KILN_BIN:-$KILN_ROOT/target/debug/kiln}
[ -x "$kiln_bin" ] || die "$kiln_bin not found: build it with \`cargo build -p kiln-cli\` (or set KILN_BIN)"
[ -n "${KILN_AGENT_BIN:-}" ] || die "KILN_AGENT_BIN is not set: scripts/test.sh builds the static agent"
cache_root=${KILN_CACHE_DIR:-/var/cache/kiln}
only=${1:-all}

work=$(mktemp -d /tmp/kiln-sdk-test.XXXXXX)
daemon_pid=
cleanup() {
  local status=$?
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -INT "$daemon_pid"
    poll 600 process_gone "$daemon_pid" || kill -KILL "$daemon_pid"
    wait "$daemon_pid" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ] && [ -f "$work/daemon.log" ]; then
    printf '\n--- daemon log (last 80 lines) ---\n' >&2
    tail -n 80 "$work/daemon.log" >&2
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

# A Python test environment: a venv with the packages pinned in $1, keyed on that file.
python_env() {
  local requirements=${1:-sdk/python/requirements-test.txt} name=${2:-python} key venv
  key=$(sha256sum "$requirements" | cut -c1-16)
  venv="$cache_root/sdk/$name-$key"
  if [ ! -f "$venv/.complete" ]; then
    step "Python test environment ($venv)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || die "python3 -m venv failed: install Python 3 with venv (apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
    touch "$venv/.complete"
  fi
  echo "$venv"
}

# The TypeScript test environment: node_modules from the lock file, keyed on it.
node_env() {
  local key modules
  key=$(sha256sum sdk/typescript/package-lock.json | cut -c1-16)
  modules="$cache_root/sdk/node-$key"
  if [ ! -f "$modules/.complete" ]; then
    step "TypeScript test environment ($modules)" >&2
    rm -rf "$modules"
    mkdir -p "$modules"
    cp sdk/typescript/package.json sdk/typescript/package-lock.json "$modules/"
    (cd "$modules" && npm ci --ignore-scripts --silent --no-audit --no-fund) >&2
    touch "$modules/.complete"
  fi
  echo "$modules/node_modules"
}

# A browser origin the daemon lets call /mcp (the MCP tests check it and a refused one).
mcp_allowed_origin=http://app.example:8080

start_daemon() {
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  echo "# defaults and flags only" >"$work/config.toml"
  KILN_CONFIG="$work/config.toml" "$kiln_bin" serve \
    --listen "127.0.0.1:$port" \
    --data-dir "$work/state" \
    --cache-dir "$cache_root" \
    --templates-dir "$KILN_ROOT/templates" \
    --agent "$KILN_AGENT_BIN" \
    --default-template base \
    --network off \
    --max-sandboxes-per-tenant 16 \
    --mcp-allowed-origin "$mcp_allowed_origin" \
    >"$work/daemon.log" 2>&1 &
  daemon_pid=$!
  export KILN_URL="http://127.0.0.1:$port"
  poll 1200 curl -fsS -o /dev/null "$KILN_URL/v1/health" || die "the daemon did not start (log above)"
  KILN_API_KEY=$(KILN_DATA_DIR="$work/state" HOME="$work" "$kiln_bin" keys create --tenant sdk-tests)
  KILN_OTHER_API_KEY=$(KILN_DATA_DIR="$work/state" HOME="$work" "$kiln_bin" keys create --tenant other-tenant)
  export KILN_API_KEY KILN_OTHER_API_KEY
  # Templates the suites use are built and baked before any test's clock starts.
  local template
  for template in base python; do
    curl -fsS -N -H "Authorization: Bearer $KILN_API_KEY" -H 'content-type: application/json' \
      -d "{\"name\": \"$template\"}" "$KILN_URL/v1/templates" | tail -n 1 | grep -q '"ready"' ||
      die "baking the $template template failed"
  done
}

python_suite() {
  local venv pkg
  venv=$(python_env)
  step "Python SDK: black --check, mypy --strict"
  (cd sdk/python && "$venv/bin/black" --check src tests && "$venv/bin/mypy" src tests)
  step "Python SDK: installed with pip from the repository path"
  pkg="$work/python-pkg"
  # From a copy: a build writes build/ and *.egg-info beside its sources.
  cp -r sdk/python "$work/python-src"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --target "$pkg" "$work/python-src"
  [ -f "$pkg/kiln/py.typed" ] || die "the installed package lacks py.typed"
  step "Python SDK: pytest"
  (cd sdk/python && PYTHONPATH="$pkg" "$venv/bin/pytest" -q -p no:cacheprovider --durations=5 tests)
}

typescript_suite() {
  local modules ts="$work/typescript"
  modules=$(node_env)
  # Built out of the tree: the repository keeps no node_modules or build output.
  mkdir -p "$ts"
  cp -r sdk/typescript/src sdk/typescript/test sdk/typescript/package.json sdk/typescript/.prettierrc.json \
    sdk/typescript/tsconfig.json sdk/typescript/tsconfig.test.json "$ts/"
  ln -s "$modules" "$ts/node_modules"
  step "TypeScript SDK: prettier --check, tsc (library, then library and tests)"
  (cd "$ts" && node_modules/.bin/prettier --check --log-level warn src test &&
    node_modules/.bin/tsc -p tsconfig.json && node_modules/.bin/tsc -p tsconfig.test.json)
  step "TypeScript SDK: node --test"
  (cd "$ts" && KILN_REPO_ROOT="$KILN_ROOT" node --test --test-concurrency=1 dist-test/test/*.test.js)
}

mcp_suite() {
  local venv tools
  venv=$(python_env tests/mcp/requirements.txt mcp)
  tools=$(python_env)
  step "MCP: black --check"
  "$tools/bin/black" --check --line-length 100 tests/mcp
  step "MCP: pytest (the official MCP Python SDK over streamable HTTP and stdio)"
  (cd tests/mcp && KILN_BIN="$kiln_bin" KILN_MCP_ALLOWED_ORIGIN="$mcp_allowed_origin" \
    "$venv/bin/pytest" -q -p no:cacheprovider --durations=5 .)
}

# The API contract: schemathesis against the OpenAPI document (tests/contract/schemathesis.toml
# says what it runs and bounds). Update tests/contract/baseline.json with KILN_CONTRACT_UPDATE=1.
contract_suite() {
  local venv key sandbox run="$work/contract"
  venv=$(python_env tests/contract/requirements.txt contract)
  key=$(KILN_DATA_DIR="$work/state" HOME="$work" "$kiln_bin" keys create --tenant contract --admin 2>/dev/null)
  sandbox=$(curl -fsS -H "Authorization: Bearer $key" -H 'content-type: application/json' \
    -d '{"template": "base"}' "$KILN_URL/v1/sandboxes" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])') ||
    die "creating the contract test's sandbox failed"
  # From a copy: hypothesis keeps its example database beside the configuration.
  mkdir -p "$run"
  cp tests/contract/schemathesis.toml "$run/"
  if [ -f tests/contract/baseline.json ]; then cp tests/contract/baseline.json "$run/"; fi
  step "API contract: schemathesis $("$venv/bin/schemathesis" --version | awk '{print $NF}') (tests/contract)"
  local update=()
  [ -n "${KILN_CONTRACT_UPDATE:-}" ] && update=(--baseline-update --baseline-prune)
  (cd "$run" && KILN_CONTRACT_API_KEY="$key" KILN_CONTRACT_SANDBOX="$sandbox" \
    "$venv/bin/schemathesis" run "${update[@]}" --no-color --output-truncate false "$KILN_URL/v1/openapi.json") || {
    [ -n "${KILN_CONTRACT_UPDATE:-}" ] && cp "$run/baseline.json" tests/contract/baseline.json
    return 1
  }
  if [ -n "${KILN_CONTRACT_UPDATE:-}" ]; then cp "$run/baseline.json" tests/contract/baseline.json; fi
}

# The reliability suite's quick profile against the same daemon: the escape probes (on a
# daemon of their own), the soak (a steady mixed load, no error and nothing left allowed;
# the daemon's memory, descriptors and threads are reported), the fuzz (requests from the
# OpenAPI document, hostile frames against the agent client), the fault check (a VMM killed:
# its sandbox marked failed, the neighbour unaffected), the recovery faults (on a daemon of
# their own) and the abuse check (six abuses, each beside a neighbour whose execs are timed).
soak_suite() {
  local key
  key=$(KILN_DATA_DIR="$work/state" HOME="$work" "$kiln_bin" keys create --tenant soak 2>/dev/null)
  step "reliability: kiln check suite --profile quick (escape probes as root with their controls, a ${KILN_SOAK_SECS:-120} s soak, 500 fuzzed API requests and 50,000 hostile agent frames, a VMM killed with SIGKILL, recovery faults with 10 sandboxes, 6 abuses beside a neighbour)"
  "$kiln_bin" check suite --url "$KILN_URL" --api-key "$key" --profile quick \
    --soak-secs "${KILN_SOAK_SECS:-120}" --daemon-pid "$daemon_pid" \
    --templates-dir "$KILN_ROOT/templates" --agent "$KILN_AGENT_BIN" --cache-dir "$cache_root"
}

case "$only" in
  python | typescript | mcp | contract | soak | all) ;;
  *) die "usage: $0 [python|typescript|mcp|contract|soak|all]" ;;
esac
step "a daemon for the client tests"
start_daemon
case "$only" in
  python) python_suite ;;
  typescript) typescript_suite ;;
  mcp) mcp_suite ;;
  contract) contract_suite ;;
  soak) soak_suite ;;
  all) python_suite; typescript_suite; mcp_suite; contract_suite; soak_suite ;;
esac
printf '\nclient tests passed in %d s\n' "$((SECONDS - started))"
