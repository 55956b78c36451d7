// WorkerPool: every task runs exactly once, capacity is enforced, shutdown cancels queued tasks.
#include "server/worker_pool.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"

namespace fibquant::server {
namespace {

TEST(WorkerPoolTest, RunsEveryTaskExactlyOnce) {
  std::atomic<int> ok{0}, cancelled{0};
  {
    WorkerPool pool(3, 1000);
    for (int i = 0; i < 500; ++i) {
      ASSERT_TRUE(pool.Submit([&](absl::Status s) {
                        if (s.ok()) {
                          ok.fetch_add(1);
                        } else {
                          EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
                          cancelled.fetch_add(1);
                        }
                      }).ok());
    }
  }  // the destructor lets running tasks finish and runs the queued ones with Cancelled
  EXPECT_EQ(ok.load() + cancelled.load(), 500);
}

TEST(WorkerPoolTest, DepthObserverEndsAtTheRealDepth) {
  std::atomic<int64_t> last{-1};
  std::atomic<int> done{0};
  {
    WorkerPool pool(2, 10000, [&last](int64_t d) { last.store(d); });
    std::vector<std::thread> producers;
    for (int p = 0; p < 4; ++p) {
      producers.emplace_back([&] {
        for (int i = 0; i < 500; ++i) {
          pool.SubmitReserved([&done](absl::Status) { done.fetch_add(1); });
        }
      });
    }
    for (auto& t : producers) t.join();
    while (done.load() < 2000) std::this_thread::yield();
    EXPECT_EQ(pool.queue_depth(), 0u);
    EXPECT_EQ(last.load(), 0);  // reported under the lock: no stale value can land last
  }
}

TEST(WorkerPoolTest, FifoOnOneThread) {
  std::vector<int> order;
  absl::Notification done;
  WorkerPool pool(1, 100);
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(pool.Submit([&order, i, &done](absl::Status) {
                      order.push_back(i);
                      if (i == 49) done.Notify();
                    }).ok());
  }
  done.WaitForNotification();
  ASSERT_EQ(order.size(), 50u);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(order[i], i);
}

TEST(WorkerPoolTest, FullQueueIsResourceExhausted) {
  absl::Notification block, started;
  WorkerPool pool(1, 2);
  ASSERT_TRUE(pool.Submit([&](absl::Status) {
                    started.Notify();
                    block.WaitForNotification();
                  }).ok());
  started.WaitForNotification();  // the worker holds task 1; the queue is empty
  ASSERT_TRUE(pool.Submit([](absl::Status) {}).ok());
  ASSERT_TRUE(pool.Submit([](absl::Status) {}).ok());
  absl::Status s = pool.Submit([](absl::Status) { ADD_FAILURE() << "must not run"; });
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("worker_queue_capacity"), std::string::npos);
  // Reserved submissions bypass the capacity (the caller bounds them).
  std::atomic<bool> reserved_ran{false};
  pool.SubmitReserved([&](absl::Status) { reserved_ran = true; });
  EXPECT_EQ(pool.queue_depth(), 3u);
  block.Notify();
  pool.Shutdown();
}

TEST(WorkerPoolTest, ShutdownCancelsQueuedTasks) {
  absl::Notification block, started;
  std::atomic<int> cancelled{0}, ok{0};
  WorkerPool pool(1, 100);
  ASSERT_TRUE(pool.Submit([&](absl::Status) {
                    started.Notify();
                    block.WaitForNotification();
                  }).ok());
  started.WaitForNotification();
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(pool.Submit([&](absl::Status s) {
                      if (s.code() == absl::StatusCode::kCancelled) {
                        cancelled++;
                      } else {
                        ok++;
                      }
                    }).ok());
  }
  std::thread releaser([&] { block.Notify(); });
  pool.Shutdown();
  releaser.join();
  EXPECT_EQ(cancelled.load() + ok.load(), 10);
  EXPECT_EQ(pool.Submit([](absl::Status) {}).code(), absl::StatusCode::kUnavailable);
  bool ran_cancelled = false;
  pool.SubmitReserved([&](absl::Status s) { ran_cancelled = s.code() == absl::StatusCode::kCancelled; });
  EXPECT_TRUE(ran_cancelled);
}

}  // namespace
}  // namespace fibquant::server
