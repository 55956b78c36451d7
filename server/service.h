// KvCompressionServiceImpl: the gRPC callback implementation of fibquant.v1.KvCompressionService.
//
// Unary RPCs validate on the gRPC thread and finish there, except codebook builds (RegisterProfile,
// EvaluateQuality with candidates), which run on a separate build pool (`build_workers` threads) so
// pages never queue behind a build; their reactor finishes from the build's completion.
// Registrations are single-flight per spec (SpecKey): a registration of a spec already being built
// waits for that build, holding no thread, and gets its result (already_registered = true); a
// failed build is reported to every waiter and forgotten, so the next registration builds again.
// CompressPages / DecompressPages are bidirectional reactors that parse and
// validate each page on the gRPC thread, hand the codec work to the worker pool, keep at most
// `max_inflight_pages_per_stream` pages in work (backpressure: the next read is withheld), write
// responses in input order with one write in flight, and free themselves only after OnDone and the
// completion of every task they scheduled (house-style §5, Reverb's bidi reactor).
//
// Ownership: the process (main.cc) or a test owns the service; it must outlive the grpc::Server it
// is registered with (destroy the server first). `metrics` is borrowed and may be null (no metrics).
// Thread safety: every RPC method may be called concurrently by gRPC; PreloadDir and StartDrain are
// safe to call from any thread at any time.
#ifndef FIBQUANT_SERVER_SERVICE_H_
#define FIBQUANT_SERVER_SERVICE_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/cancel.h"
#include "core/kv_calib.h"
#include "core/kv_frame_auth.h"
#include "core/kv_profile.h"
#include "fibquant/v1/kv_compression.grpc.pb.h"

namespace fibquant::server {

class IdleReaper;
class MemoryBudget;
class Metrics;
class Registry;
class WorkerPool;
struct ProfileEntry;

// Every limit of the service, with defaults fit for one 2-core pod. Exceeding a limit gives
// ResourceExhausted (sizes, counts, cost) or InvalidArgument (malformed), naming the limit.
struct ServiceOptions {
  // Registry directory (profiles/, receipts/, quarantine/ beneath it). Empty: in memory only.
  std::string data_dir;
  // Largest gRPC message accepted or sent (main.cc passes it to the ServerBuilder too).
  uint64_t max_message_bytes = 64ull << 20;
  // Largest raw page (CompressPages) or frame (DecompressPages), in bytes.
  uint64_t max_page_bytes = 16ull << 20;
  // Pages of one stream scheduled on the worker pool or waiting to be written.
  uint32_t max_inflight_pages_per_stream = 4;
  // CompressPages + DecompressPages streams open at once; more are refused (ResourceExhausted).
  uint32_t max_concurrent_streams = 64;
  // Largest codebook build accepted, in units of
  // training_samples x codebook_size x block_dim x lloyd_iterations x lloyd_restarts.
  // Default 2e10, about 10 s of one worker: the paper defaults for d = 128, k = 4, N = 256 cost
  // 7.9e8 and built in 0.40 s with build_threads = 1 on the 2-core dev machine (under load).
  uint64_t max_profile_build_cost = 20'000'000'000ull;
  // Receipts kept (memory and disk); the oldest are dropped first.
  uint32_t receipt_retention = 1000;
  // Profiles kept in the registry; registering more is ResourceExhausted.
  uint32_t max_profiles = 256;
  // Worker pool: fixed threads (0 = hardware concurrency) and queued tasks beyond which new work
  // is refused (ResourceExhausted) or, for streams, not read until there is room.
  int worker_threads = 0;
  uint32_t worker_queue_capacity = 1024;
  // Threads one codebook build may use (0 = hardware concurrency). The codebook is identical for
  // any value.
  int build_threads = 1;
  // Build pool: codebook builds of RegisterProfile and of EvaluateQuality candidates run on
  // `build_workers` threads of their own (>= 1; PreloadDir builds on its caller's thread), each
  // build using up to `build_threads` threads, so up to build_workers x build_threads threads build
  // at once, beside the `worker_threads` that encode pages.
  // Its queue holds worker_queue_capacity builds; beyond that new builds are ResourceExhausted. At
  // most worker_queue_capacity registrations wait for one in-flight build (ResourceExhausted beyond).
  int build_workers = 1;
  // EvaluateQuality: largest keys/values/queries sample (floats, each) and most profiles per call.
  uint64_t max_eval_values = 4ull << 20;
  uint32_t max_eval_profiles = 8;
  // Bytes that requests make the server hold at once, server-wide (issue 14): decoded pages of
  // DecompressPages, raw pages and frames of CompressPages, and GetCodebook answers, counted
  // before they are allocated and released when written. A page that does not fit waits while its
  // own stream has pages in flight, else the stream fails with ResourceExhausted naming
  // --max-buffered-bytes; a GetCodebook answer that does not fit is ResourceExhausted.
  uint64_t max_buffered_bytes = 1ull << 30;
  // A stream or a large unary answer that makes no progress (no message read, no write completed,
  // no page finished) for this long is cancelled (0 = never): idle or header-only streams no
  // longer hold --max-concurrent-streams slots, nor slow readers memory, indefinitely.
  int stream_idle_timeout_seconds = 60;
  // Largest build cost of an EvaluateQuality candidate when registration is guarded by an admin
  // token (EvaluateQuality needs none): unauthenticated callers cannot occupy the build pool with
  // builds near max_profile_build_cost. Their builds run on a pool of their own (one worker), so
  // RegisterProfile never queues behind them.
  uint64_t max_unauthenticated_build_cost = 2'000'000'000ull;
  // Largest memory one codebook build may take (training samples, search bounds, codewords, the
  // rotation), estimated before the build; above it ResourceExhausted naming --max-build-memory-bytes.
  uint64_t max_build_memory_bytes = 2ull << 30;
  // Fraction of CompressPages pages whose quality is measured even when nobody asked (pages paced
  // evenly, not random), exported per profile as fibquant_sampled_page_distortion so a dashboard
  // shows drift. 0 turns it off; 1 measures every page (one extra decode each).
  double quality_sample_rate = 0.01;
  // Reported by GetServerInfo.
  std::string version = "0.1.0";
  // Frame keys (core/kv_frame_auth.h): when it returns a ring, every frame CompressPages returns is
  // sealed with its active key and DecompressPages decodes only frames sealed with one of its keys
  // (others are DATA_LOSS). Null or returning null: frames are neither sealed nor verified. Called
  // once per stream (a reload takes effect for new streams).
  std::function<std::shared_ptr<const KvFrameKeyRing>()> frame_keys;
  // Calibration artifacts kept in the registry (RegisterCalibration beyond it: ResourceExhausted).
  uint32_t max_calibrations = 256;
  // Admin check run first by RegisterProfile and RegisterCalibration (the RPCs that change server
  // state on request; RecommendProfile with store_calibration too),
  // e.g. the bearer token of server/security.h. Its status is returned as is (Unauthenticated,
  // PermissionDenied). Null: registration is open.
  std::function<absl::Status(const grpc::ServerContextBase&)> authorize_admin;
};

class KvCompressionServiceImpl final : public fibquant::v1::KvCompressionService::CallbackService {
 public:
  // Checks the options (InvalidArgument naming a bad one), starts the worker pool and opens the
  // registry in options.data_dir: every stored profile is loaded and verified (bad files are moved
  // to <data_dir>/quarantine/ and counted, never loaded) and receipts are restored.
  // Fails only if the data dir cannot be created or read.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<KvCompressionServiceImpl>> Create(
      const ServiceOptions& options, Metrics* metrics);

  ~KvCompressionServiceImpl() override;
  KvCompressionServiceImpl(const KvCompressionServiceImpl&) = delete;
  KvCompressionServiceImpl& operator=(const KvCompressionServiceImpl&) = delete;

  // Registers every `*.json` spec in `dir` (e.g. a mounted Kubernetes ConfigMap), building
  // codebooks synchronously on the calling thread. A file that fails is logged and skipped; the
  // returned status is the first failure (OK if every file registered).
  absl::Status PreloadDir(const std::string& dir);

  // A stream named `digest`, which this server does not have, and carried its registration
  // (header.register_if_missing): starts building it in the background under RegisterProfile's
  // rules (admin authorization on `ctx`, draining, capacity, single-flight on the build pool) and
  // returns the status the stream fails with: Unavailable "building, retry" when a build started
  // or is in flight, else the reason it cannot be (NotFound when the call lacks the admin token,
  // so the client falls back to RegisterProfile, or when the spec is registered under another
  // digest; the spec's parse error).
  absl::Status BuildMissingProfile(const std::string& digest,
                                   const fibquant::v1::RegisterProfileRequest& registration,
                                   const grpc::ServerContextBase& ctx);

  // True for the pages whose quality is sampled (ServiceOptions::quality_sample_rate), evenly paced
  // over all streams. Thread-safe.
  bool SampleQuality();

  // Drain: from now on new streams and registrations are refused with Unavailable; streams already
  // open run to completion.
  void StartDrain();
  // End of the drain: every codebook build running or queued stops at its next Lloyd iteration
  // (its callers get Cancelled), so the process can exit within the drain period plus one
  // iteration instead of after the longest build.
  void CancelBuilds();
  // Bytes held against --max-buffered-bytes now, and the most held at once since start (tests).
  uint64_t buffered_bytes() const;
  uint64_t peak_buffered_bytes() const;
  // Calls cancelled by the idle timeout since start (tests, metrics).
  uint64_t idle_reaped() const;
  bool draining() const { return draining_.load(); }

  const ServiceOptions& options() const { return options_; }
  // Profiles held by the registry (for health and metrics).
  size_t profile_count() const;
  // CompressPages + DecompressPages streams not yet done (OnDone); tests use it to see that a
  // cancelled stream was freed.
  uint32_t open_streams() const { return open_streams_.load(); }
  // Codebook builds of registrations (RegisterProfile, PreloadDir) started since Create, whatever
  // their outcome (EvaluateQuality candidates are not counted); tests use it to see single-flight.
  uint64_t registration_builds_started() const { return builds_started_.load(); }
  // Specs being built for registrations now (queued or running), and the registrations waiting
  // for them (the one that started a build included).
  size_t builds_in_flight() const;
  size_t build_waiters() const;

  // --- fibquant.v1.KvCompressionService (callback API) ---
  grpc::ServerUnaryReactor* RegisterProfile(grpc::CallbackServerContext* ctx,
                                            const fibquant::v1::RegisterProfileRequest* req,
                                            fibquant::v1::RegisterProfileResponse* resp) override;
  grpc::ServerUnaryReactor* GetProfile(grpc::CallbackServerContext* ctx,
                                       const fibquant::v1::GetProfileRequest* req,
                                       fibquant::v1::GetProfileResponse* resp) override;
  grpc::ServerUnaryReactor* ListProfiles(grpc::CallbackServerContext* ctx,
                                         const fibquant::v1::ListProfilesRequest* req,
                                         fibquant::v1::ListProfilesResponse* resp) override;
  grpc::ServerUnaryReactor* GetCodebook(grpc::CallbackServerContext* ctx,
                                        const fibquant::v1::GetCodebookRequest* req,
                                        fibquant::v1::GetCodebookResponse* resp) override;
  grpc::ServerBidiReactor<fibquant::v1::CompressPagesRequest, fibquant::v1::CompressPagesResponse>*
  CompressPages(grpc::CallbackServerContext* ctx) override;
  grpc::ServerBidiReactor<fibquant::v1::DecompressPagesRequest,
                          fibquant::v1::DecompressPagesResponse>*
  DecompressPages(grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* GetReceipt(grpc::CallbackServerContext* ctx,
                                       const fibquant::v1::GetReceiptRequest* req,
                                       fibquant::v1::GetReceiptResponse* resp) override;
  grpc::ServerUnaryReactor* ListReceipts(grpc::CallbackServerContext* ctx,
                                         const fibquant::v1::ListReceiptsRequest* req,
                                         fibquant::v1::ListReceiptsResponse* resp) override;
  grpc::ServerUnaryReactor* EvaluateQuality(grpc::CallbackServerContext* ctx,
                                            const fibquant::v1::EvaluateQualityRequest* req,
                                            fibquant::v1::EvaluateQualityResponse* resp) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const fibquant::v1::GetServerInfoRequest* req,
                                          fibquant::v1::GetServerInfoResponse* resp) override;
  // calibration_rpcs.cc: calibration artifacts and profile recommendation.
  grpc::ServerUnaryReactor* RegisterCalibration(grpc::CallbackServerContext* ctx,
                                                const fibquant::v1::RegisterCalibrationRequest* req,
                                                fibquant::v1::RegisterCalibrationResponse* resp) override;
  grpc::ServerUnaryReactor* GetCalibration(grpc::CallbackServerContext* ctx,
                                           const fibquant::v1::GetCalibrationRequest* req,
                                           fibquant::v1::GetCalibrationResponse* resp) override;
  grpc::ServerUnaryReactor* RecommendProfile(grpc::CallbackServerContext* ctx,
                                             const fibquant::v1::RecommendProfileRequest* req,
                                             fibquant::v1::RecommendProfileResponse* resp) override;

 private:
  KvCompressionServiceImpl(const ServiceOptions& options, Metrics* metrics);
  absl::Status Initialize();
  // Exactly one of the two; the spec is validated and its build cost checked against the limit.
  [[nodiscard]] absl::StatusOr<KvCompressionProfile> ParseSpec(const fibquant::v1::KvProfileSpec* structured,
                                                               const std::string* spec_json) const;
  using BuildResult = absl::StatusOr<std::shared_ptr<const ProfileEntry>>;
  // Told the result of the build a registration waited for; `inserted` is true only for the
  // registration that started the build, and only if the build stored a new profile.
  using BuildWaiter = absl::AnyInvocable<void(const BuildResult& result, bool inserted) &&>;
  struct Flight {
    struct Waiter {
      const grpc::ServerContextBase* ctx;  // null: not an RPC (PreloadDir), never cancelled
      BuildWaiter done;
    };
    std::vector<Waiter> waiters;  // [0] started the build
  };
  // Joins the in-flight build of `key`, or starts a flight for it (*lead = true: the caller must
  // run RunFlight exactly once, on some thread). ResourceExhausted when the flight already has
  // worker_queue_capacity waiters (the waiter is then dropped without being called).
  [[nodiscard]] absl::Status JoinFlight(const std::string& key, const grpc::ServerContextBase* ctx,
                                        BuildWaiter waiter, bool* lead);
  // The build of a flight, on the calling thread (a build worker, or PreloadDir's caller); tells
  // every waiter. `pool_status` not OK (the pool shut down) fails the flight without building.
  void RunFlight(const std::string& key, KvCompressionProfile profile, const absl::Status& pool_status);
  // Ends the flight of `key`: records the spec's digest on success and removes the flight in one
  // critical section (so a registration finds one or the other), then tells every waiter.
  void FinishFlight(const std::string& key, const BuildResult& result, bool inserted);
  // ResourceExhausted naming --max-unauthenticated-build-cost when `p` costs more than a caller
  // without the admin token may build.
  [[nodiscard]] absl::StatusOr<KvCompressionProfile> CheckUnauthenticatedBuild(KvCompressionProfile p) const;
  // Builds the codebook on the calling thread and stores the profile (does not record the spec).
  // `cancel` (null: the service's builds_cancel_) stops it with Cancelled.
  [[nodiscard]] BuildResult BuildAndStore(KvCompressionProfile profile, bool* inserted,
                                          const CancelToken* cancel = nullptr);
  // The registered calibration a profile's channel_transform needs (null when it needs none);
  // NotFound naming the digest when it is not registered.
  [[nodiscard]] absl::StatusOr<std::shared_ptr<const KvCalibration>> CalibrationFor(
      const KvCompressionProfile& profile) const;
  // The registered entry of an identical spec, if any (no build needed).
  std::shared_ptr<const ProfileEntry> FindSpec(const KvCompressionProfile& profile) const;

  ServiceOptions options_;
  Metrics* metrics_;  // not owned; may be null
  std::unique_ptr<WorkerPool> pool_;        // codec work: pages, receipts, EvaluateQuality without candidates
  std::unique_ptr<WorkerPool> build_pool_;  // codebook builds only
  // EvaluateQuality candidate builds of callers without the admin token (when one is configured).
  std::unique_ptr<WorkerPool> eval_build_pool_;
  std::unique_ptr<MemoryBudget> budget_;
  std::unique_ptr<IdleReaper> reaper_;
  // Cancelled by CancelBuilds: every build polls it.
  CancelToken builds_cancel_;
  std::unique_ptr<Registry> registry_;
  std::atomic<bool> draining_{false};
  std::atomic<uint32_t> open_streams_{0};
  // Unresolved spec (profile JSON without codebook/rotation digests) -> registered digest.
  mutable absl::Mutex spec_mu_;
  std::map<std::string, std::string> spec_digests_ ABSL_GUARDED_BY(spec_mu_);
  // Unresolved spec -> its registration build in progress (single-flight).
  std::map<std::string, Flight> flights_ ABSL_GUARDED_BY(spec_mu_);
  std::atomic<uint64_t> builds_started_{0};
  std::atomic<uint64_t> quality_pages_{0};  // pages seen by SampleQuality
};

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_SERVICE_H_
