#!/usr/bin/env bash
# Installs what the tests need (idempotently) and runs every check.
# Usage: scripts/test-all.sh      (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
rustup target add wasm32-unknown-unknown >/dev/null

step "redis-server and redis-cli (the Redis engine's tests start private ones on loopback ports)"
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
redis-server --version

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "ferry-core builds for wasm32-unknown-unknown"
cargo build -p ferry-core --target wasm32-unknown-unknown

step "ferry-core has no async runtime, browser or FFI dependency"
deps=$(cargo tree -p ferry-core -e normal --prefix none --format '{p}')
bad=$(printf '%s\n' "$deps" | grep -E '^(tokio|mio|web-sys|js-sys|wasm-bindgen|uniffi)( |$)' || true)
if [ -n "$bad" ]; then
  echo "forbidden dependencies of ferry-core:"; echo "$bad"; exit 1
fi
echo "ok: $(printf '%s\n' "$deps" | sort -u | wc -l) crates, none forbidden"

step "fuzz targets compile"
if [ -f fuzz/Cargo.toml ]; then
  (cd fuzz && cargo check --quiet --bins)
fi

step "cargo test (workspace; --nocapture shows the property-test fault mix and scenario figures)"
cargo test --workspace -- --nocapture

step "deployment files: compose config, systemd-analyze verify, the Dockerfile's runtime stage built with buildah and run (uid, health check)"
bash scripts/container-check.sh "${CARGO_TARGET_DIR:-$PWD/target}/debug/ferry"

step "ferry-wsload smoke: issue 15's benchmark end to end at tiny sizes, Ferry beside nats-server (figures printed, no timing asserted)"
if ! command -v nats-server >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nats-server >/dev/null
fi
cargo run --quiet -p ferry-wsload -- --ferry-bin "${CARGO_TARGET_DIR:-$PWD/target}/debug/ferry" --out "$(mktemp -d)" smoke

step "admin console: headless Chromium against the real server (log in, see a client, publish, page history, disconnect; screenshots)"
FERRY_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/ferry" bash server/admin/test/test.sh

step "sdk-wasm: one wasm-pack build (one .wasm for the web, bundler and node entries), size budget, npm pack + install; browser, Node, mini-program and web-chat tests against the real server"
FERRY_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/ferry" bash sdk-wasm/test.sh

step "sdk-ffi: cargo xtask bindings (drift check + generation); Python end-to-end, pip install in a clean venv, and Kotlin JVM smoke against the real server"
bash sdk-ffi/test.sh
