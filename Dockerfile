# syntax=docker/dockerfile:1
# Build stage: the whole workspace, release profile, locked dependencies.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and build artefacts between builds (BuildKit); the binaries are
# copied out of the cached target directory, which is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/agent-worker /out/ \
    && strip /out/agent-worker

# Runtime stage: only the binary (whose hidden `test-agent` subcommand is the stand-in agent of
# smoke tests) and the settings reference, as an unprivileged user.
FROM debian:bookworm-slim
# tini as PID 1 reaps processes that agents leave behind and the worker kills; without an init,
# the worker itself would be PID 1 and such orphans would stay zombies. ca-certificates: the
# system's roots, which a rediss:// URL is verified against unless redis.tls_ca_file is set.
# Not pinned (DL3008): bookworm only receives security updates, and an exact pin breaks the
# build as soon as one supersedes it; pin the base image by digest for reproducible builds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 agent \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin agent
COPY --from=build /out/agent-worker /usr/local/bin/agent-worker
COPY config/ /etc/agent-worker/
USER 10001:10001
# /metrics, /healthz, /readyz (http.addr)
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/agent-worker"]
CMD ["run"]
