# One cargo profile (release) for build, test, demo and bench: the dependency graph is
# compiled once.
CARGO ?= cargo
PROFILE_DIR := target/release

.PHONY: build test lint fmt demo bench clean

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

bench:
	./scripts/bench.sh
