# inferq: one image for every role (serve, gateway, worker, models, dlq, submit).
#
#   docker build -t inferq \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
#     --build-arg SOURCE="$(git remote get-url origin)" .
#   docker run --rm inferq                 # prints --help: pick a role
#   docker run --rm -e INFERQ_REDIS_URL=redis://redis:6379 inferq gateway
#
# The default command is `--help`, not a role: every role needs a Redis
# (INFERQ_REDIS_URL), and this image has no redis-server for `serve` to start, so any
# role as default would fail in a bare `docker run`. Compose and the Kubernetes
# manifests name their role.
#
# Stages: `chef` is the Rust toolchain with cargo-chef; `planner` reduces the sources
# to a recipe of the dependency graph (Cargo.toml, Cargo.lock); `builder` first builds
# only the dependencies from that recipe, in a layer of their own that stays cached
# until Cargo.toml or Cargo.lock change, then the sources; `ort` takes
# libonnxruntime.so out of the onnxruntime wheel from PyPI (the same library
# scripts/setup.sh unpacks, loaded at run time through ORT_DYLIB_PATH: the `ort` crate
# is built with `load-dynamic`); the runtime stage is Debian 12 slim with the binary,
# the library, the demo models and two small scripts, running as uid 10001.
#
# Base images are pinned to a release (let Renovate or Dependabot bump them), so a
# rebuild of the same commit gets the same toolchain and base: Rust 1.95.0 (the
# toolchain the tests run with; the crate needs 1.88), Debian 12.11 slim and Python
# 3.11.11 for the wheel step.
#
# Plain Dockerfile syntax (no BuildKit-only flags, no cache mounts), so the classic
# builder that docker-compose 1.29 drives builds it as well as BuildKit does.

ARG RUST_VERSION=1.95.0
ARG CARGO_CHEF_VERSION=0.1.76
ARG ORT_VERSION=1.32.0

# ---------------------------------------------------------------- toolchain
FROM rust:${RUST_VERSION}-bookworm AS chef
ARG CARGO_CHEF_VERSION
RUN cargo install --locked cargo-chef --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

# ---------------------------------------------------------------- dependency recipe
# Cargo reads every target Cargo.toml declares (the [[bench]] files too) before it
# does anything, so they are all copied, here and in `builder`; tests/deploy_manifests.rs
# checks that.
FROM chef AS planner
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------- build
FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The dependencies alone: this layer is reused while the recipe is unchanged, so a
# source edit recompiles only inferq.
RUN cargo chef cook --release --locked --bin inferq --recipe-path recipe.json
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin inferq \
 && install -m 0755 target/release/inferq /usr/local/bin/inferq

# ---------------------------------------------------------------- ONNX Runtime
FROM python:3.11.11-slim-bookworm AS ort
ARG ORT_VERSION
RUN python -m pip download --no-deps --only-binary=:all: --dest /wheel "onnxruntime==${ORT_VERSION}" \
 && python -m zipfile -e /wheel/onnxruntime-*.whl /unpacked \
 && install -D -m 0644 "/unpacked/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}" /out/libonnxruntime.so

# ---------------------------------------------------------------- runtime
FROM debian:12.11-slim
ARG ORT_VERSION
# OCI annotations (github.com/opencontainers/image-spec, annotations.md). VERSION is
# Cargo.toml's (a test keeps them equal); REVISION and CREATED come from the build
# command above; SOURCE is the repository URL (from the build command: this file
# does not know where it is published), which registries link to.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=
LABEL org.opencontainers.image.title="inferq" \
      org.opencontainers.image.description="Asynchronous, queue-based batch inference on Redis Streams and ONNX Runtime" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="docker.io/library/debian:12.11-slim"

# ca-certificates for rediss:// (TLS to Redis). libstdc++ (which ONNX Runtime needs)
# is part of the base image. /models is owned by the runtime user so that a fresh named
# volume mounted there starts writable for the one-shot loader; serving roles mount it
# read-only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 inferq \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin inferq \
 && install -d -o 10001 -g 10001 /models

COPY --from=builder /usr/local/bin/inferq /usr/local/bin/inferq
COPY --from=ort /out/libonnxruntime.so /usr/local/lib/inferq/libonnxruntime.so
COPY deploy/docker/healthcheck.sh /usr/local/bin/inferq-healthcheck
COPY deploy/docker/load-models.sh /usr/local/bin/inferq-load-models
COPY testdata/models/*.onnx /usr/share/inferq/demo-models/
# (Modes are set here rather than with COPY --chmod, which the classic builder lacks.)
RUN chmod 0755 /usr/local/bin/inferq-healthcheck /usr/local/bin/inferq-load-models \
 && chmod 0644 /usr/share/inferq/demo-models/*.onnx

# Inside a container the listeners bind every interface; what is reachable from outside
# is decided by the published ports (compose) or Services (Kubernetes).
ENV ORT_DYLIB_PATH=/usr/local/lib/inferq/libonnxruntime.so \
    INFERQ_MODELS=/models \
    INFERQ_LISTEN=0.0.0.0:8080 \
    INFERQ_METRICS_LISTEN=0.0.0.0:9464 \
    INFERQ_DATA_DIR=/tmp/inferq-data

USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9464

# Every role serves /v2/health/live on its metrics listener.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/inferq-healthcheck"]

ENTRYPOINT ["inferq"]
# Prints the roles and settings and exits 0; see the header for why not a role.
CMD ["--help"]
