#!/usr/bin/env bash
# Fails if the core-only program, or any core module's link interface, pulls in gRPC, protobuf or
# prometheus-cpp. Usage: core_link_check.sh <core_only_program> <build-dir>
set -euo pipefail
prog=$1
build=$2
bad='grpc|protobuf|prometheus'
if ldd "$prog" | grep -Ei "$bad"; then
  echo "FAIL: $prog links a network-stack library" >&2
  exit 1
fi
# The link command CMake generated for the program must not name them either (static libraries
# would not show up in ldd).
if grep -rEl "$bad" "$build"/tests/CMakeFiles/core_only_program.dir/link.txt 2>/dev/null; then
  echo "FAIL: core_only_program link line names a network-stack library" >&2
  exit 1
fi
if command -v ninja >/dev/null && [ -f "$build/build.ninja" ]; then
  if ninja -C "$build" -t commands core_only_program 2>/dev/null | tail -n 1 | grep -Eo "lib[a-z_+]*($bad)[a-z_+]*" ; then
    echo "FAIL: core_only_program link command names a network-stack library" >&2
    exit 1
  fi
fi
if ! out=$("$prog"); then
  echo "FAIL: core_only_program could not use the core: $out" >&2
  exit 1
fi
echo "core_only_program links no gRPC, protobuf or prometheus-cpp and runs: $out"
