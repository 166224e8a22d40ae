# syntax=docker/dockerfile:1
# Build stage: the whole workspace, release profile, locked dependencies.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
    && strip target/release/agent-worker target/release/test-agent

# Runtime stage: only the binaries and the settings reference, as an unprivileged user.
FROM debian:bookworm-slim
# tini as PID 1 reaps processes that agents leave behind and the worker kills; without an init,
# the worker itself would be PID 1 and such orphans would stay zombies.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin agent
COPY --from=build /src/target/release/agent-worker /usr/local/bin/agent-worker
COPY --from=build /src/target/release/test-agent /usr/local/bin/test-agent
COPY config/ /etc/agent-worker/
USER 10001
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/agent-worker"]
CMD ["run"]
