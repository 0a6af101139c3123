# syntax=docker/dockerfile:1
# One image with the `syft-router` binary (ledger, router and client commands).
#   docker build -t syft-router .
#   docker run --rm syft-router --help

FROM rust:1-bookworm AS build
WORKDIR /src
# The whole workspace (minus what .dockerignore leaves out), so the image cannot drift from
# Cargo.toml: a new crate or a new file needed by a build script is simply there. BuildKit cache
# mounts keep the registry and the target dir between builds instead of a skeleton-manifest stage,
# so a source edit rebuilds only our own crates. `cargo test --test compose` checks this.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin syft-router \
    && objcopy --strip-debug target/release/syft-router /syft-router

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/syft --create-home syft
COPY --from=build /syft-router /usr/local/bin/syft-router
USER 10001:10001
WORKDIR /var/lib/syft
# The embedded SQLite database (when DATABASE_URL is unset) lives here.
ENV SYFT_DATA_DIR=/var/lib/syft/data
# ledger gRPC, router gRPC, router HTTP, ledger HTTP
EXPOSE 50051 50052 8080 8081
ENTRYPOINT ["syft-router"]
CMD ["--help"]
