# Entry points for people and CI. `make test` and `make run` work on a fresh Debian 12 machine:
# they install missing packages first (scripts/install-deps), then configure, build and act.
BUILD_DIR ?= build
BUILD_TYPE ?= Release
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_DIR ?= $(HOME)/.cache/ccache

.PHONY: all deps configure build test run bench install clean

all: build

deps:
	@scripts/install-deps

$(BUILD_DIR)/build.ninja:
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(CMAKE_FLAGS)

configure: deps $(BUILD_DIR)/build.ninja

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS)

# `make bench`: Faiss and gnuplot (optional baselines and plot; skipped with a message if they
# cannot be installed), a re-configure so CMake sees them, the build, then scripts/run-benchmarks
# (fidelity report, every *_bench, service load test; results in $(BUILD_DIR)/bench-results/).
bench: configure
	@scripts/install-deps --with-bench || echo "bench: Faiss/gnuplot not installed; their rows and the plot are skipped"
	cmake $(BUILD_DIR) > /dev/null
	cmake --build $(BUILD_DIR) -j $(JOBS)
	scripts/run-benchmarks $(BUILD_DIR)

# `make run`: builds the server and starts it in the foreground on 127.0.0.1:50051 (plaintext,
# loopback only), data in ./fibquant-data, the default profiles of server/default-profiles/
# preloaded, metrics on 127.0.0.1:9464. Ctrl-C drains and stops it. RUN_FLAGS adds flags
# (e.g. RUN_FLAGS="--workers=4"); docs/OPERATIONS.md describes them all.
RUN_FLAGS ?=
BUF_CURL := scripts/buf curl --protocol grpc --http2-prior-knowledge
SVC_URL := http://127.0.0.1:50051/fibquant.v1.KvCompressionService
run: configure
	cmake --build $(BUILD_DIR) -j $(JOBS) --target fibquant-server
	@echo ""
	@echo "Talk to it from another shell (scripts/buf installs buf from npm on first use):"
	@echo "  $(BUF_CURL) --list-services http://127.0.0.1:50051"
	@echo "  $(BUF_CURL) --list-methods http://127.0.0.1:50051"
	@echo "  $(BUF_CURL) -d '{}' http://127.0.0.1:50051/grpc.health.v1.Health/Check"
	@echo "  $(BUF_CURL) -d '{}' $(SVC_URL)/GetServerInfo"
	@echo "  $(BUF_CURL) -d '{}' $(SVC_URL)/ListProfiles"
	@echo "  curl -s http://127.0.0.1:9464/metrics | grep ^fibquant_"
	@echo "More (register a profile, compress a stream): docs/OPERATIONS.md. Ctrl-C stops the server."
	@echo ""
	$(BUILD_DIR)/server/fibquant-server --listen=127.0.0.1:50051 --data-dir=./fibquant-data \
	  --preload-dir=server/default-profiles $(RUN_FLAGS)

# `make install [PREFIX=/usr/local] [DESTDIR=...]`: builds, then installs fibquant-server and
# fibquant (bin/), the default profiles (share/fibquant/profiles/), man pages and docs.
# Only the installed programs are built (not the tests and benchmarks).
PREFIX ?= /usr/local
install: configure
	cmake --build $(BUILD_DIR) -j $(JOBS) --target fibquant-server fibquant
	DESTDIR=$(DESTDIR) cmake --install $(BUILD_DIR) --prefix $(PREFIX)

clean:
	rm -rf $(BUILD_DIR)
