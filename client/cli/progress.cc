#include "client/cli/progress.h"

#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace fibquant::cli {

bool StderrIsTerminal() { return isatty(STDERR_FILENO) == 1; }

std::string HumanBytes(double bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  // Two literal formats: absl::StrFormat checks its format string at compile time.
  if (u == 0) return absl::StrFormat("%.0f %s", bytes, kUnits[u]);
  return absl::StrFormat("%.1f %s", bytes, kUnits[u]);
}

Progress::Progress(std::string label, uint64_t total_items, bool enabled, FILE* out)
    : label_(std::move(label)),
      total_(total_items),
      enabled_(enabled),
      out_(out),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_ - std::chrono::seconds(1)) {}

Progress::~Progress() { Finish(); }

std::string Progress::Render(const std::string& label, uint64_t items, uint64_t total, uint64_t bytes,
                             double seconds, int width) {
  const double frac = total == 0 ? 1.0 : std::min(1.0, static_cast<double>(items) / static_cast<double>(total));
  const int filled = static_cast<int>(frac * width);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(width - filled), '.');
  const double rate = seconds > 0 ? static_cast<double>(bytes) / seconds : 0.0;
  const double pages_rate = seconds > 0 ? static_cast<double>(items) / seconds : 0.0;
  return absl::StrFormat("%s [%s] %d/%d pages  %s/s  %.0f pages/s", label, bar, items, total,
                         HumanBytes(rate), pages_rate);
}

void Progress::Update(uint64_t items, uint64_t bytes) {
  if (!enabled_) return;
  absl::MutexLock lock(&mu_);
  items_ = items;
  bytes_ = bytes;
  const auto now = std::chrono::steady_clock::now();
  // Redraw at most 10 times a second: a terminal write per page would cost more than the page.
  if (now - last_draw_ < std::chrono::milliseconds(100) && items != total_) return;
  last_draw_ = now;
  const double s = std::chrono::duration<double>(now - start_).count();
  std::fprintf(out_, "\r%s\x1b[K", Render(label_, items_, total_, bytes_, s).c_str());
  std::fflush(out_);
}

void Progress::Finish() {
  if (!enabled_) return;
  absl::MutexLock lock(&mu_);
  if (finished_) return;
  finished_ = true;
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  std::fprintf(out_, "\r%s\x1b[K\n", Render(label_, items_, total_, bytes_, s).c_str());
  std::fflush(out_);
}

}  // namespace fibquant::cli
