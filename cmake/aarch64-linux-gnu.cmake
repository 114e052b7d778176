# Cross-compile the medkd runtime for Jetson (aarch64 Linux) with Debian's
# gcc-aarch64-linux-gnu; ctest runs the results under qemu-user (Debian qemu-user).
#
#   cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
#         -DMEDKD_EMBEDDED_BLOB_DIR=runs/<run>/firmware
#   cmake --build build-aarch64 -j2 && ctest --test-dir build-aarch64
#
# Another cross toolchain (e.g. NVIDIA's JetPack one): pass -DMEDKD_AARCH64_PREFIX=
# (compiler name prefix) and -DMEDKD_AARCH64_SYSROOT= (its target libc folder).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT MEDKD_AARCH64_PREFIX)
  set(MEDKD_AARCH64_PREFIX aarch64-linux-gnu-)
endif()
if(NOT MEDKD_AARCH64_SYSROOT)
  set(MEDKD_AARCH64_SYSROOT /usr/aarch64-linux-gnu)  # libc6-dev-arm64-cross
endif()
# try_compile projects re-read this file: hand them the two settings.
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES MEDKD_AARCH64_PREFIX MEDKD_AARCH64_SYSROOT)

set(CMAKE_C_COMPILER ${MEDKD_AARCH64_PREFIX}gcc)
# .S files (the embedded blob) go through the same driver: cpp, then the cross as.
set(CMAKE_ASM_COMPILER ${MEDKD_AARCH64_PREFIX}gcc)

# Libraries and headers from the target's folder only; programs (cmake, qemu) from the host.
set(CMAKE_FIND_ROOT_PATH ${MEDKD_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Dynamic linking, like the binaries that ship on a Jetson (JetPack's glibc, and
# TensorRT only comes as shared libraries), so -L points qemu at the cross glibc's
# loader and libc rather than linking the checks with -static.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L ${MEDKD_AARCH64_SYSROOT})
