#!/usr/bin/env bash
# Build the npm package into sdk-wasm/pkg: the wasm module for three
# targets (web, bundler, nodejs) plus the JavaScript wrapper and types.
# Needs wasm-pack and a wasm-bindgen CLI matching Cargo.lock (test.sh
# installs both). Honours CARGO_TARGET_DIR.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

# Size-oriented release profile for this build only (the workspace's own
# profiles stay untouched): optimise for size, one codegen unit, LTO.
export CARGO_PROFILE_RELEASE_OPT_LEVEL="${CARGO_PROFILE_RELEASE_OPT_LEVEL:-s}"
export CARGO_PROFILE_RELEASE_LTO="${CARGO_PROFILE_RELEASE_LTO:-true}"
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS="${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-1}"

# `./build.sh js` refreshes only the JavaScript files of an existing build.
if [ "${1:-}" != js ]; then
rm -rf pkg.new pkg
for target in web bundler nodejs; do
  dir="$target"; [ "$target" = nodejs ] && dir=node
  # --mode no-install: use the wasm-bindgen on PATH, never download one.
  wasm-pack --quiet build . --release --mode no-install --target "$target" \
    --out-dir "pkg/$dir" --out-name ferry_wasm
  rm -f "pkg/$dir/.gitignore" "pkg/$dir/README.md" "pkg/$dir/LICENSE"*
done
# wasm-opt from npm binaryen (Debian's binaryen 108 emits modules that fail
# to load; wasm-pack's own wasm-opt step is off in Cargo.toml). The three
# targets share one .wasm, so optimise once. FERRY_WASM_OPT=0 skips it.
opt=node_modules/.bin/wasm-opt
if [ "${FERRY_WASM_OPT:-1}" != 0 ] && [ -x "$opt" ]; then
  "$opt" -Os --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    --enable-mutable-globals --enable-reference-types --enable-multivalue \
    pkg/web/ferry_wasm_bg.wasm -o pkg/ferry_wasm_bg.opt.wasm
  for dir in web bundler node; do cp pkg/ferry_wasm_bg.opt.wasm "pkg/$dir/ferry_wasm_bg.wasm"; done
  rm pkg/ferry_wasm_bg.opt.wasm
else
  echo "build.sh: wasm-opt not run (npm ci installs it)" >&2
fi
fi

cp js/ferry.js js/ferry.d.ts pkg/
cp js/entries/web.js pkg/web/index.js
cp js/entries/bundler.js pkg/bundler/index.js
cp js/entries/node.mjs pkg/node/index.mjs
for d in web bundler node; do
  printf "export * from '../ferry.js';\n" > "pkg/$d/index.d.ts"
done
printf "export * from '../ferry.js';\nexport function initFerry(moduleOrPath?: string | URL | Response | BufferSource | WebAssembly.Module): void;\n" > pkg/web/index.d.ts
cp js/package.json README.md pkg/
echo "built $here/pkg"
