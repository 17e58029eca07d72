# The installed package, consumed the two ways README.md shows (ctest: package_install_consume,
# label package). Run as `cmake -D... -P package_test.cmake`; every step that fails stops the
# test with FATAL_ERROR (a nonzero exit):
#   1. cmake --install BUILD_DIR --prefix WORK_DIR/prefix; the expected files are there, and the
#      installed CMake files and nsa.pc name neither the source nor the build tree;
#   2. examples/ configured on its own against that prefix with find_package(nsa CONFIG REQUIRED)
#      (same generator and compilers as the outer build), built, and both examples run:
#      example_c links nsa::nsa (libnsa.so), example_cpp nsa::nsa_static (libnsa.a);
#   3. example_c.c compiled and linked by the C compiler with `pkg-config --cflags --libs nsa`
#      (PKG_CONFIG_PATH into the prefix), run with LD_LIBRARY_PATH=prefix/libdir;
#   4. the same against libnsa.a with `pkg-config --static --libs` (-lnsa made -l:libnsa.a), run
#      without LD_LIBRARY_PATH: checks that Libs.private is complete;
#   5. prefix/bin/nsa info, when the tools are built.
# Sanitized builds (NSA_SANITIZE=ON) need no special case here: the installed targets and nsa.pc
# of such a build carry -fsanitize=address,undefined for the link (cmake/install.cmake), as any
# consumer of that libnsa needs, so this test checks that too; the consumers' own code is not
# instrumented.
# Inputs: BUILD_DIR SOURCE_DIR WORK_DIR CONFIG GENERATOR MAKE_PROGRAM C_COMPILER CXX_COMPILER
#         LIBDIR PKG_CONFIG TOOLS VERSION
cmake_minimum_required(VERSION 3.25)

foreach(var BUILD_DIR SOURCE_DIR WORK_DIR GENERATOR C_COMPILER CXX_COMPILER LIBDIR VERSION)
  if("${${var}}" STREQUAL "")
    message(FATAL_ERROR "package_test: -D${var}=... is required")
  endif()
endforeach()
if(NOT PKG_CONFIG)
  message(FATAL_ERROR "package_test: pkg-config not found (scripts/setup.sh installs it)")
endif()

# run(<output var> <command...>): runs the command, echoes its output, fails on a nonzero exit.
function(run out)
  string(REPLACE ";" " " shown "${ARGN}")
  message(STATUS "package_test: ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE output
                  ERROR_VARIABLE output)
  message("${output}")
  if(NOT rc STREQUAL "0")
    message(FATAL_ERROR "package_test: failed (${rc}): ${shown}")
  endif()
  set(${out} "${output}" PARENT_SCOPE)
endfunction()

function(expect_output output pattern what)
  if(NOT output MATCHES "(^|\n)${pattern}")
    message(FATAL_ERROR "package_test: ${what} printed no line matching '${pattern}'")
  endif()
endfunction()

set(config_args)
if(CONFIG)
  set(config_args --config ${CONFIG})
endif()
string(REPLACE "." "\\." version_re "${VERSION}")
set(prefix ${WORK_DIR}/prefix)
set(consumer ${WORK_DIR}/consumer)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

# 1. Install, and check what arrived.
run(out ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix} ${config_args})
set(cmakedir ${prefix}/${LIBDIR}/cmake/nsa)
set(expected include/nsa/nsa.h include/nsa/nsa.hpp ${LIBDIR}/libnsa.so ${LIBDIR}/libnsa.a
    ${LIBDIR}/cmake/nsa/nsaConfig.cmake ${LIBDIR}/cmake/nsa/nsaConfigVersion.cmake
    ${LIBDIR}/cmake/nsa/nsaTargets.cmake ${LIBDIR}/cmake/nsa/nsaStaticTargets.cmake
    ${LIBDIR}/pkgconfig/nsa.pc)
if(TOOLS)
  list(APPEND expected bin/nsa)
endif()
foreach(file ${expected})
  if(NOT EXISTS ${prefix}/${file})
    message(FATAL_ERROR "package_test: not installed: ${prefix}/${file}")
  endif()
endforeach()
file(GLOB installed_meta ${cmakedir}/*.cmake ${prefix}/${LIBDIR}/pkgconfig/nsa.pc)
foreach(file ${installed_meta})
  file(READ ${file} text)
  foreach(tree ${SOURCE_DIR} ${BUILD_DIR})
    string(FIND "${text}" "${tree}" at)
    if(NOT at EQUAL -1)
      message(FATAL_ERROR "package_test: ${file} names the tree it was built in (${tree})")
    endif()
  endforeach()
endforeach()

# 2. examples/ as a separate CMake project against the installed copy.
set(make_program_arg)
if(MAKE_PROGRAM)
  set(make_program_arg -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM})
endif()
run(out ${CMAKE_COMMAND} -S ${SOURCE_DIR}/examples -B ${consumer} -G ${GENERATOR}
    ${make_program_arg} -DCMAKE_C_COMPILER=${C_COMPILER} -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
    -DCMAKE_BUILD_TYPE=${CONFIG} -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
# It must have found this prefix's package, not another nsa on the machine.
file(STRINGS ${consumer}/CMakeCache.txt nsa_dir REGEX "^nsa_DIR:")
string(REGEX REPLACE "^nsa_DIR:[A-Z]+=" "" nsa_dir "${nsa_dir}")
file(REAL_PATH "${nsa_dir}" nsa_dir)
file(REAL_PATH "${cmakedir}" cmakedir_real)
if(NOT nsa_dir STREQUAL cmakedir_real)
  message(FATAL_ERROR "package_test: the consumer found nsa in '${nsa_dir}', not in ${cmakedir}")
endif()
run(out ${CMAKE_COMMAND} --build ${consumer} ${config_args})
foreach(example example_c example_cpp)
  file(GLOB_RECURSE exe LIST_DIRECTORIES false ${consumer}/${example} ${consumer}/*/${example})
  list(LENGTH exe n)
  if(NOT n EQUAL 1)
    message(FATAL_ERROR "package_test: expected one ${example} under ${consumer}, found '${exe}'")
  endif()
  run(out ${exe})
  expect_output("${out}" "nsa ${version_re} " "${example} (find_package)")
endforeach()

# 3. A plain compiler command with pkg-config, against libnsa.so.
set(pc_env ${CMAKE_COMMAND} -E env PKG_CONFIG_PATH=${prefix}/${LIBDIR}/pkgconfig)
run(pc_version ${pc_env} ${PKG_CONFIG} --modversion nsa)
string(STRIP "${pc_version}" pc_version)
if(NOT pc_version STREQUAL VERSION)
  message(FATAL_ERROR "package_test: nsa.pc says version '${pc_version}', the project ${VERSION}")
endif()
run(pc_cflags ${pc_env} ${PKG_CONFIG} --cflags nsa)
run(pc_libs ${pc_env} ${PKG_CONFIG} --libs nsa)
run(pc_static_libs ${pc_env} ${PKG_CONFIG} --static --libs nsa)
separate_arguments(pc_cflags UNIX_COMMAND "${pc_cflags}")
separate_arguments(pc_libs UNIX_COMMAND "${pc_libs}")
separate_arguments(pc_static_libs UNIX_COMMAND "${pc_static_libs}")
if(NOT "-lnsa" IN_LIST pc_static_libs)
  message(FATAL_ERROR "package_test: no -lnsa in `pkg-config --static --libs nsa`")
endif()
set(example_c ${SOURCE_DIR}/examples/example_c.c)
run(out ${C_COMPILER} -std=c11 ${example_c} ${pc_cflags} ${pc_libs} -o ${WORK_DIR}/example_c_pc)
run(out ${CMAKE_COMMAND} -E env LD_LIBRARY_PATH=${prefix}/${LIBDIR} ${WORK_DIR}/example_c_pc)
expect_output("${out}" "nsa ${version_re} " "example_c (pkg-config, libnsa.so)")

# 4. The same against libnsa.a: Libs.private must name everything the static library needs.
list(TRANSFORM pc_static_libs REPLACE "^-lnsa$" "-l:libnsa.a")
run(out ${C_COMPILER} -std=c11 ${example_c} ${pc_cflags} ${pc_static_libs}
    -o ${WORK_DIR}/example_c_pc_static)
run(out ${WORK_DIR}/example_c_pc_static)
expect_output("${out}" "nsa ${version_re} " "example_c (pkg-config --static, libnsa.a)")

# 5. The installed command-line tool.
if(TOOLS)
  run(out ${prefix}/bin/nsa info)
endif()
message(STATUS "package_test: all consumers built and ran")
