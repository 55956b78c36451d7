// Cancels calls that make no progress for longer than an idle timeout: a stream that sends nothing
// after its header (or nothing at all), or whose client stops reading the answers, would otherwise
// hold a --max-concurrent-streams slot and the memory of its pages for as long as its connection
// lives. Each watched call touches its entry whenever it makes progress (a message read, a write
// completed, a page finished on the pool); the reaper thread TryCancel()s entries that have not
// been touched for the timeout, which ends the call with CANCELLED on the server side and releases
// everything it holds through the normal cancellation path.
//
// Ownership: one IdleReaper per service. A watched call registers after it starts and unregisters
// in its OnDone (before its ServerContext goes away); the reaper calls TryCancel only while holding
// the call's own (recursive) lock and after checking it was not unregistered, so it never touches
// a context after Unregister returned, and never holds the reaper's lock across TryCancel.
// Thread safety: every method may be called from any thread.
#ifndef FIBQUANT_SERVER_IDLE_REAPER_H_
#define FIBQUANT_SERVER_IDLE_REAPER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/server_context.h"

namespace fibquant::server {

class IdleReaper {
 public:
  // `timeout` <= 0 disables reaping (Register still works, nothing is ever cancelled).
  // `on_reap` (optional) runs once per reaped call, on the reaper thread.
  explicit IdleReaper(absl::Duration timeout, std::function<void()> on_reap = nullptr);
  ~IdleReaper();  // stops and joins the thread
  IdleReaper(const IdleReaper&) = delete;
  IdleReaper& operator=(const IdleReaper&) = delete;

  uint64_t Register(grpc::ServerContextBase* ctx);
  void Touch(uint64_t id);
  void Unregister(uint64_t id);

  uint64_t reaped() const { return reaped_.load(); }
  size_t watched() const;
  absl::Duration timeout() const { return timeout_; }

 private:
  // The context of a watched call, guarded by a recursive mutex: the reaper holds it across
  // TryCancel (so Unregister on another thread waits and the context stays alive), and a callback
  // gRPC might run inline inside TryCancel may re-enter Unregister on the same thread.
  struct Watch {
    std::recursive_mutex m;
    grpc::ServerContextBase* ctx;
    bool done = false;  // under m
  };
  struct Entry {
    std::shared_ptr<Watch> watch;
    absl::Time last;
    bool cancelled = false;
  };
  void Run();

  const absl::Duration timeout_;
  const std::function<void()> on_reap_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, Entry> entries_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::atomic<uint64_t> reaped_{0};
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_IDLE_REAPER_H_
