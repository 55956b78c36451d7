#include "core/parallel.h"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

namespace fibquant {

int DefaultThreadCount() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

void ParallelFor(size_t num_chunks, int threads, const std::function<void(size_t chunk)>& fn) {
  if (threads <= 0) threads = DefaultThreadCount();
  const size_t workers = std::min<size_t>(static_cast<size_t>(threads), num_chunks);
  if (workers <= 1) {
    for (size_t c = 0; c < num_chunks; ++c) fn(c);
    return;
  }
  std::atomic<size_t> next{0};
  auto run = [&] {
    for (size_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) fn(c);
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (size_t i = 0; i + 1 < workers; ++i) pool.emplace_back(run);
  run();
  for (auto& t : pool) t.join();
}

}  // namespace fibquant
