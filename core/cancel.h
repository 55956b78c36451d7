// Cooperative cancellation of long computations (codebook builds). The owner of a computation
// holds a CancelToken and may Cancel() it from any thread; the computation polls cancelled() at
// points where stopping leaves nothing half-done (between Lloyd iterations, between build phases)
// and returns absl::CancelledError. Polling costs one relaxed-acquire load.
// Ownership: whoever starts the computation keeps the token alive until it returns.
// Thread safety: Cancel and cancelled may be called concurrently from any thread.
#ifndef FIBQUANT_CORE_CANCEL_H_
#define FIBQUANT_CORE_CANCEL_H_

#include <atomic>
#include <functional>
#include <utility>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace fibquant {

class CancelToken {
 public:
  CancelToken() = default;
  // Also cancelled whenever `parent` (may be null; must outlive this token) is, or `poll` (may be
  // empty; must be safe to call from the computation's thread) returns true, e.g. "every caller
  // waiting for this build has gone away".
  CancelToken(const CancelToken* parent, std::function<bool()> poll)
      : parent_(parent), poll_(std::move(poll)) {}
  CancelToken(const CancelToken&) = delete;
  CancelToken& operator=(const CancelToken&) = delete;

  void Cancel() { cancelled_.store(true, std::memory_order_release); }
  bool cancelled() const {
    return cancelled_.load(std::memory_order_acquire) || (parent_ != nullptr && parent_->cancelled()) ||
           (poll_ && poll_());
  }

 private:
  std::atomic<bool> cancelled_{false};
  const CancelToken* const parent_ = nullptr;
  const std::function<bool()> poll_;
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
