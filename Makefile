# vblade-ha build, test and benchmark entry points. See README.md.
GO      ?= go
PREFIX  ?= /usr/local
DESTDIR ?=
GOFLAGS ?=
export GOFLAGS

.PHONY: all build test unit faults-ci e2e bench fuzz fuzz-ci vet fmt clean install man

all: build

build:
	$(GO) build -o bin/ ./cmd/...

# The whole suite, as CI runs it: vet, unit and integration tests under the
# race detector (the namespace tests need root, as CI is), then the end-to-end
# check against the real Linux aoe driver in QEMU.
test: build vet unit faults-ci fuzz-ci e2e

fuzz-ci:
	$(MAKE) fuzz FUZZTIME=10s

unit:
	$(GO) test -race -count=1 -timeout 30m -skip '^TestFaults$$' ./...

# The fault suite with CI's budget (7 minutes of nemesis over a 3- and a
# 5-node cluster, about 100-120 faults), verbose so that its report (faults
# by kind, operations, lost writes, linearizability, longest stall) is in
# the CI log.
faults-ci:
	$(GO) test -race -count=1 -timeout 30m -v -run '^TestFaults$$' ./test/faults/ -faults.duration=7m

vet:
	$(GO) vet ./...
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# The real Linux aoe driver (Debian's kernel under QEMU, ops/e2e): our vblade
# alone (mkfs, mount, write, fsck, pattern checked on the host), then ext4 on
# a three-node cluster through three leader kills (prints the stall per kill).
e2e: build
	bash ops/e2e/run.sh basic
	bash ops/e2e/run.sh cluster-failover

# A three-node cluster on a private LAN (namespaces), a verifying workload,
# the leader killed mid-run; tears everything down, also on Ctrl-C. Root.
.PHONY: demo
demo: build
	bash ops/demo/demo.sh

bench: build
	bash ops/bench/run.sh

# Coverage-guided fuzzing of every decoder for FUZZTIME each (CI: 10s; the
# checked-in seed corpora also run in `make unit`). A crasher is written to
# the package's testdata/fuzz and fails the run.
FUZZTIME ?= 30s
FUZZERS = ./aoe:FuzzDecode ./aoe:FuzzTargetHandle ./aoe:FuzzClientHandleFrame \
	./replication:FuzzDecodeEntry ./replication:FuzzReadMeta \
	./node:FuzzAdminDecoders ./node:FuzzParseConfig
# A run that fails without writing a failing input is the fuzzing engine's
# own end-of-time race (it reports "context deadline exceeded"): it is run
# once more; a failing input always fails the target.
fuzz:
	@set -e; for f in $(FUZZERS); do \
	  pkg=$${f%%:*}; name=$${f##*:}; dir=$$pkg/testdata/fuzz/$$name; \
	  echo "fuzz $$pkg $$name ($(FUZZTIME))"; \
	  before=$$(ls $$dir 2>/dev/null | wc -l); \
	  if ! $(GO) test -run XXX -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg; then \
	    if [ "$$(ls $$dir 2>/dev/null | wc -l)" != "$$before" ]; then echo "fuzz: $$name found a failing input in $$dir"; exit 1; fi; \
	    echo "fuzz: $$name stopped without a failing input; running it once more"; \
	    $(GO) test -run XXX -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg; \
	  fi; \
	done

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf bin

# Install binaries, systemd units, man pages and example configurations.
# PREFIX (default /usr/local) and DESTDIR (staging root, for packages) are
# honoured; the units name $(PREFIX)/bin/vblade, so they are rewritten when
# PREFIX is not /usr/local. Units go to $(PREFIX)/lib/systemd/system, which
# systemd searches for /usr/local and /usr (set UNITDIR for another layout).
# Nothing under /etc is touched: copy $(DOCDIR)/examples/node.toml to
# /etc/vblade/node.toml yourself.
BINDIR  ?= $(PREFIX)/bin
MANDIR  ?= $(PREFIX)/share/man
UNITDIR ?= $(PREFIX)/lib/systemd/system
DOCDIR  ?= $(PREFIX)/share/doc/vblade-ha
install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 \
	  $(DESTDIR)$(DOCDIR)/examples/vblade.conf.d
	install -m 0755 bin/vblade bin/vbladectl $(DESTDIR)$(BINDIR)/
	for u in ops/systemd/*.service; do \
	  sed 's|/usr/local/bin/|$(BINDIR)/|g' $$u > $(DESTDIR)$(UNITDIR)/$$(basename $$u) && \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$(basename $$u) || exit 1; \
	done
	install -m 0644 ops/man/man8/*.8 $(DESTDIR)$(MANDIR)/man8/
	install -m 0644 ops/man/man5/*.5 $(DESTDIR)$(MANDIR)/man5/
	install -m 0644 ops/examples/node.toml ops/examples/serve.toml docs/CONFIG.md $(DESTDIR)$(DOCDIR)/examples/
	install -m 0644 ops/examples/vblade.conf.d/*.conf $(DESTDIR)$(DOCDIR)/examples/vblade.conf.d/

# Render the man pages to text (a quick look without installing).
man:
	@for p in ops/man/man*/*.[58]; do echo "== $$p"; man -l $$p | cat; done

# Jepsen-style fault suite (test/faults): 3- and 5-node clusters of real
# nodes in network namespaces under a recorded AoE workload, a nemesis
# (crashes, pauses, partitions, a full disk) and a linearizability checker.
# Needs root and nft (Debian package nftables). The CI-sized run is
# FAULTS_DURATION of nemesis time (default 10m: 100-150 faults);
# `LONG=1 FAULTS_DURATION=2h make faults` runs as long as asked. The report
# is printed; a failing run keeps its history and node logs in
# FAULTS_ARTIFACTS (default $TMPDIR/vblade-faults) and prints the path.
.PHONY: faults
ifeq ($(LONG),1)
FAULTS_DURATION ?= 1h
FAULTS_TIMEOUT  ?= 0
else
FAULTS_DURATION ?= 10m
FAULTS_TIMEOUT  ?= 30m
endif
faults:
	$(GO) test -count=1 -v -run TestFaults -timeout $(FAULTS_TIMEOUT) ./test/faults/ -faults.duration=$(FAULTS_DURATION)
