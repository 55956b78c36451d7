// Server-wide budget for the bytes that requests make the server hold: decoded pages of
// DecompressPages (a 17 KB frame may decode to 64 MiB), raw pages and frames of CompressPages, and
// large unary answers (GetCodebook with a rotation matrix). Every holder reserves its bytes
// BEFORE allocating them and releases them when the bytes are gone (written to the transport or
// dropped). A reservation that does not fit is refused, never queued here: the caller decides
// whether to wait for its own earlier reservations to drain (a stream with pages in flight) or to
// fail with RESOURCE_EXHAUSTED naming the flag.
//
// Ownership: one MemoryBudget per service, created with it; Leases are owned by whatever holds
// the bytes and must not outlive the budget (the service waits for every stream and call to end).
// Thread safety: all methods may be called concurrently; Lease is movable, not shareable.
#ifndef FIBQUANT_SERVER_MEMORY_BUDGET_H_
#define FIBQUANT_SERVER_MEMORY_BUDGET_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fibquant::server {

class MemoryBudget;

// Bytes held against a MemoryBudget; returned on destruction or Release().
class Lease {
 public:
  Lease() = default;
  Lease(MemoryBudget* budget, uint64_t bytes) : budget_(budget), bytes_(bytes) {}
  Lease(Lease&& o) noexcept : budget_(std::exchange(o.budget_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  Lease& operator=(Lease&& o) noexcept {
    if (this != &o) {
      Release();
      budget_ = std::exchange(o.budget_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease() { Release(); }
  void Release();
  uint64_t bytes() const { return bytes_; }

 private:
  MemoryBudget* budget_ = nullptr;
  uint64_t bytes_ = 0;
};

class MemoryBudget {
 public:
  // `limit` bytes in total; `flag` names the setting in error messages ("--max-buffered-bytes").
  MemoryBudget(uint64_t limit, std::string flag) : limit_(limit), flag_(std::move(flag)) {}

  // A lease of `bytes` when they fit beside what is held now; ResourceExhausted naming the flag,
  // `what` and the figures otherwise. A request larger than the whole budget is refused even when
  // nothing else is held.
  [[nodiscard]] absl::StatusOr<Lease> TryAcquire(uint64_t bytes, const std::string& what);

  uint64_t held() const { return held_.load(std::memory_order_relaxed); }
  uint64_t peak() const { return peak_.load(std::memory_order_relaxed); }
  uint64_t limit() const { return limit_; }
  const std::string& flag() const { return flag_; }

  // What became of refused leases, counted by the callers, which know it: a request that waits
  // for bytes its own work holds (a stream page parked until one of the stream's pages is
  // written; counted once per page), or one failed with TryAcquire's ResourceExhausted.
  // Exported as fibquant_buffered_bytes_waits_total / _refusals_total (server/metrics.h).
  void CountWait() { waits_.fetch_add(1, std::memory_order_relaxed); }
  void CountRefusal() { refusals_.fetch_add(1, std::memory_order_relaxed); }
  uint64_t waits() const { return waits_.load(std::memory_order_relaxed); }
  uint64_t refusals() const { return refusals_.load(std::memory_order_relaxed); }

 private:
  friend class Lease;
  void Return(uint64_t bytes) { held_.fetch_sub(bytes, std::memory_order_acq_rel); }

  const uint64_t limit_;
  const std::string flag_;
  std::atomic<uint64_t> held_{0};
  std::atomic<uint64_t> peak_{0};
  std::atomic<uint64_t> waits_{0};
  std::atomic<uint64_t> refusals_{0};
};

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_MEMORY_BUDGET_H_
