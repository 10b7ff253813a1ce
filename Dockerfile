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

# The toolchain: no source in it, so it stays cached (and can be tagged to keep it) across builds.
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS toolchain
# Every image this file makes carries this label, so what a rebuild superseded can be pruned
# without touching anyone else's images: podman image prune -f --filter label=io.shoal.image
LABEL io.shoal.image=toolchain
# make: tikv-jemalloc-sys builds jemalloc with it (the slim image has gcc and libc6-dev only).
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*

FROM toolchain AS build
LABEL io.shoal.image=build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY server server
COPY shared shared
COPY testkit testkit
COPY loadtest loadtest
# The crate registry and the build's target/ live in cache mounts (BuildKit and buildah/podman
# both keep them between builds, outside every image): a rebuild compiles only what changed since
# the last one, and no layer carries target/. Only the three binaries leave the stage.
# cargo decides what changed by modification time, which is not enough here: a file edited on the
# host while a build runs keeps an mtime older than that build's start and would be skipped by the
# next one. So the stage keeps a checksum list of the sources it last built (in the cache) and
# touches every file whose content differs (all of them the first time) before building.
# `sharing=locked`: two builds at once take turns rather than corrupt one target/. Reclaim the
# cache: docs/operations.md, "Image builds".
RUN --mount=type=cache,id=shoal-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=shoal-target,target=/src/target,sharing=locked \
    find Cargo.toml Cargo.lock server shared testkit loadtest -type f -print0 \
      | xargs -0 sha256sum | sort > /tmp/sources \
 && if [ -f target/shoal-sources.sha256 ]; then \
      comm -13 target/shoal-sources.sha256 /tmp/sources | cut -c67- | xargs -r -d '\n' touch; \
    else \
      cut -c67- /tmp/sources | xargs -r -d '\n' touch; \
    fi \
 && cargo build --release --locked -p shoal-server -p shoal-loadtest \
 && cp /tmp/sources target/shoal-sources.sha256 \
 && mkdir /out \
 && cp target/release/shoal-server target/release/shoal-loadtest target/release/shoal-otlp-sink /out/ \
 && strip --strip-debug /out/*

FROM debian:${DEBIAN_RELEASE}-slim AS runtime-base
LABEL io.shoal.image=runtime
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
