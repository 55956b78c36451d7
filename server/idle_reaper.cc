#include "server/idle_reaper.h"

#include <algorithm>

namespace fibquant::server {

IdleReaper::IdleReaper(absl::Duration timeout, std::function<void()> on_reap)
    : timeout_(timeout), on_reap_(std::move(on_reap)) {
  if (timeout_ > absl::ZeroDuration()) thread_ = std::thread([this] { Run(); });
}

IdleReaper::~IdleReaper() {
  stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

uint64_t IdleReaper::Register(grpc::ServerContextBase* ctx) {
  absl::MutexLock lock(&mu_);
  const uint64_t id = next_id_++;
  entries_.emplace(id, Entry{ctx, absl::Now()});
  return id;
}

void IdleReaper::Touch(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it != entries_.end()) it->second.last = absl::Now();
}

void IdleReaper::Unregister(uint64_t id) {
  absl::MutexLock lock(&mu_);
  entries_.erase(id);
}

size_t IdleReaper::watched() const {
  absl::MutexLock lock(&mu_);
  return entries_.size();
}

void IdleReaper::Run() {
  // Checked four times per timeout (at most once a second), so a call is reaped between 1 and
  // 1.25 timeouts after its last progress.
  const absl::Duration period = std::min(absl::Seconds(1), timeout_ / 4);
  while (!stop_.WaitForNotificationWithTimeout(period)) {
    const absl::Time now = absl::Now();
    absl::MutexLock lock(&mu_);
    for (auto& [id, e] : entries_) {
      if (e.cancelled || now - e.last < timeout_) continue;
      e.cancelled = true;
      e.ctx->TryCancel();
      reaped_.fetch_add(1);
      if (on_reap_) on_reap_();
    }
  }
}

}  // namespace fibquant::server
