# shellcheck shell=bash
# Sourced by scripts/ci-sanitizers and scripts/ci-fuzz (not run on its own).
#
# need_clang: installs clang-14 and its sanitizer/libFuzzer runtimes (Debian 12 packages) when missing.
# configure_asan_build DIR: configures the one clang-14 build with ASan + UBSan + libFuzzer
#   instrumentation (-fsanitize=fuzzer-no-link,address,undefined). That build serves both CI steps:
#   `ci-sanitizers asan` builds everything in it and runs every test, `ci-fuzz` links the fuzz targets
#   from the same objects, so CI compiles the project with sanitizers once instead of twice.

need_clang() {
  local missing=()
  for p in clang-14 libclang-rt-14-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

configure_asan_build() {
  local dir=$1
  need_clang
  if [[ ! -f $dir/build.ninja ]]; then
    CC=clang-14 CXX=clang++-14 cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DFQ_FUZZ=ON -DFQ_SANITIZE=fuzzer-no-link,address,undefined -DFQ_BUILD_BENCH=OFF
  fi
}
