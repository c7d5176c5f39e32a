# One way to run things: the README and .ci/run both use these targets.
#
# Build outputs live outside the clone so a fresh clone reuses them:
#   CARGO_TARGET_DIR  ~/.cache/switchyard/target
#   Go caches         Go's defaults under $HOME
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CACHE ?= $(HOME)/.cache/switchyard
export CARGO_TARGET_DIR ?= $(CACHE)/target
export PATH := $(HOME)/.cargo/bin:/usr/local/go/bin:$(PATH)
CARGO_DENY_VERSION := 0.20.2

# Debian packages the agent and its tests need (the kernel tools it drives and the test network tools).
APT_PACKAGES := iptables nftables ipset conntrack iproute2 user-mode-linux procps iputils-ping socat lua5.1

.PHONY: help setup setup-apt setup-rust test fmt-check clippy unit crds crds-check deny demo upstream chart-test bench-micro bench-sync bench bench-quick

help:
	@echo "make demo   - run the demo (see README.md)"
	@echo "make test   - install what the tests need, then run every check CI runs"
	@echo "make crds   - regenerate crds/*.yaml from the API types"
	@echo "make bench  - Switchyard and upstream kube-proxy side by side at 10 to 10,000 services (~25 min, root)"

setup: setup-apt setup-rust

setup-apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

setup-rust:
	@rustup component add rustfmt clippy >/dev/null 2>&1 || true
	@if ! cargo deny --version 2>/dev/null | grep -q "$(CARGO_DENY_VERSION)"; then \
	  echo "installing cargo-deny $(CARGO_DENY_VERSION)"; \
	  CARGO_TARGET_DIR=$(CACHE)/tools-target cargo install cargo-deny --version $(CARGO_DENY_VERSION) --locked --quiet; \
	fi

test: setup setup-e2e fmt-check clippy crds-check unit chart-test e2e-test bench-quick deny

fmt-check:
	cargo fmt --all --check

clippy:
	cargo clippy --workspace --all-targets --locked -- -D warnings

# Kernel tests run for real as root (network namespaces only); .ci/run sets SWITCHYARD_REQUIRE_PRIVILEGED so a
# skipped one fails, and the skip marker in the output is checked as a second line of defence.
unit:
	@log=$$(mktemp); trap 'rm -f $$log' EXIT; \
	cargo test --workspace --locked --exclude switchyard-e2e 2>&1 | tee $$log; \
	if [ -n "$${SWITCHYARD_REQUIRE_PRIVILEGED:-}" ] && grep -q SWYD-TEST-SKIPPED $$log; then \
	  echo "privileged tests were skipped; CI must run them"; exit 1; \
	fi

crds:
	cargo run --quiet --locked -p switchyard-api --bin crdgen
	cp crds/switchyard.dev_*.yaml charts/switchyard/crds/

# The upstream binaries (helm among them) built from Go modules, cached under ~/.cache/switchyard/bin.
upstream:
	e2e/upstream/build.sh

# helm lint and helm template with several value sets, with assertions on the output.
chart-test: upstream
	bash charts/switchyard/tests/run.sh

# The committed YAML must be what the types generate (the schema test checks the same from inside cargo).
crds-check:
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	cargo run --quiet --locked -p switchyard-api --bin crdgen $$tmp >/dev/null; \
	for f in $$tmp/*.yaml; do \
	  diff -u crds/$$(basename $$f) $$f || { echo "crds/ is out of date: run make crds and commit"; exit 1; }; \
	done; \
	diff -u docs/configuration.md $$tmp/configuration.md || { echo "docs/configuration.md is out of date: run make crds"; exit 1; }

# Advisories need the RustSec database from github.com; where it cannot be fetched that check is reported as
# not run (never as passed), and licenses, bans and sources are still checked.
deny:
	cargo deny --log-level error check bans licenses sources
	@out=$$(cargo deny --log-level error check advisories 2>&1) && status=0 || status=$$?; \
	if echo "$$out" | grep -q "failed to fetch advisory database"; then \
	  echo "NOTICE: advisories NOT checked: the RustSec database (github.com) is unreachable from this machine"; \
	else echo "$$out"; exit $$status; fi

# Benchmarks (results and method in docs/benchmarks.md). Timed figures are never asserted in tests.
bench-micro:
	cargo bench --locked -p switchyard-agent --bench pipeline

# Full sync against iptables-restore alone on the real kernel (root; network namespaces only).
bench-sync:
	BENCH_IPTABLES=legacy cargo bench --locked -p switchyard-agent --bench full_sync
	BENCH_IPTABLES=nft BENCH_SIZES=1000 cargo bench --locked -p switchyard-agent --bench full_sync

demo:
	E2E_CLUSTER=$(E2E_CLUSTER) E2E_NODES=$(E2E_NODES) e2e/demo.sh

# ---------------------------------------------------------------------------------------------------------
# Local cluster for the e2e tests and the demo (issue 4; see e2e/README.md): a real control plane built from
# upstream Go modules plus simulated nodes in network namespaces. Needs root.
#   make cluster-up [E2E_CLUSTER=dev E2E_NODES=3]   start it (reuses a running one), print the kubeconfig
#   make cluster-down [E2E_CLUSTER=dev]             stop it and remove every namespace/process/mount/file
#   make e2e-test                                   the e2e tests (each starts and removes its own cluster)
E2E_CLUSTER ?= dev
E2E_NODES ?= 3
E2E_BIN := $(CARGO_TARGET_DIR)/debug/switchyard-e2e

.PHONY: setup-e2e e2e-build cluster-up cluster-down cluster-status e2e-test

setup-e2e: setup-apt
	e2e/upstream/build.sh

e2e-build:
	cargo build --quiet --locked -p switchyard-e2e

cluster-up: setup-e2e e2e-build
	$(E2E_BIN) cluster up --name $(E2E_CLUSTER) --nodes $(E2E_NODES)

cluster-down: e2e-build
	$(E2E_BIN) cluster down --name $(E2E_CLUSTER)

cluster-status: e2e-build
	$(E2E_BIN) cluster status --name $(E2E_CLUSTER)

# SWITCHYARD_REQUIRE_PRIVILEGED=1: a test that cannot run (not root) fails instead of skipping.
e2e-test: setup-e2e
	SWITCHYARD_REQUIRE_PRIVILEGED=1 cargo test --locked -p switchyard-e2e

# Switchyard's agent (release build) and upstream kube-proxy side by side on a local cluster of their own
# (root; about 25 minutes on 2 cores). Writes docs/bench/results.{json,md} and docs/bench/plot.svg.
BENCH_ARGS ?=
bench: setup-e2e e2e-build
	cargo build --quiet --locked --release -p switchyard-agent
	$(E2E_BIN) bench --agent-bin $(CARGO_TARGET_DIR)/release/switchyard-agent --out docs/bench $(BENCH_ARGS)

# The same harness at small sizes, run by CI to keep it working (figures go outside the clone; --strict fails
# the run when a change is never seen through the VIP or a figure is missing).
bench-quick: setup-e2e e2e-build
	cargo build --quiet --locked -p switchyard-agent
	$(E2E_BIN) bench --cluster benchq --sizes 10,300 --changes 20 --connects 200 --strict \
	  --agent-bin $(CARGO_TARGET_DIR)/debug/switchyard-agent --out $(CARGO_TARGET_DIR)/bench-quick
