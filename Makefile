# vblade-ha build, test and benchmark entry points. See README.md.
GO      ?= go
PREFIX  ?= /usr/local
DESTDIR ?=
GOFLAGS ?=
export GOFLAGS

.PHONY: all build test unit e2e bench fuzz vet fmt clean

all: build

build:
	$(GO) build -o bin/ ./cmd/...

# The whole suite, as CI runs it: vet, unit and integration tests under the
# race detector (the namespace tests need root, as CI is), then the end-to-end
# check against the real Linux aoe driver in QEMU.
test: build vet unit e2e

unit:
	$(GO) test -race -count=1 -timeout 30m ./...

vet:
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

e2e: build
	bash ops/e2e/run.sh basic

bench: build
	bash ops/bench/run.sh

# Short coverage-guided fuzzing of every decoder (the seed corpora already run
# in `make unit`).
FUZZTIME ?= 30s
fuzz:
	$(GO) test -run XXX -fuzz 'FuzzDecode$$' -fuzztime $(FUZZTIME) ./aoe
	$(GO) test -run XXX -fuzz 'FuzzTargetHandle$$' -fuzztime $(FUZZTIME) ./aoe

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin
