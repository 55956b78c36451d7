// A one-line progress bar with throughput for long CLI operations. It draws on stderr only when
// stderr is a terminal (isatty), so logs and pipes stay clean; Enabled() tells which.
//
// Ownership: the CLI engineer. Thread safety: Update/Finish may be called from any thread (the
// stream reader calls Update); a mutex serialises drawing.
#ifndef FIBQUANT_CLIENT_CLI_PROGRESS_H_
#define FIBQUANT_CLIENT_CLI_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include "absl/synchronization/mutex.h"

namespace fibquant::cli {

class Progress {
 public:
  // `enabled` false: every call is a no-op (use StderrIsTerminal() && !quiet).
  Progress(std::string label, uint64_t total_items, bool enabled, FILE* out = stderr);
  ~Progress();
  // `items` and `bytes` are cumulative (pages done, raw bytes processed).
  void Update(uint64_t items, uint64_t bytes);
  // Draws the final state and ends the line.
  void Finish();
  bool enabled() const { return enabled_; }

  // The line Update draws, for tests: "label [#####.....]  12/64 pages  3.2 MiB/s".
  static std::string Render(const std::string& label, uint64_t items, uint64_t total, uint64_t bytes,
                            double seconds, int width = 30);

 private:
  std::string label_;
  uint64_t total_;
  bool enabled_;
  FILE* out_;
  std::chrono::steady_clock::time_point start_;
  absl::Mutex mu_;
  std::chrono::steady_clock::time_point last_draw_ ABSL_GUARDED_BY(mu_);
  uint64_t items_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

bool StderrIsTerminal();

// "12.3 MiB" style byte counts.
std::string HumanBytes(double bytes);

}  // namespace fibquant::cli

#endif  // FIBQUANT_CLIENT_CLI_PROGRESS_H_
