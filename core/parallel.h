// Deterministic data-parallel helper for codebook training.
//
// Work is split into chunks whose boundaries depend only on the problem size (never on the thread
// count); callers reduce per-chunk partial results in chunk order, which makes the result
// bit-identical for any number of threads. Thread safety: ParallelFor may be called from any thread;
// `fn` runs concurrently on distinct chunks and must not race on shared state.
#ifndef FIBQUANT_CORE_PARALLEL_H_
#define FIBQUANT_CORE_PARALLEL_H_

#include <cstddef>
#include <functional>

namespace fibquant {

// Number of worker threads to use when the caller passes 0: std::thread::hardware_concurrency().
int DefaultThreadCount();

// Runs fn(chunk) for chunk in [0, num_chunks) on up to `threads` threads (0 = DefaultThreadCount()).
// Returns when all chunks are done.
void ParallelFor(size_t num_chunks, int threads, const std::function<void(size_t chunk)>& fn);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_PARALLEL_H_
