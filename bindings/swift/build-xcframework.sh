#!/usr/bin/env bash
# Build FerryFFI.xcframework (static libraries for iOS devices, the iOS
# simulator and macOS, with Headers/FerryFFI.h and its module map) next to
# Package.swift, and FerryFFI.xcframework.zip with its SwiftPM checksum for
# a release (Package.swift's ferryFFIURL / ferryFFIChecksum).
# Runs on macOS with Xcode; not run in CI (no Swift or Xcode there).
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
ROOT=$(cd ../.. && pwd)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
targets=(aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin)
rustup target add "${targets[@]}"
for t in "${targets[@]}"; do
  # A static library for this build only: the crate's default crate types
  # stay cdylib + lib for the other platforms.
  (cd "$ROOT" && cargo rustc --release -p ferry-ffi --lib --crate-type staticlib --target "$t")
done
out="$TARGET/ferry-xcframework"
rm -rf "$out" FerryFFI.xcframework
mkdir -p "$out/ios-sim" "$out/macos"
lipo -create "$TARGET/aarch64-apple-ios-sim/release/libferry_ffi.a" "$TARGET/x86_64-apple-ios/release/libferry_ffi.a" \
  -output "$out/ios-sim/libferry_ffi.a"
lipo -create "$TARGET/aarch64-apple-darwin/release/libferry_ffi.a" "$TARGET/x86_64-apple-darwin/release/libferry_ffi.a" \
  -output "$out/macos/libferry_ffi.a"
xcodebuild -create-xcframework \
  -library "$TARGET/aarch64-apple-ios/release/libferry_ffi.a" -headers "$HERE/Headers" \
  -library "$out/ios-sim/libferry_ffi.a" -headers "$HERE/Headers" \
  -library "$out/macos/libferry_ffi.a" -headers "$HERE/Headers" \
  -output FerryFFI.xcframework
rm -f FerryFFI.xcframework.zip
# -y keeps symlinks, as SwiftPM expects of an xcframework archive.
zip -qry FerryFFI.xcframework.zip FerryFFI.xcframework
echo "built $HERE/FerryFFI.xcframework and FerryFFI.xcframework.zip"
echo "release checksum: $(swift package compute-checksum FerryFFI.xcframework.zip)"
