# syntax=docker/dockerfile:1
# The sidecar as a static binary on distroless: no shell, no libc, runs as non-root 65532.
#
# Build: make image   (or: docker build -t llm-d-routing-sidecar .)

# Alpine's Rust targets musl, whose binaries are statically linked by default, so the result
# runs on distroless/static (no glibc) and works the same on amd64 and arm64 builders.
FROM docker.io/library/rust:1-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Strip symbols and build only the sidecar: the image carries one small file.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN cargo build --release --locked --bin llm-d-routing-sidecar \
    && cp target/release/llm-d-routing-sidecar /llm-d-routing-sidecar

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /llm-d-routing-sidecar /llm-d-routing-sidecar
# distroless "nonroot" is uid/gid 65532; stated numerically so runAsNonRoot can verify it.
USER 65532:65532
# 8000: the proxy; 9090: /metrics and /health (-metrics-port).
EXPOSE 8000 9090
ENTRYPOINT ["/llm-d-routing-sidecar"]
