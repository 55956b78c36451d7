// KvCompressionServiceImpl: construction, options, drain and GetServerInfo. The RPC families live
// in profile_rpcs.cc, page_streams.cc, receipt_rpcs.cc and evaluation_rpcs.cc.
#include "server/service.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "core/codebook.h"
#include "core/codec.h"
#include "core/digest.h"
#include "core/kv_codec.h"
#include "core/kv_frame.h"
#include "core/kv_profile.h"
#include "core/kv_receipt.h"
#include "core/status_macros.h"
#include "server/idle_reaper.h"
#include "server/memory_budget.h"
#include "server/metrics.h"
#include "server/registry.h"
#include "server/status_util.h"
#include "server/worker_pool.h"
#include <nlohmann/json.hpp>
#include "server/service_internal.h"

namespace fibquant::server {
namespace {
namespace v1 = ::fibquant::v1;
namespace fs = std::filesystem;
using nlohmann::json;
using namespace ::fibquant::server::internal;  // NOLINT(build/namespaces): this service's own internals
}  // namespace

// ----- construction -----

KvCompressionServiceImpl::KvCompressionServiceImpl(const ServiceOptions& options, Metrics* metrics)
    : options_(options), metrics_(metrics) {}

KvCompressionServiceImpl::~KvCompressionServiceImpl() {
  // First: a scrape must not read the budget and reaper once they start going away.
  if (metrics_ != nullptr && budget_ != nullptr) metrics_->WatchStreamAdmission(nullptr);
  // A stream's OnDone may still be finishing on a gRPC thread just after the server's shutdown
  // returned; its last act is decrementing open_streams_, so wait (bounded) for that before the
  // pools and the registry it used go away.
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (open_streams_.load(std::memory_order_acquire) != 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (const uint32_t open = open_streams_.load(); open != 0) {
    std::fprintf(stderr, "fibquant-server: service destroyed with %u stream(s) still open\n", open);
  }
  // Runs (with Cancelled) any task still queued, so nothing outlives the service. Builds first: a
  // cancelled build tells its waiters, which finish their reactors (no pool needed).
  builds_cancel_.Cancel();  // a build still running stops at its next iteration
  if (eval_build_pool_) eval_build_pool_->Shutdown();
  if (build_pool_) build_pool_->Shutdown();
  if (pool_) pool_->Shutdown();
  reaper_.reset();  // before the members it may point into go away
}

absl::StatusOr<std::unique_ptr<KvCompressionServiceImpl>> KvCompressionServiceImpl::Create(
    const ServiceOptions& options, Metrics* metrics) {
  std::unique_ptr<KvCompressionServiceImpl> svc(new KvCompressionServiceImpl(options, metrics));
  FQ_RETURN_IF_ERROR(svc->Initialize());
  return svc;
}

absl::Status KvCompressionServiceImpl::Initialize() {
  auto positive = [](uint64_t v, const char* name) -> absl::Status {
    if (v == 0) return absl::InvalidArgumentError(absl::StrCat("ServiceOptions.", name, " must be >= 1"));
    return absl::OkStatus();
  };
  FQ_RETURN_IF_ERROR(positive(options_.max_message_bytes, "max_message_bytes"));
  FQ_RETURN_IF_ERROR(positive(options_.max_page_bytes, "max_page_bytes"));
  FQ_RETURN_IF_ERROR(positive(options_.max_inflight_pages_per_stream, "max_inflight_pages_per_stream"));
  FQ_RETURN_IF_ERROR(positive(options_.max_concurrent_streams, "max_concurrent_streams"));
  FQ_RETURN_IF_ERROR(positive(options_.receipt_retention, "receipt_retention"));
  FQ_RETURN_IF_ERROR(positive(options_.max_profiles, "max_profiles"));
  FQ_RETURN_IF_ERROR(positive(options_.worker_queue_capacity, "worker_queue_capacity"));
  FQ_RETURN_IF_ERROR(positive(options_.max_eval_profiles, "max_eval_profiles"));
  if (options_.worker_threads < 0 || options_.build_threads < 0) {
    return absl::InvalidArgumentError("ServiceOptions.worker_threads and build_threads must be >= 0");
  }
  if (options_.build_workers < 1) {
    return absl::InvalidArgumentError("ServiceOptions.build_workers must be >= 1");
  }
  if (options_.max_inflight_pages_per_stream > 1024) {
    return absl::InvalidArgumentError("ServiceOptions.max_inflight_pages_per_stream must be <= 1024");
  }
  int threads = options_.worker_threads;
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  options_.worker_threads = threads;
  Metrics* m = metrics_;
  pool_ = std::make_unique<WorkerPool>(threads, options_.worker_queue_capacity, [m](int64_t depth) {
    if (m) m->SetQueueDepth(depth);
  });
  build_pool_ = std::make_unique<WorkerPool>(
      options_.build_workers, options_.worker_queue_capacity,
      [m](int64_t depth) {
        if (m) m->SetBuildQueueDepth(depth);
      },
      absl::StrCat("build queue (--build-workers=", options_.build_workers, " threads)"),
      "--worker-queue-capacity");
  if (options_.stream_idle_timeout_seconds < 0) {
    return absl::InvalidArgumentError("ServiceOptions.stream_idle_timeout_seconds must be >= 0");
  }
  FQ_RETURN_IF_ERROR(positive(options_.max_buffered_bytes, "max_buffered_bytes"));
  eval_build_pool_ = std::make_unique<WorkerPool>(
      1, options_.worker_queue_capacity, [](int64_t) {},
      "build queue of unauthenticated EvaluateQuality candidates (1 thread)", "--worker-queue-capacity");
  budget_ = std::make_unique<MemoryBudget>(options_.max_buffered_bytes, "--max-buffered-bytes");
  reaper_ = std::make_unique<IdleReaper>(absl::Seconds(options_.stream_idle_timeout_seconds));
  if (metrics_ != nullptr) {
    metrics_->WatchStreamAdmission([budget = budget_.get(), reaper = reaper_.get()] {
      return Metrics::StreamAdmission{budget->held(), budget->limit(), budget->waits(), budget->refusals(),
                                      reaper->reaped()};
    });
  }
  RegistryOptions ro;
  ro.data_dir = options_.data_dir;
  ro.max_profiles = options_.max_profiles;
  ro.max_calibrations = options_.max_calibrations;
  ro.receipt_retention = options_.receipt_retention;
  FQ_ASSIGN_OR_RETURN(registry_, Registry::Open(ro, metrics_));
  // Restored profiles are known specs too: registering one again must not rebuild it.
  for (const auto& e : registry_->List("", std::numeric_limits<size_t>::max())) {
    absl::MutexLock lock(&spec_mu_);
    spec_digests_[SpecKey(e->codec->profile())] = e->digest;
  }
  return absl::OkStatus();
}

void KvCompressionServiceImpl::StartDrain() { draining_.store(true); }

void KvCompressionServiceImpl::CancelBuilds() { builds_cancel_.Cancel(); }

uint64_t KvCompressionServiceImpl::buffered_bytes() const { return budget_->held(); }
uint64_t KvCompressionServiceImpl::peak_buffered_bytes() const { return budget_->peak(); }
uint64_t KvCompressionServiceImpl::idle_reaped() const { return reaper_->reaped(); }

size_t KvCompressionServiceImpl::profile_count() const { return registry_->size(); }

grpc::ServerUnaryReactor* KvCompressionServiceImpl::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                                  const v1::GetServerInfoRequest* /*req*/,
                                                                  v1::GetServerInfoResponse* resp) {
  auto* reactor = ctx->DefaultReactor();
  const UnaryFinisher finish(metrics_, reactor, "GetServerInfo");
  resp->set_version(options_.version);
  // Every version the decoders accept (version 1 is still what plain pages are written as).
  for (uint16_t v = 1; v <= kKvFrameVersion; ++v) resp->add_frame_formats(absl::StrCat("FQKV v", v));
  resp->add_rotation_algorithms(std::string(kRotationHaarQr));
  resp->add_rotation_algorithms(std::string(kRotationHadamard));
  for (auto a : {KvAxisPolicy::kRaw, KvAxisPolicy::kPerToken, KvAxisPolicy::kPerChannel,
                 KvAxisPolicy::kRoleAwareKiviStyle}) {
    resp->add_axis_policies(std::string(KvAxisPolicyName(a)));
  }
  resp->add_dtypes(v1::DTYPE_F32);
  resp->add_dtypes(v1::DTYPE_F16);
  resp->add_dtypes(v1::DTYPE_BF16);
  v1::ServerLimits* l = resp->mutable_limits();
  l->set_max_message_bytes(options_.max_message_bytes);
  l->set_max_page_bytes(options_.max_page_bytes);
  l->set_max_inflight_pages_per_stream(options_.max_inflight_pages_per_stream);
  l->set_max_concurrent_streams(options_.max_concurrent_streams);
  l->set_max_profile_build_cost(options_.max_profile_build_cost);
  l->set_receipt_retention(options_.receipt_retention);
  l->set_max_profiles(options_.max_profiles);
  l->set_worker_threads(static_cast<uint32_t>(options_.worker_threads));
  l->set_worker_queue_capacity(options_.worker_queue_capacity);
  l->set_max_eval_values(options_.max_eval_values);
  l->set_build_workers(static_cast<uint32_t>(options_.build_workers));
  l->set_build_threads(static_cast<uint32_t>(
      options_.build_threads == 0 ? std::thread::hardware_concurrency() : options_.build_threads));
  resp->set_registered_profiles(static_cast<uint32_t>(registry_->size()));
  resp->set_stored_receipts(static_cast<uint32_t>(registry_->receipt_count()));
  finish(absl::OkStatus());
  return reactor;
}

bool KvCompressionServiceImpl::SampleQuality() {
  const double rate = options_.quality_sample_rate;
  if (!(rate > 0)) return false;
  if (rate >= 1) return true;
  // Page n is sampled when floor(n * rate) steps: exactly `rate` of the pages, evenly spaced.
  const uint64_t n = quality_pages_.fetch_add(1, std::memory_order_relaxed) + 1;
  return static_cast<uint64_t>(static_cast<double>(n) * rate) !=
         static_cast<uint64_t>(static_cast<double>(n - 1) * rate);
}

}  // namespace fibquant::server
