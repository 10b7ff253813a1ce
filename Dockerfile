# syntax=docker/dockerfile:1
# shoal: one image with the replica (shoal-server), the load generator (shoal-loadtest) and the
# OTLP stand-in backend (shoal-otlp-sink).
#
#   docker build -t shoal .                      # full build (stages build → runtime)
#   docker build --target prebuilt -t shoal .    # package binaries already built on the host
#                                                # (cargo build --release; same Debian release)
#
# The runtime image is Debian slim with the three binaries (debug info stripped; symbols kept for
# backtraces), run as an unprivileged user; it needs no shell tools: the container healthcheck is
# `shoal-server healthcheck` (GET /readyz).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# make: tikv-jemalloc-sys builds jemalloc with it (the slim image has gcc and libc6-dev only).
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, from the manifests alone (with stub sources for every target they name), so
# this layer stays cached until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
COPY server/Cargo.toml server/
COPY shared/Cargo.toml shared/
COPY testkit/Cargo.toml testkit/
COPY loadtest/Cargo.toml loadtest/
RUN mkdir -p server/src shared/src testkit/src loadtest/src/bin \
 && echo 'fn main() {}' > server/src/main.rs && touch server/src/lib.rs shared/src/lib.rs testkit/src/lib.rs \
 && echo 'fn main() {}' > loadtest/src/main.rs \
 && for bin in $(sed -n 's|^path = "\(src/bin/[^"]*\)"$|\1|p' loadtest/Cargo.toml); do echo 'fn main() {}' > "loadtest/$bin"; done \
 && cargo build --release --locked -p shoal-server -p shoal-loadtest \
 && rm -rf server/src shared/src testkit/src loadtest/src
# Then the sources (touched so cargo rebuilds our crates over the stubs).
COPY server server
COPY shared shared
COPY testkit testkit
COPY loadtest loadtest
RUN find server/src shared/src testkit/src loadtest/src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p shoal-server -p shoal-loadtest \
 && mkdir /out && cp target/release/shoal-server target/release/shoal-loadtest target/release/shoal-otlp-sink /out/ \
 && strip --strip-debug /out/*

FROM debian:${DEBIAN_RELEASE}-slim AS runtime-base
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin shoal
ENV SHOAL_LISTEN=0.0.0.0:8080 \
    SHOAL_LOG_FORMAT=json
EXPOSE 8080
USER shoal:shoal
# SIGTERM: stop accepting, end streams so clients reconnect elsewhere, drain, exit.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 CMD ["shoal-server", "healthcheck"]
ENTRYPOINT ["shoal-server"]

# Binaries built on the host (CI and local tests, where no Rust image can be pulled).
FROM runtime-base AS prebuilt
COPY target/release/shoal-server target/release/shoal-loadtest target/release/shoal-otlp-sink /usr/local/bin/

# The default target: binaries from the build stage.
FROM runtime-base AS runtime
COPY --from=build /out/ /usr/local/bin/
