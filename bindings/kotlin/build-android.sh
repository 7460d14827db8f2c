#!/usr/bin/env bash
# Build libferry_ffi.so for the Android ABIs into ferry/src/main/jniLibs,
# then (with `publish`) the AAR and its POM as dev.ferry:ferry-android.
#
#   bindings/kotlin/build-android.sh            # native libraries only
#   bindings/kotlin/build-android.sh publish    # + gradle publish into build/maven and ~/.m2
#
# Needs the Android NDK ($ANDROID_NDK_HOME), cargo-ndk (installed here when
# missing), and for `publish` the Android SDK ($ANDROID_HOME) and Gradle 8.
# Not run in CI: there is no NDK or Android SDK on those machines.
set -euo pipefail
cd "$(dirname "$0")"
: "${ANDROID_NDK_HOME:?set ANDROID_NDK_HOME to the Android NDK (r26 or newer)}"
command -v cargo-ndk >/dev/null || cargo install cargo-ndk
rustup target add aarch64-linux-android armv7-linux-androideabi x86_64-linux-android
cargo ndk -t arm64-v8a -t armeabi-v7a -t x86_64 -o ferry/src/main/jniLibs \
  build --release --manifest-path ../../sdk-ffi/Cargo.toml
if [ "${1:-}" = publish ]; then
  : "${ANDROID_HOME:?set ANDROID_HOME to the Android SDK}"
  # The ferry repository (build/maven, or -PferryRepo) and Maven local.
  gradle --no-daemon :ferry:publishReleasePublicationToFerryRepository :ferry:publishToMavenLocal "${@:2}"
  echo "published dev.ferry:ferry-android to $(pwd)/build/maven and ~/.m2/repository"
fi
