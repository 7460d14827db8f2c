#!/usr/bin/env bash
# The admin console in headless Chromium against the real `ferry` binary
# (see console.test.mjs). Installs what it needs, idempotently: Debian's
# chromium, and playwright-core from npm (pinned in package-lock.json; it
# never downloads a browser).
#
#   server/admin/test/test.sh                       # builds the debug ferry binary
#   FERRY_BIN=/path/to/ferry server/admin/test/test.sh
#
# Screenshots go to server/admin/test/out/ (or $ADMIN_TEST_OUT).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x /usr/bin/chromium ]; then
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi
command -v node >/dev/null || { echo "node (>= 20) is required" >&2; exit 1; }
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "node >= 20 is required (found $(node --version))" >&2
  exit 1
fi
# A relative FERRY_BIN means relative to where the script was started.
if [ -n "${FERRY_BIN:-}" ]; then FERRY_BIN="$(realpath "$FERRY_BIN")"; fi
cd "$here"
if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
if [ -z "${FERRY_BIN:-}" ]; then
  (cd "$repo" && cargo build -p ferry-server --bin ferry)
  FERRY_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/ferry"
fi
test -x "$FERRY_BIN" || { echo "no ferry binary at $FERRY_BIN" >&2; exit 1; }
export FERRY_BIN
# Node 20 has a global WebSocket only behind a flag (Node >= 22: always).
node_flags=()
[ "$node_major" -lt 22 ] && node_flags+=(--experimental-websocket)
node "${node_flags[@]}" console.test.mjs
