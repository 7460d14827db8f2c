#!/usr/bin/env bash
# Install check for the Python package: a fresh venv in a temp directory,
# `pip install ./bindings/python` (its setup.py builds the Rust library
# with cargo), then the README's example, run by the venv's python from a
# directory outside the repository against a real `ferry` server on an
# ephemeral loopback port.
#
#   FERRY_BIN=target/debug/ferry bindings/python/test-install.sh
#
# FERRY_FFI_PROFILE=debug reuses the dev library that `cargo xtask bindings`
# built (sdk-ffi/test.sh does); the default is a release build. Honours
# CARGO_TARGET_DIR. Needs network access to PyPI for setuptools (pip's
# isolated build environment), cached after the first run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
t0=$(date +%s)
: "${FERRY_BIN:=${CARGO_TARGET_DIR:-$repo/target}/debug/ferry}"
test -x "$FERRY_BIN" || { echo "no ferry binary at $FERRY_BIN (cargo build -p ferry-server --bin ferry)" >&2; exit 1; }

tmp=$(mktemp -d)
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

python3 -m venv "$tmp/venv"
# --no-cache-dir keeps pip from reusing a wheel built from an older library.
"$tmp/venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "$here"
echo "pip install ./bindings/python: $(( $(date +%s) - t0 )) s"

# A server with dev auth (the token is the user id) and the example's
# `readonly` namespace, where clients may not publish.
cat >"$tmp/ferry.toml" <<'TOML'
[limits]
publish_rate = 0
max_connections_per_user = 0
connections_per_ip_per_minute = 0

[namespaces.readonly]
client_publish = false
TOML
FERRY_LOG=warn "$FERRY_BIN" serve --config "$tmp/ferry.toml" --listen 127.0.0.1:0 --data-dir "$tmp/data" \
  </dev/null >"$tmp/server.out" 2>"$tmp/server.err" &
server_pid=$!
for _ in $(seq 150); do
  [ -s "$tmp/server.out" ] && break
  sleep 0.1
done
# "ferry listening on ws://127.0.0.1:PORT/ws (health: ...)"
url=$(awk 'NR == 1 { print $4 }' "$tmp/server.out")
case "$url" in ws://127.0.0.1:*) ;; *) echo "ferry did not start:"; cat "$tmp/server.out" "$tmp/server.err"; exit 1 ;; esac

# The README's first python block, with the server's URL and a temp state dir.
awk '/^```python$/ { on = 1; next } on && /^```$/ { exit } on' "$here/README.md" \
  | sed -e "s#ws://127.0.0.1:8000/ws#$url#" -e "s#/var/lib/svc#$tmp/state#" >"$tmp/example.py"
grep -q "$url" "$tmp/example.py" || { echo "README example: URL placeholder not found" >&2; exit 1; }
mkdir "$tmp/state"
run_example() {
  (cd "$tmp" && rm -rf state && mkdir state && timeout 60 "$tmp/venv/bin/python" -c '
import ferry, sys
assert "/venv/" in ferry.__file__, ferry.__file__   # the installed package, not the source tree
sys.argv = ["example.py"]
exec(compile(open("example.py").read(), "example.py", "exec"))
')
}
# KNOWN BUG (open): about 1 run in 5 the interpreter aborts at exit with
# "FATAL: exception not rethrown" after the example's output is complete: a
# tokio worker finishing the client's driver task enters Python while the
# interpreter shuts down. Until it is fixed, an abort (134) is retried once
# and reported; any other failure, or two aborts, fails.
rc=0
stored="stored at 1"
out=$(run_example) || rc=$?
if [ "$rc" = 134 ]; then
  echo "README example: aborted at interpreter exit (known bug, see the comment above); retrying once" >&2
  out=$(run_example)
  # The aborted run stored its publication first.
  stored="stored at 2"
elif [ "$rc" != 0 ]; then
  echo "README example failed ($rc)" >&2
  exit 1
fi
echo "$out"
for want in "live at" "$stored" "refused"; do
  grep -q "$want" <<<"$out" || { echo "README example: no '$want' in its output" >&2; exit 1; }
done
echo "python package: installed in a clean venv and the README example ran in $(( $(date +%s) - t0 )) s"
