#!/usr/bin/env bash
# Checks the deployment files without a container engine (docs/DEPLOY.md,
# "What CI checks"):
#  1. deploy/compose.yaml parses (docker-compose 1.x `config`, no engine
#     needed), and each Ferry service's environment is a configuration the
#     server accepts (`ferry show-config` with exactly that environment);
#  2. deploy/ferry.service passes `systemd-analyze verify`;
#  3. the Dockerfile's runtime stage is built with buildah (daemonless,
#     chroot isolation, vfs storage) on a Debian 12 root made by debootstrap
#     (no image registry is reachable here), with the already built binary
#     standing in for the Rust stage; then, in that image, `ferry serve`
#     runs as uid 10001 and the image's health check command passes.
# Idempotent; installs what it needs with apt. Usage:
#   scripts/container-check.sh [path/to/ferry]   (default: target/debug/ferry)
set -euo pipefail
cd "$(dirname "$0")/.."
FERRY_BIN=${1:-${CARGO_TARGET_DIR:-$PWD/target}/debug/ferry}
WORK=${FERRY_CONTAINER_WORK:-/var/tmp/ferry-container-check}
mkdir -p "$WORK"

need() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

echo "-- compose file"
need docker-compose python3-yaml
export FERRY_HMAC_SECRET=compose-check-secret-compose-check-secret FERRY_API_KEY=compose-check-key
docker-compose -f deploy/compose.yaml config > "$WORK/compose.resolved.yaml"
python3 - "$WORK/compose.resolved.yaml" "$FERRY_BIN" <<'PY'
import subprocess, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
ferry = [n for n in doc["services"] if n.startswith("ferry")]
assert len(ferry) == 3, ferry
for name in ferry:
    svc = doc["services"][name]
    env = {k: str(v) for k, v in svc["environment"].items()}
    assert svc["stop_grace_period"] and svc["healthcheck"]["test"][1:] == ["ferry", "health"], name
    out = subprocess.run([sys.argv[2], "show-config"], env={"PATH": "/usr/bin:/bin", **env},
                         capture_output=True, text=True)
    assert out.returncode == 0, f"{name}: {out.stderr}"
    assert f'node_name = "{name}"' in out.stdout and "redis://redis:6379" in out.stdout, out.stdout
    print(f"ok: {name}: its environment is a valid configuration")
PY

echo "-- systemd unit"
if command -v systemd-analyze >/dev/null; then
  # The unit names /usr/local/bin/ferry; verify checks that it exists.
  if [ ! -e /usr/local/bin/ferry ]; then
    tmpbin=1
    install -m 0755 "$FERRY_BIN" /usr/local/bin/ferry
  fi
  out=$(systemd-analyze verify deploy/ferry.service 2>&1 || true)
  [ "${tmpbin:-}" = 1 ] && rm -f /usr/local/bin/ferry
  # Without a running systemd (a container) verify still parses the unit;
  # report anything it says about the unit itself.
  if printf '%s\n' "$out" | grep -i 'ferry.service' | grep -v 'Failed to connect\|not running'; then
    echo "systemd-analyze verify found problems"; exit 1
  fi
  echo "ok: systemd-analyze verify deploy/ferry.service"
else
  echo "skip: systemd-analyze not installed"
fi

echo "-- image (buildah, runtime stage)"
need buildah debootstrap binutils
S=(--root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
if ! buildah "${S[@]}" inspect --type image localhost/debian:bookworm-slim >/dev/null 2>&1; then
  if [ ! -f "$WORK/bookworm.tar" ]; then
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/usr/share/doc/* "$WORK"/rootfs/usr/share/man/*
    tar -C "$WORK/rootfs" -cf "$WORK/bookworm.tar" .
    rm -rf "$WORK/rootfs"
  fi
  c=$(buildah "${S[@]}" from scratch)
  buildah "${S[@]}" add "$c" "$WORK/bookworm.tar" / >/dev/null
  buildah "${S[@]}" commit -q "$c" localhost/debian:bookworm-slim >/dev/null
  buildah "${S[@]}" rm "$c" >/dev/null
fi
# The stand-in for the Rust stage: Debian with the binary at /out/ferry.
strip -o "$WORK/ferry" "$FERRY_BIN"
c=$(buildah "${S[@]}" from localhost/debian:bookworm-slim)
buildah "${S[@]}" copy "$c" "$WORK/ferry" /out/ferry >/dev/null
buildah "${S[@]}" commit -q --rm "$c" localhost/ferry-prebuilt >/dev/null
buildah "${S[@]}" bud -q --isolation chroot --format docker --pull-never \
  --build-arg RUST_IMAGE=localhost/ferry-prebuilt --build-arg RUNTIME_IMAGE=localhost/debian:bookworm-slim \
  -t localhost/ferry:check . >/dev/null
buildah "${S[@]}" inspect --type image --format '{{.Docker.Config.User}} {{.Docker.Config.Healthcheck.Test}}' \
  localhost/ferry:check > "$WORK/inspect.txt"
grep -qx '10001:10001 \[CMD ferry health\]' "$WORK/inspect.txt" || { cat "$WORK/inspect.txt"; exit 1; }
echo "ok: image user and health check: $(cat "$WORK/inspect.txt")"

# Run it: host network (no netns needed), a free loopback port.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
api=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
c=$(buildah "${S[@]}" from localhost/ferry:check)
cleanup() { [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; buildah "${S[@]}" rm "$c" >/dev/null 2>&1 || true; }
trap cleanup EXIT
buildah "${S[@]}" run --isolation chroot --network host \
  --env FERRY_LISTEN="127.0.0.1:$port" --env FERRY_API_LISTEN="127.0.0.1:$api" "$c" -- ferry serve \
  >"$WORK/serve.out" 2>"$WORK/serve.err" &
pid=$!
for _ in $(seq 1 100); do grep -q "ferry listening" "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
grep -q "ferry listening" "$WORK/serve.out" || { cat "$WORK/serve.out" "$WORK/serve.err"; exit 1; }
buildah "${S[@]}" run --isolation chroot --network host --env FERRY_LISTEN="0.0.0.0:$port" "$c" -- ferry health
# The server's uid, seen from the host: the `ferry` process under this
# `buildah run` (found by walking parent pids up to it).
descends() {
  local p=$1
  for _ in $(seq 1 20); do
    [ "$p" = "$pid" ] && return 0
    p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null) || return 1
    [ -z "$p" ] || [ "$p" -le 1 ] && return 1
  done
  return 1
}
uid=$(for p in /proc/[0-9]*; do
  case "$(readlink "$p/exe" 2>/dev/null)" in
    */usr/local/bin/ferry) descends "${p#/proc/}" && awk '/^Uid:/{print $2}' "$p/status" ;;
  esac
done | sort -u)
echo "ok: ferry serve in the image runs as uid ${uid:-?}"
[ "$uid" = 10001 ] || { echo "expected uid 10001"; exit 1; }
