# Installs the `bus` library, its public headers, a pkg-config file and a
# CMake package: find_package(libbus) gives the target bus::bus.
include(CMakePackageConfigHelpers)

install(TARGETS bus EXPORT libbusTargets
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
    RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
    INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/libbus/include/bus
    DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT libbusTargets NAMESPACE bus::
    DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/libbus)

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/libbusConfig.cmake.in
    ${PROJECT_BINARY_DIR}/libbusConfig.cmake
    INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/libbus)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/libbusConfigVersion.cmake
    VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/libbusConfig.cmake
    ${PROJECT_BINARY_DIR}/libbusConfigVersion.cmake
    DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/libbus)

# pkg-config: private requirements are the backends compiled in.
set(BUS_PC_REQUIRES_PRIVATE "")
if (BUS_WITH_ZMQ)
    string(APPEND BUS_PC_REQUIRES_PRIVATE " libzmq")
endif ()
if (BUS_WITH_KAFKA)
    string(APPEND BUS_PC_REQUIRES_PRIVATE " rdkafka")
endif ()
if (BUS_WITH_ROCKSDB)
    string(APPEND BUS_PC_REQUIRES_PRIVATE " rocksdb")
endif ()
# ${pcfiledir} is <prefix>/<libdir>/pkgconfig: climb back to <prefix>.
file(RELATIVE_PATH BUS_PC_RELATIVE_PREFIX
    "/prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/prefix")
configure_file(${PROJECT_SOURCE_DIR}/cmake/libbus.pc.in
    ${PROJECT_BINARY_DIR}/libbus.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/libbus.pc
    DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
