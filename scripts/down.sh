#!/usr/bin/env bash
# Stops the daemon scripts/up.sh started. By default it destroys its sandboxes first
# (SIGINT); with --keep they keep running and the next start re-adopts them (SIGTERM).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
require_root
case "${1:-}" in
  --keep) stop_daemon keep ;;
  "") stop_daemon ;;
  *) die "usage: scripts/down.sh [--keep]" ;;
esac
