#!/usr/bin/env bash
# Stops the daemon scripts/up.sh started (SIGTERM: it destroys its sandboxes and exits).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
require_root
stop_daemon
