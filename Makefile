# One cargo profile (release) for build, test, demo and bench: the dependency graph is
# compiled once.
CARGO ?= cargo
PROFILE_DIR := target/release

.PHONY: build test lint fmt demo clean

build:
	$(CARGO) build --release --locked --bins
	mkdir -p bin
	cp $(PROFILE_DIR)/llm-d-routing-sidecar $(PROFILE_DIR)/vllm-sim bin/

test:
	$(CARGO) test --release --locked

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

demo: build
	./scripts/demo.sh

clean:
	$(CARGO) clean
	rm -rf bin

# Opt-in, not part of `test`: the sidecar against real vLLM (CPU build) with NixlConnector.
# The first run installs a ~6.7 GB venv under ${XDG_CACHE_HOME:-~/.cache}/llm-d-sidecar-e2e.
.PHONY: e2e-vllm
e2e-vllm:
	./scripts/e2e-vllm/run.sh
