# cbtflow — `make help` lists the targets.

SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go
GOBIN := $(shell $(GO) env GOPATH)/bin
# Integration tests start servers and copy GiBs: give them time.
TEST_TIMEOUT ?= 45m

.DEFAULT_GOAL := help

.PHONY: help deps build test lint bench dev down clean demo chaos

help: ## list the targets
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

deps: ## install system packages and tools, start PostgreSQL (idempotent)
	@scripts/deps

build: ## build the binaries into ./bin
	$(GO) build -o bin/ ./starter ./worker

test: deps ## run every test (unit and integration, real components)
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...

lint: deps ## gofmt check, go vet, staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GOBIN)/staticcheck ./...

dev: deps build ## start the local stack in the background (Temporal + Web UI, lab, worker)
	@scripts/dev up

down: ## stop what make dev started; keep the state
	@scripts/dev down

clean: ## make down, then wipe .cbtflow/ and the dev database
	@scripts/dev clean

demo: deps build ## the main job on the lab: fresh stack, full + incremental backup, restores verified byte for byte
	$(GO) run ./internal/demo $(DEMO_FLAGS)

bench: deps ## copier vs nbdcopy vs qemu-img convert (full copy, 4 GiB disk); cost of the chain check before an incremental
	$(GO) run ./internal/bench

chaos: deps build ## fault harness: ≥20 backups under worker kills, Temporal restarts, DB cuts, EIO, full repository; prints a table
	CBTFLOW_WORKER_BIN=$(CURDIR)/bin/worker CBTFLOW_STARTER_BIN=$(CURDIR)/bin/starter \
		$(GO) test -v -count=1 -timeout 60m -run 'TestChaos$$' ./internal/chaos -args -full
