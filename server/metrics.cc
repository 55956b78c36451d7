#include "server/metrics.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "prometheus/client_metric.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/metric_family.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace fibquant::server {
namespace {

using prometheus::Histogram;

// Latency buckets from 0.5 ms (a small unary call) to 30 min: a stream may run as long as its
// deadline (the CLI's default is 600 s), and a stream longer than the last bucket is only +Inf.
const Histogram::BucketBoundaries& DurationBuckets() {
  static const Histogram::BucketBoundaries* const kBuckets = new Histogram::BucketBoundaries{
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
      120, 300, 600, 1800};
  return *kBuckets;
}

// One page's encode/decode: tens of microseconds (small pages) to a few hundred milliseconds.
const Histogram::BucketBoundaries& PageBuckets() {
  static const Histogram::BucketBoundaries* const kBuckets = new Histogram::BucketBoundaries{
      1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1};
  return *kBuckets;
}

#ifndef FQ_VERSION
#define FQ_VERSION "unknown"
#endif
#ifndef FQ_GIT_COMMIT
#define FQ_GIT_COMMIT "unknown"
#endif

// Reads a whole small /proc file ("" when unreadable).
std::string ReadProc(const char* path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

prometheus::MetricFamily Family(const char* name, const char* help, prometheus::MetricType type,
                                double value) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = type;
  prometheus::ClientMetric m;
  if (type == prometheus::MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  f.metric.push_back(m);
  return f;
}

// The standard process_* metrics (as the Prometheus client libraries name them), from /proc/self,
// and fibquant_data_dir_bytes; computed when scraped.
class ProcessCollector final : public prometheus::Collectable {
 public:
  void SetDataDir(const std::string& dir) {
    absl::MutexLock lock(&mu_);
    data_dir_ = dir;
  }
  void SetAdmissionSource(std::function<Metrics::StreamAdmission()> source) {
    absl::MutexLock lock(&admission_mu_);
    admission_ = std::move(source);
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    const long ticks = sysconf(_SC_CLK_TCK);
    const long page = sysconf(_SC_PAGESIZE);
    // /proc/self/stat: fields after the parenthesised command name; utime 14, stime 15,
    // starttime 22, vsize 23, rss 24 (1-based, as in proc(5)).
    const std::string stat = ReadProc("/proc/self/stat");
    const size_t close = stat.rfind(')');
    if (close != std::string::npos && ticks > 0) {
      std::istringstream fields(stat.substr(close + 2));
      std::vector<std::string> f;
      for (std::string x; fields >> x;) f.push_back(x);
      auto num = [&](size_t field) { return field - 3 < f.size() ? std::strtod(f[field - 3].c_str(), nullptr) : 0.0; };
      out.push_back(Family("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                           prometheus::MetricType::Counter, (num(14) + num(15)) / static_cast<double>(ticks)));
      out.push_back(Family("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                           prometheus::MetricType::Gauge, num(23)));
      out.push_back(Family("process_resident_memory_bytes", "Resident memory size in bytes.",
                           prometheus::MetricType::Gauge, num(24) * static_cast<double>(page)));
      // starttime is in ticks since boot; btime (/proc/stat) is the boot time in unix seconds.
      double boot = 0;
      std::istringstream st(ReadProc("/proc/stat"));
      for (std::string line; std::getline(st, line);) {
        if (line.rfind("btime ", 0) == 0) boot = std::strtod(line.c_str() + 6, nullptr);
      }
      out.push_back(Family("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                           prometheus::MetricType::Gauge, boot + num(22) / static_cast<double>(ticks)));
    }
    std::error_code ec;
    double fds = 0;
    for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
         !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
      ++fds;
    }
    out.push_back(Family("process_open_fds", "Number of open file descriptors.", prometheus::MetricType::Gauge, fds));
    rlimit lim{};
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0) {
      out.push_back(Family("process_max_fds", "Maximum number of open file descriptors.",
                           prometheus::MetricType::Gauge, static_cast<double>(lim.rlim_cur)));
    }
    {
      // Read under the lock: clearing the source (service destructor) waits for a scrape using it.
      Metrics::StreamAdmission a;
      absl::MutexLock lock(&admission_mu_);
      if (admission_) a = admission_();
      out.push_back(Family("fibquant_buffered_bytes",
                           "Bytes of stream pages and GetCodebook answers held against --max-buffered-bytes.",
                           prometheus::MetricType::Gauge, static_cast<double>(a.buffered_bytes)));
      out.push_back(Family("fibquant_buffered_bytes_limit", "The --max-buffered-bytes budget, in bytes.",
                           prometheus::MetricType::Gauge, static_cast<double>(a.buffered_bytes_limit)));
      out.push_back(Family("fibquant_buffered_bytes_waits_total",
                           "Stream pages that waited for --max-buffered-bytes room held by their own stream.",
                           prometheus::MetricType::Counter, static_cast<double>(a.budget_waits)));
      out.push_back(Family("fibquant_buffered_bytes_refusals_total",
                           "Requests refused with RESOURCE_EXHAUSTED by the --max-buffered-bytes budget.",
                           prometheus::MetricType::Counter, static_cast<double>(a.budget_refusals)));
      out.push_back(Family("fibquant_streams_idle_reaped_total",
                           "Streams cancelled after --stream-idle-timeout-seconds without progress.",
                           prometheus::MetricType::Counter, static_cast<double>(a.idle_reaped)));
    }
    std::string dir;
    {
      absl::MutexLock lock(&mu_);
      dir = data_dir_;
    }
    if (!dir.empty()) {
      double bytes = 0;
      // Bounded: the data dir holds at most --max-profiles + --receipt-retention files plus the
      // quarantine; the walk stops after 100000 entries regardless.
      int seen = 0;
      for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
           !ec && it != std::filesystem::recursive_directory_iterator() && seen < 100000; it.increment(ec), ++seen) {
        std::error_code fe;
        if (it->is_regular_file(fe)) bytes += static_cast<double>(it->file_size(fe));
      }
      out.push_back(Family("fibquant_data_dir_bytes",
                           "Bytes of the files in the data dir (profiles, receipts, quarantine).",
                           prometheus::MetricType::Gauge, bytes));
    }
    return out;
  }

 private:
  mutable absl::Mutex mu_;
  std::string data_dir_ ABSL_GUARDED_BY(mu_);
  mutable absl::Mutex admission_mu_;
  std::function<Metrics::StreamAdmission()> admission_ ABSL_GUARDED_BY(admission_mu_);
};

// FibQuant rates run from about 1 to 8 bits per coordinate against 16- or 32-bit inputs, so ratios
// between 2 and 32 matter most; 1 catches pages stored mostly raw.
const Histogram::BucketBoundaries& RatioBuckets() {
  static const Histogram::BucketBoundaries* const kBuckets =
      new Histogram::BucketBoundaries{1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32};
  return *kBuckets;
}

// Distortions (MSE of unit vectors, cosine distance) span decades, so the buckets are logarithmic.
const Histogram::BucketBoundaries& DistortionBuckets() {
  static const Histogram::BucketBoundaries* const kBuckets = new Histogram::BucketBoundaries{
      1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1};
  return *kBuckets;
}

// Codebook builds take milliseconds (small N) to minutes (N = 2^16 with many Lloyd iterations).
const Histogram::BucketBoundaries& BuildBuckets() {
  static const Histogram::BucketBoundaries* const kBuckets = new Histogram::BucketBoundaries{
      0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};
  return *kBuckets;
}

std::string CodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

}  // namespace

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()), process_(std::make_shared<ProcessCollector>()) {
  auto& reg = *registry_;
  rpc_handled_ = &prometheus::BuildCounter()
                      .Name("fibquant_rpc_handled_total")
                      .Help("RPCs completed, by method and gRPC status code.")
                      .Register(reg);
  rpc_duration_ = &prometheus::BuildHistogram()
                       .Name("fibquant_rpc_duration_seconds")
                       .Help("Time from the start of an RPC to its final status, by method.")
                       .Register(reg);
  bytes_ = &prometheus::BuildCounter()
                .Name("fibquant_payload_bytes_total")
                .Help("Payload bytes processed: raw_in/compressed_out when compressing, "
                      "compressed_in/raw_out when decompressing.")
                .Register(reg);
  pages_ = &prometheus::BuildCounter()
                .Name("fibquant_pages_total")
                .Help("KV pages processed, by operation (compress, decompress, rejected).")
                .Register(reg);
  vectors_ = &prometheus::BuildCounter()
                  .Name("fibquant_vectors_total")
                  .Help("Vectors stored, by kind: compressed, raw_protected (kept raw by policy), "
                        "raw_fallback (kept raw after failing the quality budget).")
                  .Register(reg);
  fallbacks_ = &prometheus::BuildCounter()
                    .Name("fibquant_fallbacks_total")
                    .Help("Vectors or pages that fell back to raw storage, by reason.")
                    .Register(reg);
  compression_ratio_ = &prometheus::BuildHistogram()
                            .Name("fibquant_page_compression_ratio")
                            .Help("Raw bytes divided by compressed bytes, per page.")
                            .Register(reg)
                            .Add({}, RatioBuckets());
  distortion_ = &prometheus::BuildHistogram()
                     .Name("fibquant_page_distortion")
                     .Help("Measured reconstruction distortion per page, by metric.")
                     .Register(reg);
  queue_depth_ = &prometheus::BuildGauge()
                      .Name("fibquant_worker_queue_depth")
                      .Help("Tasks waiting in the worker pool.")
                      .Register(reg)
                      .Add({});
  build_queue_depth_ = &prometheus::BuildGauge()
                            .Name("fibquant_build_queue_depth")
                            .Help("Codebook builds waiting in the build pool.")
                            .Register(reg)
                            .Add({});
  builds_in_flight_ = &prometheus::BuildGauge()
                           .Name("fibquant_builds_in_flight")
                           .Help("Distinct profile specs being built (queued or running).")
                           .Register(reg)
                           .Add({});
  streams_in_flight_ = &prometheus::BuildGauge()
                            .Name("fibquant_streams_in_flight")
                            .Help("Streaming RPCs currently open.")
                            .Register(reg)
                            .Add({});
  streams_started_ = &prometheus::BuildCounter()
                          .Name("fibquant_streams_started_total")
                          .Help("Streaming RPCs opened since start.")
                          .Register(reg)
                          .Add({});
  registry_size_ = &prometheus::BuildGauge()
                        .Name("fibquant_registry_profiles")
                        .Help("Profiles held by the profile registry.")
                        .Register(reg)
                        .Add({});
  build_seconds_ = &prometheus::BuildHistogram()
                        .Name("fibquant_profile_build_duration_seconds")
                        .Help("Time to build one profile's codebook.")
                        .Register(reg)
                        .Add({}, BuildBuckets());
  quarantined_ = &prometheus::BuildCounter()
                      .Name("fibquant_registry_files_quarantined_total")
                      .Help("Registry files that failed verification at load and were moved aside.")
                      .Register(reg)
                      .Add({});

  page_seconds_ = &prometheus::BuildHistogram()
                       .Name("fibquant_page_duration_seconds")
                       .Help("Time to encode (compress) or decode (decompress) one page on a worker.")
                       .Register(reg);
  queue_capacity_ = &prometheus::BuildGauge()
                         .Name("fibquant_worker_queue_capacity")
                         .Help("Capacity of the worker queue (--worker-queue-capacity).")
                         .Register(reg)
                         .Add({});
  build_queue_capacity_ = &prometheus::BuildGauge()
                               .Name("fibquant_build_queue_capacity")
                               .Help("Capacity of the build queue (--worker-queue-capacity).")
                               .Register(reg)
                               .Add({});
  receipts_ = &prometheus::BuildCounter()
                   .Name("fibquant_receipts_total")
                   .Help("Receipts recorded: stored in the data dir, or kept in memory only (not written).")
                   .Register(reg);
  sampled_quality_ = &prometheus::BuildHistogram()
                          .Name("fibquant_sampled_page_distortion")
                          .Help("Distortion of pages sampled at --quality-sample-rate, by profile (digest "
                                "prefix) and metric.")
                          .Register(reg);
  prometheus::BuildGauge()
      .Name("fibquant_build_info")
      .Help("Always 1; the labels say which build is running.")
      .Register(reg)
      .Add({{"version", FQ_VERSION}, {"commit", FQ_GIT_COMMIT}})
      .Set(1);

  // Create the known series up front so dashboards and alerts see zeros instead of absent series.
  for (const char* reason : {"encode_failure", "quality_budget"}) fallbacks_->Add({{"reason", reason}});
  for (const char* op : {"compress", "decompress"}) page_seconds_->Add({{"op", op}}, PageBuckets());
  for (const char* r : {"stored", "memory_only"}) receipts_->Add({{"result", r}});
  for (const char* d : {"raw_in", "compressed_out", "compressed_in", "raw_out"}) {
    bytes_->Add({{"direction", d}});
  }
  for (const char* op : {"compress", "decompress", "rejected"}) pages_->Add({{"op", op}});
  for (const char* kind : {"compressed", "raw_protected", "raw_fallback"}) {
    vectors_->Add({{"kind", kind}});
  }
}

Metrics::~Metrics() {
  // Stop serving before the families go away (the exposer only holds a weak_ptr, but joining its
  // threads first keeps a scrape from racing the destruction).
  absl::MutexLock lock(&exposer_mu_);
  exposer_.reset();
}

void Metrics::RecordRpc(std::string_view method, absl::StatusCode code, double seconds) {
  std::string m(method);
  rpc_handled_->Add({{"method", m}, {"code", CodeName(code)}}).Increment();
  rpc_duration_->Add({{"method", m}}, DurationBuckets()).Observe(seconds);
}

void Metrics::RecordRpc(std::string_view method, grpc::StatusCode code, double seconds) {
  // grpc::StatusCode and absl::StatusCode share the google.rpc.Code numbering.
  RecordRpc(method, static_cast<absl::StatusCode>(static_cast<int>(code)), seconds);
}

void Metrics::AddBytes(std::string_view direction, uint64_t n) {
  bytes_->Add({{"direction", std::string(direction)}}).Increment(static_cast<double>(n));
}

void Metrics::AddPages(std::string_view op, uint64_t n) {
  pages_->Add({{"op", std::string(op)}}).Increment(static_cast<double>(n));
}

void Metrics::AddVectors(std::string_view kind, uint64_t n) {
  vectors_->Add({{"kind", std::string(kind)}}).Increment(static_cast<double>(n));
}

void Metrics::AddFallback(std::string_view reason) {
  fallbacks_->Add({{"reason", std::string(reason)}}).Increment();
}

void Metrics::ObserveCompressionRatio(double ratio) { compression_ratio_->Observe(ratio); }

void Metrics::ObserveDistortion(std::string_view metric, double value) {
  distortion_->Add({{"metric", std::string(metric)}}, DistortionBuckets()).Observe(value);
}

void Metrics::SetQueueDepth(int64_t n) { queue_depth_->Set(static_cast<double>(n)); }
void Metrics::SetBuildQueueDepth(int64_t n) { build_queue_depth_->Set(static_cast<double>(n)); }
void Metrics::SetBuildsInFlight(int64_t n) { builds_in_flight_->Set(static_cast<double>(n)); }

void Metrics::StreamStarted() {
  streams_in_flight_->Increment();
  streams_started_->Increment();
}

void Metrics::StreamFinished() { streams_in_flight_->Decrement(); }

void Metrics::SetRegistrySize(int64_t n) { registry_size_->Set(static_cast<double>(n)); }

void Metrics::ObserveBuildSeconds(double seconds) { build_seconds_->Observe(seconds); }

void Metrics::RegistryFileQuarantined() { quarantined_->Increment(); }

void Metrics::ObservePageSeconds(std::string_view op, double seconds) {
  page_seconds_->Add({{"op", std::string(op)}}, PageBuckets()).Observe(seconds);
}

void Metrics::SetQueueCapacities(int64_t worker_queue, int64_t build_queue) {
  queue_capacity_->Set(static_cast<double>(worker_queue));
  build_queue_capacity_->Set(static_cast<double>(build_queue));
}

void Metrics::ReceiptRecorded(bool persisted) {
  receipts_->Add({{"result", persisted ? "stored" : "memory_only"}}).Increment();
}

void Metrics::ObserveSampledQuality(const std::string& profile, std::string_view metric, double value) {
  sampled_quality_->Add({{"profile", profile}, {"metric", std::string(metric)}}, DistortionBuckets()).Observe(value);
}

void Metrics::WatchDataDir(const std::string& dir) {
  static_cast<ProcessCollector*>(process_.get())->SetDataDir(dir);
}

void Metrics::WatchStreamAdmission(std::function<StreamAdmission()> source) {
  static_cast<ProcessCollector*>(process_.get())->SetAdmissionSource(std::move(source));
}

void Metrics::SetTlsCertificateExpiry(absl::Time not_after) {
  absl::MutexLock lock(&tls_mu_);
  if (tls_expiry_ == nullptr) {
    tls_expiry_ = &prometheus::BuildGauge()
                       .Name("fibquant_tls_certificate_expiry_timestamp_seconds")
                       .Help("notAfter of the TLS server certificate being served, in unix "
                             "seconds (updated when a rotated certificate is reloaded).")
                       .Register(*registry_)
                       .Add({});
  }
  tls_expiry_->Set(static_cast<double>(absl::ToUnixSeconds(not_after)));
}

std::string Metrics::Serialize() const {
  prometheus::TextSerializer serializer;
  std::vector<prometheus::MetricFamily> all = registry_->Collect();
  for (auto& f : process_->Collect()) all.push_back(std::move(f));
  return serializer.Serialize(all);
}

absl::StatusOr<int> Metrics::StartExposer(const std::string& listen) {
  absl::MutexLock lock(&exposer_mu_);
  if (exposer_ != nullptr) {
    return absl::FailedPreconditionError("metrics exposer already started");
  }
  std::unique_ptr<prometheus::Exposer> exposer;
  try {
    // civetweb reports a bind failure by throwing; nothing may escape into the caller.
    exposer = std::make_unique<prometheus::Exposer>(listen, /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("--metrics-listen: cannot serve metrics on '", listen, "': ", e.what()));
  }
  std::vector<int> ports = exposer->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(
        absl::StrCat("--metrics-listen: no listening port for '", listen, "'"));
  }
  exposer->RegisterCollectable(registry_);
  exposer->RegisterCollectable(process_);
  exposer_ = std::move(exposer);
  return ports.front();
}

}  // namespace fibquant::server
