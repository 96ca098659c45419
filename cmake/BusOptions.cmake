# Build options (STYLE.md §13). An option that is ON with a missing
# dependency fails the configure step: nothing is silently dropped.
option(BUS_WITH_ZMQ      "Build the ZeroMQ broker (needs libzmq)"     ON)
option(BUS_WITH_KAFKA    "Build the Kafka broker (needs librdkafka)"  ON)
option(BUS_WITH_ROCKSDB  "Build the event store and outbox (RocksDB)" ON)
option(BUS_BUILD_TESTS   "Build the cmocka test suite"                ON)
option(BUS_BUILD_BENCH   "Build the benchmarks"                       ON)
option(BUS_BUILD_EXAMPLES "Build the examples"                        ON)
option(BUS_WERROR        "Treat warnings as errors"                   OFF)
set(BUS_SANITIZER "none" CACHE STRING
    "Sanitizers: none, address;undefined, thread, memory")
set_property(CACHE BUS_SANITIZER PROPERTY STRINGS
    "none" "address;undefined" "thread" "memory")

# BUS_SANITIZER is itself a list ("address;undefined"): compare as a string.
string(REPLACE ";" "," _bus_san "${BUS_SANITIZER}")
if (NOT _bus_san MATCHES "^(none|address,undefined|address|undefined|thread|memory)$")
    message(FATAL_ERROR "BUS_SANITIZER='${BUS_SANITIZER}' is not one of: "
        "none, address;undefined, thread, memory")
endif ()

if (NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
    set(CMAKE_BUILD_TYPE RelWithDebInfo CACHE STRING "Build type" FORCE)
endif ()

find_package(PkgConfig)
if (NOT PKG_CONFIG_FOUND)
    message(FATAL_ERROR "pkg-config not found: run scripts/install-deps")
endif ()
find_package(Threads REQUIRED)

# bus_require_pkg(<prefix> <module> <option> <debian-package>)
# Finds a pkg-config module or fails, naming the option and the package.
macro(bus_require_pkg prefix module opt debpkg)
    pkg_check_modules(${prefix} QUIET IMPORTED_TARGET ${module})
    if (NOT ${prefix}_FOUND)
        message(FATAL_ERROR "${opt} is ON but pkg-config module '${module}' "
            "was not found. Install Debian package '${debpkg}' "
            "(scripts/install-deps does it) or configure with -D${opt}=OFF.")
    endif ()
endmacro()

# msgpack-c is used by tests and benchmarks as an independent MessagePack
# implementation (cross-checks and the raw baseline); the core has its own
# strict, bounded encoder and decoder (docs/wire-format.md says why).
if (BUS_BUILD_TESTS OR BUS_BUILD_BENCH)
    bus_require_pkg(MSGPACK msgpack BUS_BUILD_TESTS libmsgpack-dev)
endif ()
if (BUS_BUILD_TESTS)
    bus_require_pkg(CMOCKA cmocka BUS_BUILD_TESTS libcmocka-dev)
    bus_require_pkg(JANSSON jansson BUS_BUILD_TESTS libjansson-dev)
endif ()
if (BUS_WITH_ZMQ)
    bus_require_pkg(ZMQ libzmq BUS_WITH_ZMQ libzmq3-dev)
endif ()
if (BUS_WITH_KAFKA)
    bus_require_pkg(RDKAFKA rdkafka BUS_WITH_KAFKA librdkafka-dev)
endif ()
if (BUS_WITH_ROCKSDB)
    bus_require_pkg(ROCKSDB rocksdb BUS_WITH_ROCKSDB librocksdb-dev)
endif ()
