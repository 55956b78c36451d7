// WorkerPool: a fixed set of threads draining a bounded FIFO queue of tasks. gRPC-free.
//
// The service runs two pools: one for codec calls (pages), one for codebook builds, so pages never
// queue behind a build; no codec call or build runs on a gRPC thread. Submit()
// refuses work when the queue holds `capacity` tasks (ResourceExhausted), which unary RPCs report
// to the client; streams bound their own work with a per-stream window and use SubmitReserved(),
// whose total is bounded by (streams x window), so a stream never fails because another one is busy.
// Every task runs exactly once: with OK normally, or with Cancelled if the pool shut down before a
// thread picked it up (so the owner of the task can release what it holds).
//
// Ownership: the service owns the pool; destroy it before anything its tasks reference.
// Thread safety: all methods are thread-safe. Tasks must not call Shutdown() or the destructor.
#ifndef FIBQUANT_SERVER_WORKER_POOL_H_
#define FIBQUANT_SERVER_WORKER_POOL_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace fibquant::server {

class WorkerPool {
 public:
  // The task's argument is OK when it runs normally, Cancelled when the pool is shutting down.
  using Task = absl::AnyInvocable<void(absl::Status) &&>;
  // Called with the queue depth after every change, e.g. for a gauge. It runs under the pool's
  // lock, so the last value reported is always the current depth (reported outside the lock, a
  // late "1" could overwrite the "0" of the pop that followed it); it must be cheap and must not
  // call back into the pool.
  using DepthObserver = std::function<void(int64_t)>;

  // `threads` >= 1, `capacity` >= 1 (the caller validates). `queue_name` and `limit_name` only word
  // the ResourceExhausted of a full queue ("server busy: <queue_name> holds N tasks (<limit_name>
  // C); retry later"), so each pool names the flag an operator would change.
  WorkerPool(int threads, size_t capacity, DepthObserver observer = nullptr,
             std::string queue_name = "worker queue", std::string limit_name = "worker_queue_capacity");
  // Shutdown(), then joins.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Queues `task` unless the queue is full (ResourceExhausted naming `limit_name`) or the
  // pool is shut down (Unavailable). On error the task is destroyed without running.
  absl::Status Submit(Task task);
  // Queues `task` regardless of capacity: the caller bounds its own outstanding tasks. After
  // shutdown the task runs at once on the calling thread with Cancelled.
  void SubmitReserved(Task task);

  // Stops accepting work, runs every queued task with Cancelled (on the calling thread), lets
  // running tasks finish and joins the threads. Idempotent.
  void Shutdown();

  size_t queue_depth() const;
  int threads() const { return thread_count_; }
  size_t capacity() const { return capacity_; }

 private:
  void WorkerLoop();
  void Observe(int64_t depth) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const size_t capacity_;
  const int thread_count_;
  DepthObserver observer_;
  const std::string queue_name_;
  const std::string limit_name_;
  mutable absl::Mutex mu_;
  std::deque<Task> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::Mutex shutdown_mu_;
  std::vector<std::thread> threads_;  // written by the constructor and Shutdown only
};

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_WORKER_POOL_H_
