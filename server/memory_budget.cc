#include "server/memory_budget.h"

#include "absl/strings/str_cat.h"

namespace fibquant::server {

void Lease::Release() {
  if (budget_ != nullptr && bytes_ != 0) budget_->Return(bytes_);
  budget_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<Lease> MemoryBudget::TryAcquire(uint64_t bytes, const std::string& what) {
  uint64_t cur = held_.load(std::memory_order_relaxed);
  for (;;) {
    if (bytes > limit_ || cur > limit_ - bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          what, " needs ", bytes, " bytes of server memory; ", cur, " of the ", limit_,
          " allowed by ", flag_, " are held by requests in progress (retry later, or raise ",
          flag_, ")"));
    }
    if (held_.compare_exchange_weak(cur, cur + bytes, std::memory_order_acq_rel,
                                    std::memory_order_relaxed)) {
      break;
    }
  }
  uint64_t peak = peak_.load(std::memory_order_relaxed);
  while (cur + bytes > peak &&
         !peak_.compare_exchange_weak(peak, cur + bytes, std::memory_order_relaxed)) {
  }
  return Lease(this, bytes);
}

}  // namespace fibquant::server
