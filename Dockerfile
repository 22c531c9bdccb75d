# syntax=docker/dockerfile:1
# The sidecar on distroless: no shell, no package manager, runs as non-root 65532.
#
# Build: make image   (or: docker build -t llm-d-routing-sidecar .)

# Built against glibc, as benchmarked (docs/design.md, "Allocator"): the sidecar tunes glibc's
# allocator for large request bodies, and musl's allocator is markedly slower under load.
# The builder is Debian 12, like the runtime image, so the glibc versions match.
FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo reads every workspace member's manifest, so the simulator's sources come along, but
# `-p llm-d-routing-sidecar` builds only the sidecar (the simulator is a dev-dependency).
COPY vllm-sim ./vllm-sim
# Strip symbols and build only the sidecar: the image carries one file.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN cargo build --release --locked -p llm-d-routing-sidecar --bin llm-d-routing-sidecar \
    && cp target/release/llm-d-routing-sidecar /llm-d-routing-sidecar

# distroless/cc: glibc and libgcc only.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /llm-d-routing-sidecar /llm-d-routing-sidecar
# distroless "nonroot" is uid/gid 65532; stated numerically so runAsNonRoot can verify it.
USER 65532:65532
# 8000: the proxy; 9090: /metrics and /health (-metrics-port).
EXPOSE 8000 9090
ENTRYPOINT ["/llm-d-routing-sidecar"]
