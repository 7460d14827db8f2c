#!/usr/bin/env bash
# Build libferry_ffi.so for the Android ABIs into ferry/src/main/jniLibs.
# Needs the Android NDK ($ANDROID_NDK_HOME) and cargo-ndk
# (`cargo install cargo-ndk`); not run in CI (no NDK there).
set -euo pipefail
cd "$(dirname "$0")"
rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android
cargo ndk -t arm64-v8a -t armeabi-v7a -t x86_64 -o ferry/src/main/jniLibs \
  build --release --manifest-path ../../sdk-ffi/Cargo.toml
