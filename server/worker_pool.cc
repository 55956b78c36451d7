#include "server/worker_pool.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace fibquant::server {

WorkerPool::WorkerPool(int threads, size_t capacity, DepthObserver observer, std::string queue_name,
                       std::string limit_name)
    : capacity_(capacity),
      thread_count_(threads),
      observer_(std::move(observer)),
      queue_name_(std::move(queue_name)),
      limit_name_(std::move(limit_name)) {
  threads_.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { WorkerLoop(); });
}

WorkerPool::~WorkerPool() { Shutdown(); }

void WorkerPool::Observe(int64_t depth) {
  if (observer_) observer_(depth);
}

absl::Status WorkerPool::Submit(Task task) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("worker pool is shutting down");
  if (queue_.size() >= capacity_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "server busy: ", queue_name_, " holds ", queue_.size(), " tasks (", limit_name_, " ",
        capacity_, "); retry later"));
  }
  queue_.push_back(std::move(task));
  Observe(static_cast<int64_t>(queue_.size()));
  return absl::OkStatus();
}

void WorkerPool::SubmitReserved(Task task) {
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_) {
      queue_.push_back(std::move(task));
      Observe(static_cast<int64_t>(queue_.size()));
      return;
    }
  }
  std::move(task)(absl::CancelledError("worker pool is shutting down"));
}

void WorkerPool::WorkerLoop() {
  for (;;) {
    Task task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](WorkerPool* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) {
            return p->stopping_ || !p->queue_.empty();
          },
          this));
      if (queue_.empty()) return;  // stopping and drained
      if (stopping_) return;       // Shutdown() cancels what is left
      task = std::move(queue_.front());
      queue_.pop_front();
      Observe(static_cast<int64_t>(queue_.size()));
    }
    std::move(task)(absl::OkStatus());
  }
}

void WorkerPool::Shutdown() {
  absl::MutexLock shutdown_lock(&shutdown_mu_);  // serialises concurrent Shutdown() calls
  std::deque<Task> left;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
  {
    absl::MutexLock lock(&mu_);
    left.swap(queue_);
    Observe(0);
  }
  for (auto& task : left) std::move(task)(absl::CancelledError("worker pool is shutting down"));
}

size_t WorkerPool::queue_depth() const {
  absl::MutexLock lock(&mu_);
  return queue_.size();
}

}  // namespace fibquant::server
