# inferq: one image for every role (serve, gateway, worker, models, dlq, submit).
#
#   docker build -t inferq .
#   docker run --rm inferq --help
#
# Stages: `builder` compiles the release binary; `ort` takes libonnxruntime.so out of
# the onnxruntime wheel from PyPI (the same library scripts/setup.sh unpacks, loaded at
# run time through ORT_DYLIB_PATH: the `ort` crate is built with `load-dynamic`);
# the runtime stage is debian:bookworm-slim with the binary, the library, the demo
# models and two small scripts, running as uid 10001.
#
# Plain Dockerfile syntax (no BuildKit-only flags), so the classic builder that
# docker-compose 1.29 drives builds it as well as BuildKit does.

ARG RUST_VERSION=1
ARG ORT_VERSION=1.32.0

# ---------------------------------------------------------------- build
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Cargo reads every target Cargo.toml declares (the [[bench]] files too) before it
# builds anything, so they are all copied; tests/deploy_manifests.rs checks that.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin inferq \
 && install -m 0755 target/release/inferq /usr/local/bin/inferq

# ---------------------------------------------------------------- ONNX Runtime
FROM python:3.11-slim-bookworm AS ort
ARG ORT_VERSION
RUN python -m pip download --no-deps --only-binary=:all: --dest /wheel "onnxruntime==${ORT_VERSION}" \
 && python -m zipfile -e /wheel/onnxruntime-*.whl /unpacked \
 && install -D -m 0644 "/unpacked/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}" /out/libonnxruntime.so

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim
ARG ORT_VERSION
LABEL org.opencontainers.image.title="inferq" \
      org.opencontainers.image.description="Asynchronous, queue-based batch inference on Redis Streams and ONNX Runtime" \
      org.opencontainers.image.licenses="Apache-2.0"

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
CMD ["serve"]
