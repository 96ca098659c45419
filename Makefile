# Thin wrapper over CMake (the build is CMakeLists.txt; presets in
# CMakePresets.json). Every target installs the Debian dependencies first.
BUILD      ?= build
JOBS       ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_ARGS ?=
CTEST_ARGS ?=

.PHONY: all deps configure build demo test bench asan tsan install clean

all: build

deps:
	@scripts/install-deps

configure: deps
	cmake -S . -B $(BUILD) -DBUS_WERROR=ON $(CMAKE_ARGS)

build: configure
	cmake --build $(BUILD) -j $(JOBS)

# The main example on the embedded defaults: the in-memory broker and a
# RocksDB event store under ./data (kept between runs; make clean removes
# it).
demo: build
	$(BUILD)/examples/orders/orders ./data

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) $(CTEST_ARGS)

# Every benchmark, each against its raw baseline in the same run.
bench: deps
	cmake -S . -B $(BUILD)-release -DCMAKE_BUILD_TYPE=Release \
	    -DBUS_BUILD_TESTS=OFF -DBUS_BUILD_EXAMPLES=OFF $(CMAKE_ARGS)
	cmake --build $(BUILD)-release -j $(JOBS)
	scripts/run-benches $(BUILD)-release

asan: deps
	cmake -S . -B $(BUILD)-asan -DBUS_WERROR=ON \
	    -DBUS_SANITIZER='address;undefined' -DBUS_BUILD_BENCH=OFF $(CMAKE_ARGS)
	cmake --build $(BUILD)-asan -j $(JOBS)
	cd $(BUILD)-asan && ctest --output-on-failure -j $(JOBS) $(CTEST_ARGS)

# ThreadSanitizer over the concurrent code (tests labelled tsan).
tsan: deps
	cmake -S . -B $(BUILD)-tsan -DBUS_WERROR=ON -DBUS_SANITIZER=thread \
	    -DBUS_BUILD_BENCH=OFF -DBUS_BUILD_EXAMPLES=OFF $(CMAKE_ARGS)
	cmake --build $(BUILD)-tsan -j $(JOBS)
	cd $(BUILD)-tsan && ctest --output-on-failure -j $(JOBS) -L tsan $(CTEST_ARGS)

install: build
	cmake --install $(BUILD)

clean:
	rm -rf $(BUILD) $(BUILD)-release $(BUILD)-asan $(BUILD)-tsan data
