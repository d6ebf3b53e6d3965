# Install the static library, its public headers and a relocatable CMake package so
# consumers write only:
#   find_package(exl2 CONFIG REQUIRED)
#   target_link_libraries(app PRIVATE exl2::exl2)
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(EXL2_CONFIG_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/exl2")

install(TARGETS exl2 EXPORT exl2Targets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY "${PROJECT_SOURCE_DIR}/src/include/exl2" DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT exl2Targets NAMESPACE exl2:: DESTINATION ${EXL2_CONFIG_DIR})

# The package config re-finds what the exported target links (Threads; the CUDA
# runtime when the CUDA backend was built), so consumers need not know either.
set(EXL2_PACKAGE_WITH_CUDA ${EXL2_WITH_CUDA})
configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/exl2Config.cmake.in"
  "${PROJECT_BINARY_DIR}/exl2Config.cmake"
  INSTALL_DESTINATION ${EXL2_CONFIG_DIR})
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/exl2ConfigVersion.cmake"
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion)
install(FILES "${PROJECT_BINARY_DIR}/exl2Config.cmake" "${PROJECT_BINARY_DIR}/exl2ConfigVersion.cmake"
        DESTINATION ${EXL2_CONFIG_DIR})
