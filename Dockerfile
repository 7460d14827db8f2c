# syntax=docker/dockerfile:1
# The `ferry` server image: built in a Rust image, run as an unprivileged
# user on a slim Debian 12 with nothing but the binary (TLS roots are
# compiled in; the health check is `ferry health`, so no curl).
#
#   docker build -t ferry --build-arg FERRY_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
#   docker run -p 8000:8000 -v ferry-data:/var/lib/ferry ferry
#
# Network at build time: crates.io (cargo) only. Both base images are
# arguments, so a registry mirror or pinned digests can be given; see
# docs/DEPLOY.md ("Container") for the settings and for how CI builds the
# runtime stage without pulling a Rust image.

ARG RUST_IMAGE=docker.io/library/rust:1-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The whole workspace: cargo resolves every member of it (see .dockerignore).
COPY . .
ARG FERRY_GIT_COMMIT=unknown
# A builder image that already holds /out/ferry skips the compile (CI's
# check of the runtime stage, docs/DEPLOY.md); any other compiles it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ ! -x /out/ferry ]; then \
      FERRY_GIT_COMMIT="$FERRY_GIT_COMMIT" cargo build --release --locked -p ferry-server --bin ferry \
      && install -D -m 0755 target/release/ferry /out/ferry; \
    fi

FROM ${RUNTIME_IMAGE} AS runtime
# A fixed uid/gid, so a volume's ownership is the same in every build.
RUN groupadd --gid 10001 ferry \
    && useradd --uid 10001 --gid ferry --home-dir /var/lib/ferry --no-create-home \
       --shell /usr/sbin/nologin ferry \
    && install -d -o ferry -g ferry -m 0750 /var/lib/ferry
COPY --from=build /out/ferry /usr/local/bin/ferry
# Listen on every interface of the container. The backend API stays on the
# container's loopback until FERRY_API_LISTEN=0.0.0.0:8001 and
# FERRY_API_KEYS are set (the server refuses an API beyond loopback
# without a key).
ENV FERRY_LISTEN=0.0.0.0:8000 \
    FERRY_API_LISTEN=127.0.0.1:8001 \
    FERRY_DATA_DIR=/var/lib/ferry \
    FERRY_LOG=info
USER 10001:10001
WORKDIR /var/lib/ferry
VOLUME ["/var/lib/ferry"]
EXPOSE 8000 8001
# SIGTERM drains: every client gets close 3000 and reconnects elsewhere;
# give `docker stop` more than the server's 5 s grace (e.g. --time 30).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 CMD ["ferry", "health"]
ENTRYPOINT ["ferry"]
CMD ["serve"]
