#!/usr/bin/env bash
# Build the npm package into sdk-wasm/pkg: ONE wasm module (wasm-pack
# --target web, whose glue can instantiate from a URL, a Response, bytes or
# a compiled module) plus small per-environment entry files that all load
# that same ferry_wasm_bg.wasm, the JavaScript wrapper and the types.
# Needs wasm-pack and a wasm-bindgen CLI matching Cargo.lock (test.sh
# installs both). Honours CARGO_TARGET_DIR.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

# Size-oriented release profile for this build only (the workspace's own
# profiles stay untouched): opt-level z (6.4 KB smaller after gzip than s
# here), one codegen unit, LTO.
export CARGO_PROFILE_RELEASE_OPT_LEVEL="${CARGO_PROFILE_RELEASE_OPT_LEVEL:-z}"
export CARGO_PROFILE_RELEASE_LTO="${CARGO_PROFILE_RELEASE_LTO:-true}"
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS="${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-1}"

# `./build.sh js` refreshes only the JavaScript files of an existing build.
if [ "${1:-}" != js ]; then
  rm -rf pkg pkg.build
  # --mode no-install: use the wasm-bindgen on PATH, never download one.
  wasm-pack --quiet build . --release --mode no-install --target web \
    --out-dir pkg.build --out-name ferry_wasm
  mkdir pkg
  # Only the glue and the module ship: the wasm-bindgen .d.ts files describe
  # the internal Driver, which the public ferry.d.ts does not expose.
  cp pkg.build/ferry_wasm.js pkg/
  # wasm-opt from npm binaryen (Debian's binaryen 108 emits modules that
  # fail to load; wasm-pack's own wasm-opt step is off in Cargo.toml).
  # -Os: -Oz came out ~0.4 KB larger after gzip. The producers and
  # target_features custom sections are metadata no runtime reads.
  # FERRY_WASM_OPT=0 skips it.
  opt=node_modules/.bin/wasm-opt
  if [ "${FERRY_WASM_OPT:-1}" != 0 ] && [ -x "$opt" ]; then
    "$opt" -Os --strip-producers --strip-target-features \
      --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
      --enable-mutable-globals --enable-reference-types --enable-multivalue \
      pkg.build/ferry_wasm_bg.wasm -o pkg/ferry_wasm_bg.wasm
  else
    echo "build.sh: wasm-opt not run (npm ci installs it)" >&2
    cp pkg.build/ferry_wasm_bg.wasm pkg/
  fi
  rm -rf pkg.build
fi

cp js/ferry.js js/ferry.d.ts js/package.json README.md pkg/
mkdir -p pkg/web pkg/bundler pkg/node
cp js/entries/web.js pkg/web/index.js
cp js/entries/bundler.js pkg/bundler/index.js
cp js/entries/node.mjs pkg/node/index.mjs
for d in bundler node; do
  printf "export * from '../ferry.js';\n" > "pkg/$d/index.d.ts"
done
printf "export * from '../ferry.js';\nexport function initFerry(moduleOrPath?: string | URL | Response | BufferSource | WebAssembly.Module): void;\n" > pkg/web/index.d.ts

# Minify the shipped JavaScript (terser from npm, like wasm-opt): comments
# and whitespace out, local names shortened; class and function names stay
# so stack traces and `instanceof` users read the same. The sources in js/
# and the types are what to read. Terser leaves the glue's
# `new URL('ferry_wasm_bg.wasm', import.meta.url)` as it is, which bundlers
# look for. FERRY_MINIFY=0 skips it.
terser=node_modules/.bin/terser
if [ "${FERRY_MINIFY:-1}" != 0 ] && [ -x "$terser" ]; then
  for f in pkg/ferry.js pkg/ferry_wasm.js pkg/web/index.js pkg/bundler/index.js pkg/node/index.mjs; do
    "$terser" "$f" --module --ecma 2020 --compress --mangle --keep-classnames --keep-fnames \
      --comments false --output "$f.min"
    mv "$f.min" "$f"
  done
else
  echo "build.sh: JavaScript not minified (npm ci installs terser)" >&2
fi
echo "built $here/pkg"
