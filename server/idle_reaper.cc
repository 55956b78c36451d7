#include "server/idle_reaper.h"

#include <algorithm>
#include <vector>

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
  auto watch = std::make_shared<Watch>();
  watch->ctx = ctx;
  absl::MutexLock lock(&mu_);
  const uint64_t id = next_id_++;
  entries_.emplace(id, Entry{std::move(watch), absl::Now()});
  return id;
}

void IdleReaper::Touch(uint64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it != entries_.end()) it->second.last = absl::Now();
}

void IdleReaper::Unregister(uint64_t id) {
  std::shared_ptr<Watch> watch;
  {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(id);
    if (it == entries_.end()) return;
    watch = std::move(it->second.watch);
    entries_.erase(it);
  }
  std::lock_guard<std::recursive_mutex> hold(watch->m);  // waits for a TryCancel in progress
  watch->done = true;
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
    std::vector<std::shared_ptr<Watch>> stale;
    {
      absl::MutexLock lock(&mu_);
      for (auto& [id, e] : entries_) {
        if (e.cancelled || now - e.last < timeout_) continue;
        e.cancelled = true;
        stale.push_back(e.watch);
      }
    }
    for (const auto& w : stale) {
      std::lock_guard<std::recursive_mutex> hold(w->m);
      if (w->done) continue;
      w->ctx->TryCancel();
      reaped_.fetch_add(1);
      if (on_reap_) on_reap_();
    }
  }
}

}  // namespace fibquant::server
