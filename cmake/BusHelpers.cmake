# Helpers shared by every folder. See STYLE.md §13.

# Warnings and sanitizers for our own targets, never for third-party code.
function(bus_add_warnings tgt)
    target_compile_options(${tgt} PRIVATE -Wall -Wextra -Wpedantic -Wshadow
        -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 -Wundef -Wvla
        $<$<BOOL:${BUS_WERROR}>:-Werror>)
    set_target_properties(${tgt} PROPERTIES C_STANDARD 11
        C_STANDARD_REQUIRED ON C_EXTENSIONS OFF)
    target_compile_definitions(${tgt} PRIVATE _POSIX_C_SOURCE=200809L)
    if (NOT BUS_SANITIZER STREQUAL "none")
        list(JOIN BUS_SANITIZER "," san)
        target_compile_options(${tgt} PRIVATE -fsanitize=${san}
            -fno-omit-frame-pointer -fno-sanitize-recover=all)
        target_link_options(${tgt} PRIVATE -fsanitize=${san})
    endif ()
endfunction()

# bus_add_component(<name> SOURCES ... [DEPS <imported targets>...])
#
# A component (bus_core, bus_broker_memory, bus_store, ...) is compiled twice
# as OBJECT libraries: <name> goes into the installed shared library `bus`,
# <name>_testing (with BUS_TESTING defined: fault injection) into the static
# `bus_testing` that the tests link (STYLE.md §12).
function(bus_add_component name)
    cmake_parse_arguments(C "" "" "SOURCES;DEPS" ${ARGN})
    foreach (variant IN ITEMS "" "_testing")
        set(t ${name}${variant})
        add_library(${t} OBJECT ${C_SOURCES})
        bus_add_warnings(${t})
        set_target_properties(${t} PROPERTIES POSITION_INDEPENDENT_CODE ON
            C_VISIBILITY_PRESET hidden)
        # Calls between our own exported functions bind locally (no PLT).
        target_compile_options(${t} PRIVATE -fno-semantic-interposition)
        target_include_directories(${t}
            PUBLIC
                $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/libbus/include>
            PRIVATE
                ${PROJECT_SOURCE_DIR}/libbus/src
                ${CMAKE_CURRENT_SOURCE_DIR})
        target_compile_definitions(${t} PRIVATE BUS_BUILDING)
        if (variant STREQUAL "_testing")
            target_compile_definitions(${t} PUBLIC BUS_TESTING)
        endif ()
        target_link_libraries(${t} PUBLIC Threads::Threads ${C_DEPS})
    endforeach ()
    set_property(GLOBAL APPEND PROPERTY BUS_COMPONENTS ${name})
    set_property(GLOBAL APPEND PROPERTY BUS_COMPONENT_DEPS ${C_DEPS})
endfunction()

# Combines the components into `bus` (alias bus::bus, installed) and
# `bus_testing` (static, tests only).
function(bus_finalize_libraries)
    get_property(comps GLOBAL PROPERTY BUS_COMPONENTS)
    get_property(deps GLOBAL PROPERTY BUS_COMPONENT_DEPS)
    set(objs "")
    set(tobjs "")
    foreach (c IN LISTS comps)
        list(APPEND objs $<TARGET_OBJECTS:${c}>)
        list(APPEND tobjs $<TARGET_OBJECTS:${c}_testing>)
    endforeach ()

    add_library(bus SHARED ${objs})
    add_library(bus::bus ALIAS bus)
    bus_add_warnings(bus)
    set_target_properties(bus PROPERTIES OUTPUT_NAME bus
        VERSION ${PROJECT_VERSION} SOVERSION ${PROJECT_VERSION_MAJOR}
        C_VISIBILITY_PRESET hidden)
    target_include_directories(bus PUBLIC
        $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/libbus/include>
        $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
    target_link_libraries(bus PRIVATE ${deps} PUBLIC Threads::Threads)

    add_library(bus_testing STATIC ${tobjs})
    bus_add_warnings(bus_testing)
    target_include_directories(bus_testing PUBLIC
        ${PROJECT_SOURCE_DIR}/libbus/include
        ${PROJECT_SOURCE_DIR}/libbus/src)
    target_compile_definitions(bus_testing PUBLIC BUS_TESTING)
    target_link_libraries(bus_testing PUBLIC ${deps} Threads::Threads m)
endfunction()

# bus_add_test(<name> SOURCES ... [LABELS ...] [TIMEOUT s] [LIBS ...]
#              [DEFINES ...] [ARGS ...])
# A cmocka test linked against bus_testing. Every test has a TIMEOUT.
function(bus_add_test name)
    cmake_parse_arguments(T "" "TIMEOUT" "SOURCES;LABELS;LIBS;DEFINES;ARGS"
        ${ARGN})
    if (NOT T_TIMEOUT)
        set(T_TIMEOUT 60)
    endif ()
    add_executable(${name} ${T_SOURCES})
    bus_add_warnings(${name})
    target_include_directories(${name} PRIVATE
        ${PROJECT_SOURCE_DIR}/tests/support)
    target_compile_definitions(${name} PRIVATE ${T_DEFINES}
        BUS_TEST_PYTHON="/usr/bin/python3"
        BUS_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
    target_link_libraries(${name} PRIVATE bus_test_support bus_testing
        PkgConfig::CMOCKA ${T_LIBS})
    add_test(NAME ${name} COMMAND ${name} ${T_ARGS})
    set_tests_properties(${name} PROPERTIES TIMEOUT ${T_TIMEOUT}
        LABELS "${T_LABELS}"
        ENVIRONMENT "CMOCKA_MESSAGE_OUTPUT=STDOUT")
endfunction()

# bus_add_bench(<name> SOURCES ... [LIBS ...]): a benchmark program.
function(bus_add_bench name)
    cmake_parse_arguments(B "" "" "SOURCES;LIBS" ${ARGN})
    add_executable(${name} ${B_SOURCES})
    bus_add_warnings(${name})
    target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/bench)
    # Benchmarks measure the product: the shared library users link.
    target_link_libraries(${name} PRIVATE bus_bench_support bus ${B_LIBS})
    set_property(GLOBAL APPEND PROPERTY BUS_BENCHES ${name})
endfunction()
