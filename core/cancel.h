// Cooperative cancellation of long computations (codebook builds). The owner of a computation
// holds a CancelToken and may Cancel() it from any thread; the computation polls cancelled() at
// points where stopping leaves nothing half-done (between Lloyd iterations, between build phases)
// and returns absl::CancelledError. Polling costs one relaxed-acquire load.
// Ownership: whoever starts the computation keeps the token alive until it returns.
// Thread safety: Cancel and cancelled may be called concurrently from any thread.
#ifndef FIBQUANT_CORE_CANCEL_H_
#define FIBQUANT_CORE_CANCEL_H_

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace fibquant {

class CancelToken {
 public:
  void Cancel() { cancelled_.store(true, std::memory_order_release); }
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }

 private:
  std::atomic<bool> cancelled_{false};
};

// OK, or Cancelled naming `where` when `token` (may be null) was cancelled.
inline absl::Status CheckCancelled(const CancelToken* token, const std::string& where) {
  if (token != nullptr && token->cancelled()) {
    return absl::CancelledError(absl::StrCat(where, ": cancelled"));
  }
  return absl::OkStatus();
}

}  // namespace fibquant

#endif  // FIBQUANT_CORE_CANCEL_H_
