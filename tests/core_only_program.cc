// Built against fibquant::core alone (see core_link_check.sh): touches every core module so the
// linker must resolve them without any network-stack library.
#include <cstdio>

#include "core/digest.h"
#include "core/rng.h"

int main() {
  fibquant::Rng rng(7);
  std::printf("%s %llu\n", fibquant::Sha256Digest("fibquant").c_str(),
              static_cast<unsigned long long>(rng.NextU64()));
  return 0;
}
