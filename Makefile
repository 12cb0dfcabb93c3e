# cbtflow — `make help` lists the targets.

SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
GOBIN := $(shell $(GO) env GOPATH)/bin
# Integration tests start servers and copy GiBs: give them time.
TEST_TIMEOUT ?= 45m
# The build tag of the test-only fault points (internal/faultpoint): tests
# and the fault harness build with it, make build never does.
FAULTPOINTS := cbtflow_faultpoints

.DEFAULT_GOAL := help

.PHONY: help deps build test lint bench dev down clean demo chaos

help: ## list the targets
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

deps: ## install system packages and tools, start PostgreSQL (idempotent)
	@scripts/deps

build: ## build the release binaries into ./bin (no fault points)
	$(GO) build -o bin/ ./starter ./worker

test: deps ## run every test (unit and integration, real components), built with the fault points
	$(GO) test -tags $(FAULTPOINTS) -count=1 -timeout $(TEST_TIMEOUT) ./...

lint: deps ## gofmt check, go vet, staticcheck: of the release build and of the build with the fault points
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags $(FAULTPOINTS) ./...
	$(GOBIN)/staticcheck ./...
	$(GOBIN)/staticcheck -tags $(FAULTPOINTS) ./...

dev: deps build ## start the local stack in the background (Temporal + Web UI, lab, worker)
	@scripts/dev up

down: ## stop what make dev started; keep the state
	@scripts/dev down

clean: ## make down, then wipe .cbtflow/ and the dev database
	@scripts/dev clean

demo: deps build ## the main job on the lab: fresh stack, full + incremental backup, restores verified byte for byte
	$(GO) run ./cmd/demo $(DEMO_FLAGS)

bench: deps ## copier vs nbdcopy vs qemu-img convert (full copy, 4 GiB disk); chain check cost; whole backups through a stack of their own, phase by phase, vs nbdcopy; 20 VMs at once; a 2 TiB sparse disk (BENCH_FLAGS, e.g. -part e2e -cases scale)
	$(GO) run ./cmd/bench $(BENCH_FLAGS)

chaos: deps ## fault harness, on its own build with the fault points (bin/faultpoints/): ≥20 backups under worker kills, Temporal restarts, DB cuts, EIO, full repository; prints a table
	$(GO) build -tags $(FAULTPOINTS) -o bin/faultpoints/ ./starter ./worker
	CBTFLOW_WORKER_BIN=$(CURDIR)/bin/faultpoints/worker CBTFLOW_STARTER_BIN=$(CURDIR)/bin/faultpoints/starter \
		$(GO) test -tags $(FAULTPOINTS) -v -count=1 -timeout 60m -run 'TestChaos$$' ./test/chaos -args -full
