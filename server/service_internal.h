// Internals shared by the files of KvCompressionServiceImpl (service.cc: construction and server
// info; profile_rpcs.cc: registration, builds and profile queries; page_streams.cc: the
// CompressPages/DecompressPages reactors; receipt_rpcs.cc; evaluation_rpcs.cc). Not part of the
// server's interface: only those files include it.
// Ownership: none (free functions and small value types). Thread safety: every function is pure or
// touches only its arguments; UnaryFinisher may be copied to and called from any thread, once.
#ifndef FIBQUANT_SERVER_SERVICE_INTERNAL_H_
#define FIBQUANT_SERVER_SERVICE_INTERNAL_H_

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/half.h"
#include "core/kv_codec.h"
#include "core/kv_metrics.h"
#include "core/kv_profile.h"
#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "server/idle_reaper.h"
#include "server/memory_budget.h"
#include "server/metrics.h"
#include "server/service.h"
#include "server/status_util.h"

namespace fibquant::server {

class Registry;
class WorkerPool;
struct ProfileEntry;

namespace internal {

using Clock = std::chrono::steady_clock;

inline constexpr uint32_t kDefaultListPageSize = 50;
inline constexpr uint32_t kMaxListPageSize = 1000;
inline constexpr size_t kMaxLabelBytes = 256;
inline constexpr size_t kMaxStreamQueries = 256;         // queries per CompressPages stream
inline constexpr uint64_t kMaxPreloadFileBytes = 1 << 20;  // a spec is a few hundred bytes

inline double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Ends one unary RPC: records `method`'s metrics (status code, seconds since construction) and
// finishes its reactor with the same status. Copyable, so a worker-pool task can carry it and
// finish the RPC from the worker.
class UnaryFinisher {
 public:
  UnaryFinisher(Metrics* metrics, grpc::ServerUnaryReactor* reactor, const char* method)
      : metrics_(metrics), reactor_(reactor), method_(method), start_(Clock::now()) {}
  void operator()(const absl::Status& s) const {
    if (metrics_) metrics_->RecordRpc(method_, s.code(), SecondsSince(start_));
    reactor_->Finish(ToGrpcStatus(s));
  }

 private:
  Metrics* metrics_;
  grpc::ServerUnaryReactor* reactor_;
  const char* method_;
  Clock::time_point start_;
};

// A unary RPC whose whole body runs on the gRPC thread: finishes it with the body's status.
template <typename Body>
grpc::ServerUnaryReactor* UnaryNow(Metrics* metrics, grpc::CallbackServerContext* ctx, const char* method,
                                   Body&& body) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  UnaryFinisher(metrics, reactor, method)(std::forward<Body>(body)());
  return reactor;
}

int64_t NowUnixSeconds();

absl::Status Prefixed(const absl::Status& s, const std::string& prefix);

[[nodiscard]] absl::StatusOr<DType> FromProtoDType(fibquant::v1::DType d, std::string_view field);

// The structured spec rendered as the KV layer's spec JSON (KvCompressionProfile::FromSpecJson),
// with the documented defaults for fields proto3 cannot mark as absent.
std::string SpecToJson(const fibquant::v1::KvProfileSpec& s);

// Saturating a * b.
uint64_t MulSat(uint64_t a, uint64_t b);

// Build cost, roughly in multiply-adds, saturating at UINT64_MAX: the Lloyd training
// (training_samples x codebook_size x block_dim x lloyd_iterations x lloyd_restarts) plus the
// rotation: d^3 for Haar (Householder QR of a d x d matrix: 6.9e10 and ~35 s at the largest d, 4096,
// which the Lloyd term alone would let through), d x log2(d) for Hadamard. Raw profiles cost nothing.
struct BuildCostParts {
  uint64_t lloyd = 0;
  uint64_t rotation = 0;
  uint64_t total() const { return lloyd > std::numeric_limits<uint64_t>::max() - rotation
                                      ? std::numeric_limits<uint64_t>::max() : lloyd + rotation; }
};

BuildCostParts BuildCostOf(const KvCompressionProfile& p);
uint64_t BuildCost(const KvCompressionProfile& p);
// ResourceExhausted naming every factor when the cost of `p` exceeds `limit`.
absl::Status CheckBuildCost(const KvCompressionProfile& p, uint64_t limit);

// Identity of a spec before its codebook exists: the unresolved profile's JSON. Registering the
// same spec again finds its digest here and skips the build.
std::string SpecKey(KvCompressionProfile p);

void FillProfileInfo(const ProfileEntry& e, fibquant::v1::ProfileInfo* out);
void FillPageMetrics(const CompressedPage& page, fibquant::v1::PageMetrics* m);
void FillQualityMetrics(const KvQualityMetrics& q, fibquant::v1::QualityMetrics* m);
void RecordPageMetrics(Metrics* metrics, const CompressedPage& page);

// Everything a stream reactor needs from the service (borrowed; the service outlives it).
struct StreamEnv {
  Registry* registry;
  WorkerPool* pool;
  Metrics* metrics;
  const ServiceOptions* options;
  std::atomic<uint32_t>* open_streams;
  MemoryBudget* budget;  // --max-buffered-bytes
  IdleReaper* reaper;    // --stream-idle-timeout-seconds
  // Header's register_if_missing for an unknown digest (KvCompressionServiceImpl::
  // BuildMissingProfile); outlives the stream (the service waits for open streams).
  KvCompressionServiceImpl* service = nullptr;
};

}  // namespace internal
}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_SERVICE_INTERNAL_H_
