// Self-check of tests/sanitizers/tsan_absl_shim.cc, run by scripts/ci-sanitizers before the TSan
// tests: with the shim preloaded, a counter guarded by absl::Mutex (Lock/Unlock and Await) must give
// no report, and the same counter incremented outside the lock ("race") must still be reported.
// So the shim removes the false reports of uninstrumented Abseil without hiding real races.
#include <cstring>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

absl::Mutex mu;
long counter = 0;
bool ready = false;

int main(int argc, char** argv) {
  const bool race = argc > 1 && std::strcmp(argv[1], "race") == 0;
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t) {
    ts.emplace_back([race] {
      for (int i = 0; i < 1000; ++i) {
        if (race) {
          { absl::MutexLock l(&mu); }
          ++counter;
        } else {
          absl::MutexLock l(&mu);
          ++counter;
        }
      }
    });
  }
  std::thread waiter([] {
    absl::MutexLock l(&mu);
    mu.Await(absl::Condition(&ready));
    ++counter;
  });
  {
    absl::MutexLock l(&mu);
    ready = true;
  }
  for (auto& t : ts) t.join();
  waiter.join();
  return 0;
}
