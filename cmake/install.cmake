# Install rules (included from the top-level CMakeLists.txt). After `cmake --install build --prefix P`:
#   P/include/nsa/{nsa.h,nsa_cuda.h,nsa.hpp}, P/<libdir>/libnsa.so (soname libnsa.so.MAJOR.MINOR), libnsa.a,
#   P/<libdir>/cmake/nsa/  nsaConfig.cmake, nsaConfigVersion.cmake, nsaTargets.cmake (nsa::nsa),
#                          nsaStaticTargets.cmake (nsa::nsa_static),
#   P/<libdir>/pkgconfig/nsa.pc, and P/bin/nsa when the tools are built (tools/CMakeLists.txt).
include(CMakePackageConfigHelpers)

set(NSA_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/nsa)

install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/nsa DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
        FILES_MATCHING PATTERN "*.h" PATTERN "*.hpp")

# A sanitized libnsa (NSA_SANITIZE) cannot be linked without the sanitizer runtimes: the installed
# targets (and nsa.pc) say so, so that a consumer of such an install links and runs as is.
if(NSA_SANITIZE)
  set(nsa_sanitize_link -fsanitize=address,undefined)
  foreach(lib nsa_shared nsa_static)
    target_link_options(${lib} INTERFACE "$<INSTALL_INTERFACE:-fsanitize=address$<COMMA>undefined>")
  endforeach()
endif()

# Two export sets: nsa::nsa (shared) needs nothing else at all; nsa::nsa_static needs OpenMP,
# Highway and BLAS found again, which nsaConfig.cmake does only when that target is wanted.
install(TARGETS nsa_shared EXPORT nsaTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(TARGETS nsa_static EXPORT nsaStaticTargets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(EXPORT nsaTargets NAMESPACE nsa:: DESTINATION ${NSA_INSTALL_CMAKEDIR})
install(EXPORT nsaStaticTargets NAMESPACE nsa:: DESTINATION ${NSA_INSTALL_CMAKEDIR})

# The BLAS vendor the library was built against, for nsaConfig.cmake's find_dependency(BLAS).
set(NSA_BLA_VENDOR "${BLA_VENDOR}")
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/nsaConfig.cmake.in
                              ${CMAKE_CURRENT_BINARY_DIR}/nsaConfig.cmake
                              INSTALL_DESTINATION ${NSA_INSTALL_CMAKEDIR})
# 0.x: a new minor version may break the API, so only the same MAJOR.MINOR is compatible.
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/nsaConfigVersion.cmake
                                 VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/nsaConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/nsaConfigVersion.cmake
        DESTINATION ${NSA_INSTALL_CMAKEDIR})

# nsa.pc for plain makefiles: `cc app.c $(pkg-config --cflags --libs nsa)`. Relocatable: prefix
# is found from the .pc file's own place (${pcfiledir}), so `cmake --install --prefix P` works
# whatever CMAKE_INSTALL_PREFIX was at configure time. Libs.private is what linking libnsa.a
# needs (`pkg-config --static`): the OpenMP runtime, Highway, the BLAS found, and the C++ runtime
# (for a C compiler driving the link).
function(nsa_pc_link_flags out)
  set(flags)
  set(implicit_dirs ${CMAKE_C_IMPLICIT_LINK_DIRECTORIES} ${CMAKE_CXX_IMPLICIT_LINK_DIRECTORIES})
  foreach(lib IN LISTS ARGN)
    if(lib MATCHES "^-")
      list(APPEND flags ${lib})
    elseif(IS_ABSOLUTE "${lib}")
      get_filename_component(dir "${lib}" DIRECTORY)
      get_filename_component(name "${lib}" NAME)
      if(NOT name MATCHES "^lib(.+)\\.(so|a)(\\.[0-9.]+)?$")
        list(APPEND flags "${lib}")  # not a lib<name> file: passed by path
        continue()
      endif()
      if(NOT dir IN_LIST implicit_dirs)
        list(APPEND flags "-L${dir}")
      endif()
      list(APPEND flags "-l${CMAKE_MATCH_1}")
    else()
      list(APPEND flags "-l${lib}")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES flags)
  list(JOIN flags " " flags)
  set(${out} "${flags}" PARENT_SCOPE)
endfunction()

get_target_property(nsa_hwy_location hwy::hwy LOCATION)
if(NOT nsa_hwy_location)
  set(nsa_hwy_location hwy)
endif()
set(nsa_cxx_runtime ${CMAKE_CXX_IMPLICIT_LINK_LIBRARIES})
list(REMOVE_ITEM nsa_cxx_runtime ${CMAKE_C_IMPLICIT_LINK_LIBRARIES})
# The CUDA backend's libraries by file: the static runtime (with what it needs itself) and cuBLAS.
set(nsa_cuda_pc_libs)
if(NSA_HAVE_CUDA)
  foreach(target CUDA::cudart_static CUDA::cublas)
    get_target_property(location ${target} IMPORTED_LOCATION)
    list(APPEND nsa_cuda_pc_libs ${location})
  endforeach()
  list(APPEND nsa_cuda_pc_libs -ldl -lrt -lpthread)
endif()
nsa_pc_link_flags(NSA_PC_LIBS_PRIVATE ${OpenMP_CXX_LIBRARIES} ${nsa_hwy_location}
                  ${BLAS_LINKER_FLAGS} ${BLAS_LIBRARIES} ${nsa_cuda_pc_libs} ${nsa_cxx_runtime})
set(NSA_PC_LIBS_SANITIZE "${nsa_sanitize_link}")

set(nsa_pc_dir ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(NSA_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(NSA_PC_LIBDIR "${CMAKE_INSTALL_FULL_LIBDIR}")
  set(NSA_PC_INCLUDEDIR "${CMAKE_INSTALL_FULL_INCLUDEDIR}")
else()
  file(RELATIVE_PATH nsa_pc_up /nsa-prefix/${nsa_pc_dir} /nsa-prefix)
  string(REGEX REPLACE "/$" "" nsa_pc_up "${nsa_pc_up}")
  set(NSA_PC_PREFIX "\${pcfiledir}/${nsa_pc_up}")
  set(NSA_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
  set(NSA_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
configure_file(${CMAKE_CURRENT_LIST_DIR}/nsa.pc.in ${CMAKE_CURRENT_BINARY_DIR}/nsa.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/nsa.pc DESTINATION ${nsa_pc_dir})
