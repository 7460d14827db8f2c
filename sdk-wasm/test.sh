#!/usr/bin/env bash
# Build the Ferry wasm SDK (one .wasm shared by the web, bundler and Node
# entry points) and run its tests against the real `ferry` server: browser end-to-end (headless
# Chromium), Node end-to-end, the mini-program adapter, the chat example,
# a TypeScript check of the published types (including payloads that must
# not compile), the packed package installed in a fresh project, and a gzip
# size budget. Installs what it needs,
# idempotently: the wasm32 target, wasm-bindgen-cli matching Cargo.lock,
# wasm-pack, Debian's chromium, and playwright-core, typescript, binaryen and terser from npm.
#
#   sdk-wasm/test.sh            # from anywhere
#   FERRY_BIN=/path/to/ferry sdk-wasm/test.sh   # use an existing server binary
#
# Honours CARGO_TARGET_DIR (else the workspace's target/).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
start=$(date +%s)
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n== %s (%ss)\n' "$1" "$(($(date +%s) - start))"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

step "tools"
rustup target add wasm32-unknown-unknown >/dev/null

# wasm-pack drives the wasm-bindgen on PATH, which must match the crate
# version in Cargo.lock exactly. --debug builds in ~5 min instead of ~10
# with the same output; no --locked (a pinned dependency is missing from
# the registry mirror).
wb_version="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' "$repo/Cargo.lock")"
if [ -z "$wb_version" ]; then
  echo "wasm-bindgen is not in Cargo.lock" >&2
  exit 1
fi
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$wb_version" ]; then
  echo "installing wasm-bindgen-cli $wb_version"
  cargo install wasm-bindgen-cli --version "$wb_version" --debug --force
fi
if ! command -v wasm-pack >/dev/null; then
  # Never the npm wasm-pack: its postinstall downloads a binary.
  cargo install wasm-pack --version 0.15.1
fi
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
cd "$here"
if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi

step "wasm-pack build (one module; web, bundler and node entries)"
./build.sh
# What a browser downloads: the module, the wasm-bindgen glue, the client
# and its entry. Budget: 157,705 B measured at this commit (171,023 B
# before issue 16) plus ~2% headroom; raise it only on purpose.
SIZE_BUDGET_GZIP=161000
shipped=(pkg/ferry_wasm_bg.wasm pkg/ferry_wasm.js pkg/ferry.js pkg/web/index.js)
wasm_raw=$(wc -c <pkg/ferry_wasm_bg.wasm)
wasm_gz=$(gzip -9 -c pkg/ferry_wasm_bg.wasm | wc -c)
total_gz=0
for f in "${shipped[@]}"; do total_gz=$((total_gz + $(gzip -9 -c "$f" | wc -c))); done
echo "gzip -9 of .wasm + JS: $total_gz bytes (budget $SIZE_BUDGET_GZIP)"
if [ "$total_gz" -gt "$SIZE_BUDGET_GZIP" ]; then
  echo "size budget exceeded: gzip(.wasm + JS) = $total_gz > $SIZE_BUDGET_GZIP bytes" >&2
  exit 1
fi

step "clippy (wasm32)"
(cd "$repo" && cargo clippy -p ferry-wasm --target wasm32-unknown-unknown -- -D warnings)

step "ferry server"
if [ -z "${FERRY_BIN:-}" ]; then
  (cd "$repo" && cargo build -p ferry-server --bin ferry)
  FERRY_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/ferry"
fi
export FERRY_BIN
test -x "$FERRY_BIN" || { echo "no ferry binary at $FERRY_BIN" >&2; exit 1; }

step "TypeScript types"
node_modules/.bin/tsc -p tests/types/tsconfig.json

rm -rf tests/out
mkdir -p tests/out
# Node 20 has a global WebSocket only behind a flag (Node >= 22: always).
node_flags=()
[ "$node_major" -lt 22 ] && node_flags+=(--experimental-websocket)

step "npm package (pack, one .wasm, install in a fresh project, import by name)"
(cd pkg && npm pack --silent --json --pack-destination ../tests/out >../tests/out/pack.json)
node -e '
  const [p] = JSON.parse(require("fs").readFileSync("tests/out/pack.json", "utf8"));
  const wasm = p.files.filter((f) => f.path.endsWith(".wasm")).map((f) => f.path);
  if (wasm.length !== 1 || wasm[0] !== "ferry_wasm_bg.wasm") throw new Error("want one ferry_wasm_bg.wasm, got " + wasm);
  console.log(`packed: ${p.entryCount} files, ${p.size} B tarball, ${p.unpackedSize} B unpacked, one .wasm`);
'
unpacked=$(node -p 'JSON.parse(require("fs").readFileSync("tests/out/pack.json", "utf8"))[0].unpackedSize')
mkdir -p tests/out/consumer
(cd tests/out/consumer && echo '{"name":"consumer","private":true,"type":"module"}' >package.json \
  && npm install --silent --no-audit --no-fund --no-save ../ferry-client-*.tgz \
  && node "${node_flags[@]}" --input-type=module -e "
    const m = await import('@ferry/client');
    for (const n of ['FerryClient', 'FerryError', 'indexedDbStorage', 'miniProgramTransport']) {
      if (typeof m[n] !== 'function') throw new Error('@ferry/client lacks ' + n);
    }
    const s = m.memoryStorage();
    s.save('k', 'v');
    if (s.load('k') !== 'v') throw new Error('memoryStorage');
    // Loads the installed package's one .wasm through the node entry.
    const c = new m.FerryClient('ws://127.0.0.1:9/ws', { token: 't' });
    await c.ready;
    if (!c.deviceId) throw new Error('no device id after ready');
    c.close();
    const n = await import('@ferry/client/node');
    if (n.FerryClient !== m.FerryClient) throw new Error('node condition and ./node differ');
    console.log('@ferry/client imports by name (node condition) and loads its wasm:', Object.keys(m).length, 'exports');
  ")

step "Node end-to-end (node entry)"
node "${node_flags[@]}" tests/node.test.mjs
step "Node without a global WebSocket (a setup error, not a retry loop)"
# No --experimental-websocket here on purpose; Node >= 22 needs it turned off.
no_ws_flags=()
[ "$node_major" -ge 22 ] && no_ws_flags+=(--no-experimental-websocket)
node "${no_ws_flags[@]}" tests/no-websocket.test.mjs
step "bundler entry (the new URL(..., import.meta.url) asset pattern)"
node "${node_flags[@]}" tests/bundler.test.mjs
step "mini-program adapter (wx.connectSocket shim) and React Native adapter (RN-shaped WebSocket)"
node "${node_flags[@]}" tests/miniprogram.test.mjs
step "browser end-to-end (headless Chromium)"
node tests/browser.test.mjs
step "web-chat example"
node tests/webchat.test.mjs

step "figures"
printf 'wasm (one module for every entry; opt-level z, wasm-opt -Os; JS minified): %s bytes raw, %s bytes gzip -9\n' "$wasm_raw" "$wasm_gz"
printf 'gzip -9 of .wasm + JS a browser loads: %s bytes (budget %s); npm package unpacked: %s bytes\n' "$total_gz" "$SIZE_BUDGET_GZIP" "$unpacked"
cat tests/out/figures.txt
echo "sdk-wasm/test.sh passed in $(($(date +%s) - start)) s"
