// Prometheus metrics of the FibQuant server: one registry, every metric family the service records,
// and an optional HTTP exposer serving them at /metrics.
//
// Ownership: the process owns one Metrics (main.cc) and passes a raw pointer to the service, which
// must not outlive it. Tests may create their own instances; they are independent.
// Thread safety: every method is safe to call concurrently (prometheus-cpp counters, gauges and
// histograms are atomic or internally locked; the exposer is guarded by a mutex).
//
// Naming follows the Prometheus conventions: `fibquant_` prefix, base units (seconds, bytes),
// `_total` on counters; `promtool check metrics` accepts the output (tests/server/ops_metrics_test.cc).
// Label values must come from a fixed, server-side set (method names, status code names, the
// enumerations documented below), never from anything a client sends: an unbounded label set would
// let a client grow the server's memory without limit.
#ifndef FIBQUANT_SERVER_METRICS_H_
#define FIBQUANT_SERVER_METRICS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/support/status.h"

namespace prometheus {
class Collectable;
class Counter;
class Exposer;
class Gauge;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace fibquant::server {

class Metrics {
 public:
  Metrics();
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // One finished RPC: `method` is the short method name ("Compress", "RegisterProfile", ...);
  // counts fibquant_rpc_handled_total{method,code} and observes fibquant_rpc_duration_seconds.
  // The code label is the canonical upper-case name ("OK", "INVALID_ARGUMENT", ...).
  void RecordRpc(std::string_view method, absl::StatusCode code, double seconds);
  void RecordRpc(std::string_view method, grpc::StatusCode code, double seconds);

  // Payload bytes through the service. direction: "raw_in", "compressed_out" (compression),
  // "compressed_in", "raw_out" (decompression).
  void AddBytes(std::string_view direction, uint64_t n);
  // Pages processed. op: "compress", "decompress", "rejected".
  void AddPages(std::string_view op, uint64_t n);
  // Vectors by how they were stored. kind: "compressed", "raw_protected" (kept raw by policy, e.g.
  // attention sinks / recent window), "raw_fallback" (kept raw because quantizing failed the budget).
  void AddVectors(std::string_view kind, uint64_t n);
  // One fallback to raw storage; reason is a fixed server-side identifier ("quality_budget",
  // "norm_out_of_range", ...).
  void AddFallback(std::string_view reason);
  // Raw bytes / compressed bytes of one page (dimensionless).
  void ObserveCompressionRatio(double ratio);
  // Measured distortion of one page. metric: "mse", "relative_mse", "cosine_distance", ...
  void ObserveDistortion(std::string_view metric, double value);
  // Tasks waiting in the worker pool.
  void SetQueueDepth(int64_t n);
  // Codebook builds waiting in the build pool (fibquant_build_queue_depth) and distinct specs being
  // built, queued or running (fibquant_builds_in_flight).
  void SetBuildQueueDepth(int64_t n);
  void SetBuildsInFlight(int64_t n);
  // Streams currently open (fibquant_streams_in_flight); call exactly once each per stream.
  void StreamStarted();
  void StreamFinished();
  // Profiles held by the registry.
  void SetRegistrySize(int64_t n);
  // Seconds to build one profile's codebook.
  void ObserveBuildSeconds(double seconds);
  // A registry file failed verification at load and was moved aside.
  void RegistryFileQuarantined();
  // Wall time of one page's encode or decode on a worker (fibquant_page_duration_seconds{op});
  // op: "compress", "decompress".
  void ObservePageSeconds(std::string_view op, double seconds);
  // Capacities beside the depths (fibquant_worker_queue_capacity, fibquant_build_queue_capacity).
  void SetQueueCapacities(int64_t worker_queue, int64_t build_queue);
  // A receipt was written to the data dir ("stored") or kept in memory only ("memory_only").
  void ReceiptRecorded(bool persisted);
  // Quality of a sampled page (--quality-sample-rate) of profile `profile` (label: the first 16
  // hex digits of its digest, server-derived; at most --max-profiles values):
  // fibquant_sampled_page_distortion{profile, metric} for "mse", "cosine_distance" and, with
  // queries, "attention_tv".
  void ObserveSampledQuality(const std::string& profile, std::string_view metric, double value);
  // Reports the size of every regular file under `dir` as fibquant_data_dir_bytes at each scrape
  // (walked then; the data dir holds at most --max-profiles + --receipt-retention files).
  void WatchDataDir(const std::string& dir);

  // The stream admission figures of the service (server/memory_budget.h, server/idle_reaper.h),
  // read from `source` at each scrape:
  //   fibquant_buffered_bytes (gauge)                 bytes held against --max-buffered-bytes
  //   fibquant_buffered_bytes_limit (gauge)           --max-buffered-bytes
  //   fibquant_buffered_bytes_waits_total (counter)   pages that waited for room their own stream held
  //   fibquant_buffered_bytes_refusals_total (counter) requests refused RESOURCE_EXHAUSTED by the budget
  //   fibquant_streams_idle_reaped_total (counter)    streams cancelled by --stream-idle-timeout-seconds
  // The series exist (at 0) before a source is set and after it is cleared (nullptr); the service
  // sets it when created and clears it in its destructor, so a scrape never reads a dead service.
  struct StreamAdmission {
    uint64_t buffered_bytes = 0;
    uint64_t buffered_bytes_limit = 0;
    uint64_t budget_waits = 0;
    uint64_t budget_refusals = 0;
    uint64_t idle_reaped = 0;
  };
  void WatchStreamAdmission(std::function<StreamAdmission()> source);

  // notAfter of the TLS certificate being served, as unix seconds
  // (fibquant_tls_certificate_expiry_timestamp_seconds). The series exists only once this has been
  // called (only TLS servers call it), so a plaintext server exports no misleading zero.
  void SetTlsCertificateExpiry(absl::Time not_after);

  // The registry itself, for code that wants to add its own families (same naming rules).
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // Current metrics in the Prometheus text exposition format (what /metrics returns).
  std::string Serialize() const;

  // Serves /metrics over HTTP on `listen` ("127.0.0.1:9464"; port 0 picks a free port) and returns
  // the bound port. At most one exposer per instance: a second call is FailedPrecondition. A bind
  // failure is Unavailable naming the address. The exposer lives until this object is destroyed
  // (its destructor takes about 2 s: civetweb joins its threads).
  [[nodiscard]] absl::StatusOr<int> StartExposer(const std::string& listen);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  // process_* and fibquant_data_dir_bytes, computed at each scrape from /proc and the data dir.
  std::shared_ptr<prometheus::Collectable> process_;

  prometheus::Family<prometheus::Counter>* rpc_handled_;
  prometheus::Family<prometheus::Histogram>* rpc_duration_;
  prometheus::Family<prometheus::Counter>* bytes_;
  prometheus::Family<prometheus::Counter>* pages_;
  prometheus::Family<prometheus::Counter>* vectors_;
  prometheus::Family<prometheus::Counter>* fallbacks_;
  prometheus::Histogram* compression_ratio_;
  prometheus::Family<prometheus::Histogram>* distortion_;
  prometheus::Gauge* queue_depth_;
  prometheus::Gauge* build_queue_depth_;
  prometheus::Gauge* builds_in_flight_;
  prometheus::Gauge* streams_in_flight_;
  prometheus::Counter* streams_started_;
  prometheus::Gauge* registry_size_;
  prometheus::Histogram* build_seconds_;
  prometheus::Counter* quarantined_;
  prometheus::Family<prometheus::Histogram>* page_seconds_;
  prometheus::Gauge* queue_capacity_;
  prometheus::Gauge* build_queue_capacity_;
  prometheus::Family<prometheus::Counter>* receipts_;
  prometheus::Family<prometheus::Histogram>* sampled_quality_;

  absl::Mutex tls_mu_;
  prometheus::Gauge* tls_expiry_ ABSL_GUARDED_BY(tls_mu_) = nullptr;  // created on first use

  absl::Mutex exposer_mu_;
  std::unique_ptr<prometheus::Exposer> exposer_ ABSL_GUARDED_BY(exposer_mu_);
};

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_METRICS_H_
