#!/usr/bin/env bash
# The mobile SDK's checks (issue 7): builds the ferry-ffi cdylib and the
# ferry server, checks the committed generated bindings for drift, generates
# the bindings with the one command, runs the Python end-to-end tests,
# installs the Python package into a clean venv and runs its README example,
# and compiles + runs the Kotlin smoke test on the JVM. Swift is only generated
# here (no Swift toolchain on Linux CI); its committed sources are checked
# for drift.
#
# Usage: sdk-ffi/test.sh   (from anywhere; installs what is missing, idempotently)
# Uses $CARGO_TARGET_DIR when set, else <repo>/target.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
TARGET=$(mkdir -p "${CARGO_TARGET_DIR:-target}" && cd "${CARGO_TARGET_DIR:-target}" && pwd)
export CARGO_TARGET_DIR="$TARGET"
# npm's kotlin-compiler, rebuilt here when missing (target/ is never committed).
TOOLS="$REPO/target/ffi-tools"
KOTLIN_VERSION=2.4.20

t0=$(date +%s)
step_start=$t0
declare -a FIGURES=()
step() {
  local now; now=$(date +%s)
  printf '\n==> [ffi +%ss] %s\n' "$((now - t0))" "$*"
  step_start=$now
}
took() { echo "$(($(date +%s) - step_start)) s"; }

step "tools (installed only when missing)"
missing=()
command -v python3 >/dev/null || missing+=(python3)
command -v java >/dev/null || missing+=(openjdk-17-jdk-headless)
command -v npm >/dev/null || missing+=(npm)
[ -f /usr/share/java/jna.jar ] || missing+=(libjna-java)
if [ ${#missing[@]} -gt 0 ]; then
  echo "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
KOTLIN="$TOOLS/kotlin/node_modules/kotlin-compiler"
if [ ! -x "$KOTLIN/bin/kotlinc" ] || ! grep -q "\"version\": \"$KOTLIN_VERSION\"" "$KOTLIN/package.json"; then
  mkdir -p "$TOOLS/kotlin"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/kotlin" "kotlin-compiler@$KOTLIN_VERSION"
  chmod +x "$KOTLIN/bin/"* || true
fi
echo "python3 $(python3 -c 'import sys; print(sys.version.split()[0])'), $(java -version 2>&1 | head -1), kotlinc $KOTLIN_VERSION, $(basename "$(readlink -f /usr/share/java/jna.jar)")"

step "build the ferry server"
cargo build --quiet -p ferry-server --bin ferry
export FERRY_BIN="$TARGET/debug/ferry"
FIGURES+=("server build: $(took)")

step "committed generated bindings (Swift, Kotlin, Python) match a fresh generation"
cargo xtask bindings --check
FIGURES+=("cdylib + bindgen build and drift check: $(took)")

step "generate the bindings: cargo xtask bindings"
cargo xtask bindings
FIGURES+=("generation: $(took)")

step "Python end-to-end tests (real ferry server)"
py_log="$TARGET/ferry-ffi-python.log"
set +e
python3 -m unittest discover -s bindings/python/tests -v 2>&1 | tee "$py_log"
py_status=${PIPESTATUS[0]}
set -e
py_ran=$(sed -n 's/^Ran \([0-9]*\) tests\{0,1\} .*/\1/p' "$py_log" | tail -1)
if [ "$py_status" -ne 0 ] || ! tail -3 "$py_log" | grep -q '^OK'; then
  echo "Python end-to-end tests failed"
  exit 1
fi
FIGURES+=("python e2e: ${py_ran:-0} tests in $(took)")
FIGURES+=("$(grep -h '^\[py-e2e' "$py_log" || true)")

step "Python package: pip install ./bindings/python in a clean venv, the README example against a real server"
# The dev library `cargo xtask bindings` just built: no release build here.
FERRY_FFI_PROFILE=debug bash bindings/python/test-install.sh
FIGURES+=("python clean-venv install + README example: $(took)")

step "Kotlin: compile the generated bindings + smoke test, run on the JVM"
CP="/usr/share/java/jna.jar:$KOTLIN/lib/kotlinx-coroutines-core-jvm.jar"
classes="$TARGET/ferry-kotlin-smoke"
rm -rf "$classes"
# -nowarn: the generated code triggers style warnings that are not ours to fix.
bash "$KOTLIN/bin/kotlinc" -nowarn -cp "$CP" \
  bindings/kotlin/ferry/src/main/kotlin/dev/ferry/sdk/ferry.kt bindings/kotlin/smoke/Smoke.kt -d "$classes"
kotlin_out=$(java -cp "$classes:$CP:$KOTLIN/lib/kotlin-stdlib.jar" -Djna.library.path="$TARGET/debug" SmokeKt)
echo "$kotlin_out"
FIGURES+=("kotlin compile + smoke: $(took)")
FIGURES+=("$kotlin_out")

step "Swift"
if command -v swiftc >/dev/null; then
  echo "swiftc found but not used: the Swift package builds against an xcframework (bindings/swift/README.md)"
fi
echo "Swift: generated only (no Swift toolchain here); drift-checked above"

step "package metadata: one version everywhere, publishing targets in place (nothing here can build the AAR or xcframework)"
# The workspace version is the one every package publishes under.
want=$(awk -F'"' '/^\[workspace.package\]/ { p = 1 } p && /^version *=/ { print $2; exit }' Cargo.toml)
have_py=$(awk -F'"' '/^version *=/ { print $2; exit }' bindings/python/pyproject.toml)
have_kt=$(sed -n 's/.*findProperty("ferryVersion") as String?) ?: "\([^"]*\)".*/\1/p' bindings/kotlin/ferry/build.gradle.kts)
have_npm=$(node -p 'require("./sdk-wasm/js/package.json").version')
for v in "python:$have_py" "kotlin:$have_kt" "npm:$have_npm"; do
  [ "${v#*:}" = "$want" ] || { echo "version of ${v%%:*} package is '${v#*:}', workspace is '$want'" >&2; exit 1; }
done
grep -q 'artifactId = "ferry-android"' bindings/kotlin/ferry/build.gradle.kts || { echo "kotlin: no ferry-android publication" >&2; exit 1; }
grep -q '.binaryTarget(name: "FerryFFI", path: "FerryFFI.xcframework")' bindings/swift/Package.swift \
  && grep -q '.binaryTarget(name: "FerryFFI", url:' bindings/swift/Package.swift \
  || { echo "swift: Package.swift lost its FerryFFI binary target (path or url form)" >&2; exit 1; }
echo "version $want in Cargo.toml, pyproject.toml, build.gradle.kts and package.json; dev.ferry:ferry-android and FerryFFI binary target present"

total=$(($(date +%s) - t0))
printf '\n==> sdk-ffi figures\n'
printf '%s\n' "${FIGURES[@]}"
echo "total: ${total} s"
echo "sdk-ffi: $((py_ran + 2)) passed, 0 failed"
