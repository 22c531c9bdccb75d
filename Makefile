# One cargo profile (release) for build, test, demo and bench: the dependency graph is
# compiled once.
CARGO ?= cargo
PROFILE_DIR := target/release

.PHONY: build test lint fmt demo bench image clean

build:
	$(CARGO) build --release --locked --workspace --bins
	mkdir -p bin
	cp $(PROFILE_DIR)/llm-d-routing-sidecar $(PROFILE_DIR)/vllm-sim bin/

test:
	$(CARGO) test --release --locked --workspace

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

demo: build
	./scripts/demo.sh

# IMAGE names the tag; CONTAINER_ENGINE may force docker or podman. A docker client without a
# reachable daemon does not count as an engine.
IMAGE ?= llm-d-routing-sidecar:latest
CONTAINER_ENGINE ?= $(shell for e in docker podman; do \
	command -v $$e >/dev/null 2>&1 && $$e info >/dev/null 2>&1 && { echo $$e; break; }; done)

image:
	@if [ -z "$(CONTAINER_ENGINE)" ]; then \
		echo "make image: no container engine available (need docker with a running daemon, or podman)" >&2; \
		exit 1; \
	fi
	$(CONTAINER_ENGINE) build -t $(IMAGE) .

clean:
	$(CARGO) clean
	rm -rf bin

bench:
	./scripts/bench.sh

# Opt-in, not part of `test`: the sidecar against real vLLM (CPU build), one server pair per KV
# connector vLLM runs on CPU (NIXL pull and push, ExampleConnector; LMCache MP with E2E_LMCACHE=1).
# The first run installs a ~6.7 GB venv under ${XDG_CACHE_HOME:-~/.cache}/llm-d-sidecar-e2e.
.PHONY: e2e-vllm
e2e-vllm:
	./scripts/e2e-vllm/run.sh

# Bounded soak test on loopback (SOAK_REQUESTS=200000 by default, SOAK_MAX_SECS=600): memory
# and descriptors of the sidecar must not grow, and no KV lease may leak. See docs/testing.md "Soak test".
# `make soak-chaos` (= SOAK_CHAOS=1 make soak) adds raw client disconnects at every phase,
# simulator faults, and the simulators killed and restarted mid-stream (SOAK_SEED replays the requests).
.PHONY: soak soak-chaos
soak:
	./scripts/soak.sh

soak-chaos:
	SOAK_CHAOS=1 ./scripts/soak.sh
