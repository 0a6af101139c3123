# syntax=docker/dockerfile:1
# One image with the `syft-router` binary (ledger, router and client commands).
#   docker build -t syft-router .
#   docker run --rm syft-router --help

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them: a skeleton of every package.
COPY Cargo.toml Cargo.lock ./
COPY crates/proto/Cargo.toml crates/proto/
COPY crates/money/Cargo.toml crates/money/
COPY crates/tls/Cargo.toml crates/tls/
COPY crates/ledger/Cargo.toml crates/ledger/
COPY crates/router/Cargo.toml crates/router/
COPY proto proto
RUN for c in proto money tls ledger router; do mkdir -p crates/$c/src && echo '' > crates/$c/src/lib.rs; done \
    && mkdir -p src && echo 'fn main() {}' > src/main.rs \
    && cargo build --release --locked --bin syft-router \
    && rm -rf src crates/*/src
COPY . .
# Make cargo see the real sources as newer than the skeleton build.
RUN find src crates proto migrations -type f -exec touch {} + \
    && cargo build --release --locked --bin syft-router \
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
