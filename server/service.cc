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
#include "server/metrics.h"
#include "server/registry.h"
#include "server/status_util.h"
#include "server/worker_pool.h"
#include <nlohmann/json.hpp>

namespace fibquant::server {
namespace {

namespace v1 = ::fibquant::v1;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

constexpr uint32_t kDefaultListPageSize = 50;
constexpr uint32_t kMaxListPageSize = 1000;
constexpr size_t kMaxLabelBytes = 256;
constexpr size_t kMaxStreamQueries = 256;         // queries per CompressPages stream
constexpr uint64_t kMaxPreloadFileBytes = 1 << 20;  // a spec is a few hundred bytes

double SecondsSince(Clock::time_point start) {
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

int64_t NowUnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::Status Prefixed(const absl::Status& s, const std::string& prefix) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

[[nodiscard]] absl::StatusOr<DType> FromProtoDType(v1::DType d, std::string_view field) {
  switch (d) {
    case v1::DTYPE_F32: return DType::kF32;
    case v1::DTYPE_F16: return DType::kF16;
    case v1::DTYPE_BF16: return DType::kBF16;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(field), " must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16"));
  }
}

// The structured spec rendered as the KV layer's spec JSON (KvCompressionProfile::FromSpecJson),
// with the documented defaults for fields proto3 cannot mark as absent.
std::string SpecToJson(const v1::KvProfileSpec& s) {
  json j;
  j["profile_id"] = s.profile_id();
  const v1::KvShape& sh = s.shape();
  const bool value = sh.role() == "value";
  j["shape"] = {{"role", sh.role()},
                {"attention_kind", sh.attention_kind().empty() ? "mha" : sh.attention_kind()},
                {"batch", sh.batch() == 0 ? 1u : sh.batch()},
                {"layers", sh.layers()},
                {"kv_heads", sh.kv_heads()},
                {"query_heads", sh.query_heads() == 0 ? sh.kv_heads() : sh.query_heads()},
                {"tokens", sh.tokens()},
                {"head_dim", sh.head_dim()},
                {"dtype", sh.dtype().empty() ? "f32" : sh.dtype()},
                {"rope_state", !sh.rope_state().empty() ? sh.rope_state()
                                                        : (value ? "not_applicable" : "pre_rope")}};
  const std::string axis = s.axis_policy().empty() ? "per_token" : s.axis_policy();
  j["axis_policy"] = axis;
  j["tokens_per_page"] = s.page_geometry().tokens_per_page();
  if (s.page_geometry().has_reserved_vector_bytes()) {
    j["reserved_vector_bytes"] = s.page_geometry().reserved_vector_bytes();
  }
  if (axis != "raw" || s.has_fibquant()) {
    const v1::FibQuantParams& f = s.fibquant();
    json fq = {{"block_dim", f.block_dim()}, {"codebook_size", f.codebook_size()}, {"seed", f.seed()}};
    if (!f.rotation_algorithm().empty()) fq["rotation_algorithm"] = f.rotation_algorithm();
    if (f.has_lloyd_restarts()) fq["lloyd_restarts"] = f.lloyd_restarts();
    if (f.has_lloyd_iterations()) fq["lloyd_iterations"] = f.lloyd_iterations();
    if (f.has_training_samples()) fq["training_samples"] = f.training_samples();
    if (!f.empty_cell_policy().empty()) fq["empty_cell_policy"] = f.empty_cell_policy();
    j["fibquant"] = fq;
  }
  if (s.has_protected_regions()) {
    const auto& p = s.protected_regions();
    j["protected"] = {{"first_tokens_raw", p.first_tokens_raw()},
                      {"last_tokens_raw", p.last_tokens_raw()},
                      {"raw_layers", std::vector<uint32_t>(p.raw_layers().begin(), p.raw_layers().end())},
                      {"raw_heads", std::vector<uint32_t>(p.raw_heads().begin(), p.raw_heads().end())}};
  }
  if (s.has_fallback()) {
    json f = {{"mode", s.fallback().mode().empty() ? "keep_raw" : s.fallback().mode()}};
    if (s.fallback().has_raw_fallback_available()) {
      f["raw_fallback_available"] = s.fallback().raw_fallback_available();
    }
    j["fallback"] = f;
  }
  if (s.has_quality_budget()) {
    const auto& b = s.quality_budget();
    json q = json::object();
    if (b.has_max_logit_mse()) q["max_logit_mse"] = b.max_logit_mse();
    if (b.has_max_attention_tv()) q["max_attention_tv"] = b.max_attention_tv();
    if (b.has_max_topk_disagreement()) q["max_topk_disagreement"] = b.max_topk_disagreement();
    if (b.has_max_value_aggregation_mse()) q["max_value_aggregation_mse"] = b.max_value_aggregation_mse();
    if (!b.fallback_on_violation().empty()) q["fallback_on_violation"] = b.fallback_on_violation();
    j["quality_budget"] = q;
  }
  if (!s.calibration_digest().empty()) j["calibration_digest"] = s.calibration_digest();
  return j.dump();
}

// Saturating a * b.
uint64_t MulSat(uint64_t a, uint64_t b) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return std::numeric_limits<uint64_t>::max();
  return a * b;
}

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

BuildCostParts BuildCostOf(const KvCompressionProfile& p) {
  BuildCostParts parts;
  if (!p.fib_profile.has_value()) return parts;
  const Profile& f = *p.fib_profile;
  parts.lloyd = 1;
  for (uint64_t x : {uint64_t{f.training_samples}, uint64_t{f.codebook_size}, uint64_t{f.block_dim},
                     uint64_t{f.lloyd_iterations}, uint64_t{f.lloyd_restarts}}) {
    parts.lloyd = MulSat(parts.lloyd, x);
  }
  const uint64_t d = f.ambient_dim;
  if (f.rotation_algorithm == kRotationHaarQr) {
    parts.rotation = MulSat(MulSat(d, d), d);
  } else {
    uint64_t log2d = 0;
    while ((uint64_t{1} << log2d) < d) ++log2d;
    parts.rotation = MulSat(d, log2d);
  }
  return parts;
}

uint64_t BuildCost(const KvCompressionProfile& p) { return BuildCostOf(p).total(); }

absl::Status CheckBuildCost(const KvCompressionProfile& p, uint64_t limit) {
  const BuildCostParts parts = BuildCostOf(p);
  if (parts.total() <= limit) return absl::OkStatus();
  const Profile& f = *p.fib_profile;
  return absl::ResourceExhaustedError(absl::StrCat(
      "profile build cost ", parts.total(), " (Lloyd: training_samples ", f.training_samples,
      " x codebook_size ", f.codebook_size, " x block_dim ", f.block_dim, " x lloyd_iterations ",
      f.lloyd_iterations, " x lloyd_restarts ", f.lloyd_restarts, " = ", parts.lloyd, "; rotation ",
      f.rotation_algorithm, " at head_dim ", f.ambient_dim, ": ", parts.rotation,
      f.rotation_algorithm == kRotationHaarQr ? " = head_dim^3, a Hadamard rotation costs far less" : "",
      ") exceeds max_profile_build_cost ", limit));
}

// Identity of a spec before its codebook exists: the unresolved profile's JSON. Registering the
// same spec again finds its digest here and skips the build.
std::string SpecKey(KvCompressionProfile p) {
  p.codebook_digest.clear();
  p.rotation_digest.clear();
  return p.ToJson(0);
}

void FillProfileInfo(const ProfileEntry& e, v1::ProfileInfo* out) {
  const KvCompressionProfile& p = e.codec->profile();
  out->set_digest(e.digest);
  out->set_profile_id(p.profile_id);
  out->set_profile_json(e.profile_json);
  out->set_fibquant_profile_digest(p.fib_profile_digest);
  out->set_codebook_digest(p.codebook_digest);
  out->set_rotation_digest(p.rotation_digest);
  out->set_head_dim(p.shape.head_dim);
  v1::BuildStats* st = out->mutable_build_stats();
  st->set_seconds(e.build_seconds);
  st->set_threads(e.build_threads);
  st->set_loaded_from_disk(e.loaded_from_disk);
  st->set_cost(BuildCost(p));
  if (p.fib_profile.has_value()) {
    const Profile& f = *p.fib_profile;
    out->set_block_dim(f.block_dim);
    out->set_codebook_size(f.codebook_size);
    out->set_wire_index_bits(f.wire_index_bits);
    out->set_code_bytes_per_vector(static_cast<uint32_t>(f.code_bytes()));
    out->set_paper_bits_per_coord(f.paper_rate_bits_per_coord);
    out->set_wire_bits_per_coord(f.wire_bits_per_coord);
    out->set_rotation_algorithm(f.rotation_algorithm);
  }
  if (e.codec->quantizer()) {
    const LloydReport& r = e.codec->quantizer()->codebook().report();
    st->set_init_mse(r.init_mse);
    st->set_training_mse(r.best_mse);
    st->set_best_restart(r.best_restart);
    st->set_empty_cells_repaired(static_cast<uint32_t>(r.repair_events.size()));
  }
  out->set_registered_unix_seconds(e.registered_unix_seconds);
}

void FillPageMetrics(const CompressedPage& page, v1::PageMetrics* m) {
  m->set_compressed_vectors(page.counts.coded);
  m->set_raw_vectors(page.counts.raw_total());
  for (const auto& r : page.raw_reasons) m->add_raw_reasons(r);
  if (!page.metrics.has_value()) {
    m->set_query_source("none");
    return;
  }
  const KvQualityMetrics& q = *page.metrics;
  m->set_mse(q.reconstruction_mse);
  m->set_cosine_similarity(q.cosine_similarity);
  if (q.key_logit_mse) m->set_key_logit_mse(*q.key_logit_mse);
  if (q.attention_tv) m->set_attention_tv(*q.attention_tv);
  if (q.attention_kl) m->set_attention_kl(*q.attention_kl);
  if (q.topk_disagreement) m->set_topk_disagreement(*q.topk_disagreement);
  if (q.value_aggregation_mse) m->set_value_aggregation_mse(*q.value_aggregation_mse);
  m->set_query_source(std::string(KvQuerySourceName(q.query_source)));
}

void FillQualityMetrics(const KvQualityMetrics& q, v1::QualityMetrics* m) {
  m->set_reconstruction_mse(q.reconstruction_mse);
  m->set_cosine_similarity(q.cosine_similarity);
  if (q.key_logit_mse) m->set_key_logit_mse(*q.key_logit_mse);
  if (q.attention_tv) m->set_attention_tv(*q.attention_tv);
  if (q.attention_kl) m->set_attention_kl(*q.attention_kl);
  if (q.topk_disagreement) m->set_topk_disagreement(*q.topk_disagreement);
  if (q.value_aggregation_mse) m->set_value_aggregation_mse(*q.value_aggregation_mse);
  m->set_query_source(std::string(KvQuerySourceName(q.query_source)));
}

void RecordPageMetrics(Metrics* metrics, const CompressedPage& page) {
  if (metrics == nullptr) return;
  metrics->AddPages("compress", 1);
  metrics->AddBytes("raw_in", page.input_bytes);
  metrics->AddBytes("compressed_out", page.frame.size());
  metrics->AddVectors("compressed", page.counts.coded);
  metrics->AddVectors("raw_protected", page.counts.raw_protected + page.counts.raw_policy);
  metrics->AddVectors("raw_fallback", page.counts.raw_encode_fallback + page.counts.raw_quality_fallback);
  if (page.counts.raw_encode_fallback > 0) metrics->AddFallback("encode_failure");
  if (page.counts.raw_quality_fallback > 0) metrics->AddFallback("quality_budget");
  if (!page.frame.empty()) {
    metrics->ObserveCompressionRatio(static_cast<double>(page.input_bytes) / static_cast<double>(page.frame.size()));
  }
  if (page.metrics.has_value()) {
    metrics->ObserveDistortion("mse", page.metrics->reconstruction_mse);
    metrics->ObserveDistortion("cosine_distance", 1.0 - page.metrics->cosine_similarity);
  }
}

// Compresses a sample (one (0, 0, 0) sequence) with `codec` page by page and reports quality.
[[nodiscard]] absl::StatusOr<v1::QualityReport> EvaluateSample(const std::shared_ptr<const KvCodec>& codec,
                                                               const v1::EvaluateQualityRequest& req) {
  const KvCompressionProfile& p = codec->profile();
  const uint32_t d = p.shape.head_dim;
  const bool key = p.shape.role == KvRole::kKey;
  const auto& data = key ? req.keys() : req.values();
  const std::string what = key ? "keys" : "values";
  const std::string ctx = absl::StrCat("profile ", p.profile_id, ": ");
  if (data.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, what, " are required for a ", what, " profile"));
  }
  if (data.size() % d != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(ctx, what, " hold ", data.size(), " values, not a multiple of head_dim ", d));
  }
  if (req.queries().size() % d != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(ctx, "queries hold ", req.queries().size(), " values, not a multiple of head_dim ", d));
  }
  if (!key && !req.keys().empty() && req.keys().size() != req.values().size()) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, "keys and values must have the same length; got ",
                                                   req.keys().size(), " and ", req.values().size()));
  }
  const uint32_t tokens = static_cast<uint32_t>(data.size() / d);
  const uint32_t tpp = p.page_geometry.tokens_per_page;
  KvReceiptBuilder builder(codec);
  KvCompressOptions opts;
  opts.compute_metrics = true;
  opts.enforce_budget = false;  // measure only: the verdict is reported, nothing falls back
  opts.top_k = req.top_k() == 0 ? kDefaultTopK : req.top_k();
  for (uint32_t start = 0; start < tokens && start < p.shape.tokens; start += tpp) {
    const uint32_t count = std::min(tpp, p.shape.tokens - start);
    if (start + count > tokens) break;
    KvPageInput in;
    in.coords = KvPageCoords{0, 0, 0, start, count};
    in.dtype = DType::kF32;
    in.data = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data() + size_t{start} * d),
                                        size_t{count} * d * sizeof(float));
    in.queries = absl::Span<const float>(req.queries().data(), req.queries().size());
    if (!key && !req.keys().empty() && !req.queries().empty()) {
      in.keys = absl::Span<const float>(req.keys().data() + size_t{start} * d, size_t{count} * d);
    }
    auto page = codec->CompressPage(in, opts);
    if (!page.ok()) return Prefixed(page.status(), ctx);
    FQ_RETURN_IF_ERROR(builder.Add(*page));
  }
  if (builder.pages() == 0) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, "the sample holds ", tokens,
                                                   " tokens; the first page of the profile needs ",
                                                   std::min(tpp, p.shape.tokens)));
  }
  FQ_ASSIGN_OR_RETURN(KvReceipt receipt, builder.Finish());
  v1::QualityReport report;
  report.set_profile_digest(codec->profile_digest());
  report.set_profile_id(p.profile_id);
  if (receipt.quality_mean.has_value()) FillQualityMetrics(*receipt.quality_mean, report.mutable_metrics());
  report.set_within_budget(receipt.budget_passed);
  for (const KvBudgetVerdict& v : receipt.budget) {
    if (!v.passed) report.add_violations(absl::StrCat(v.metric, " ", v.worst_value, " > ", v.limit));
  }
  report.set_wire_bits_per_coord(p.fib_profile ? p.fib_profile->wire_bits_per_coord : 32.0);
  report.set_compression_ratio(receipt.compression_ratio);
  report.set_report_json(receipt.ToJson());
  return report;
}

// Everything a stream reactor needs from the service (borrowed; the service outlives it).
struct StreamEnv {
  Registry* registry;
  WorkerPool* pool;
  Metrics* metrics;
  const ServiceOptions* options;
  std::atomic<uint32_t>* open_streams;
};

template <typename Req, typename Resp>
class RejectReactor final : public grpc::ServerBidiReactor<Req, Resp> {
 public:
  RejectReactor(const absl::Status& s, Metrics* metrics, const char* method) {
    if (metrics) metrics->RecordRpc(method, s.code(), 0.0);
    this->Finish(ToGrpcStatus(s));
  }
  void OnDone() override { delete this; }
};

// Base of both page streams. Protocol (house-style §5):
//  - one read in flight; a read is started only while fewer than max_inflight_pages_per_stream
//    pages are scheduled or waiting to be written (backpressure: the client's sends block in flow
//    control instead of the server buffering without bound);
//  - each page gets a sequence number, is validated on the gRPC thread and encoded/decoded on the
//    worker pool (never on a gRPC thread, never under mu_);
//  - results are written strictly in sequence order, one write in flight;
//  - after the client half-closes and every page is written, a final task (receipt, persisted) runs
//    on the pool and its response is written last, then Finish(OK);
//  - the first error (or cancellation) finishes the stream once no write is in flight;
//  - the object is deleted only after OnDone AND the completion of every task it scheduled.
// All gRPC operations are started under mu_: in gRPC 1.51 read/write/finish completions of server
// bidi reactors are never run inline (can_inline = false), so this cannot self-deadlock.
template <typename Req, typename Resp, typename Result>
class PageStream : public grpc::ServerBidiReactor<Req, Resp> {
 public:
  using Work = absl::AnyInvocable<absl::StatusOr<Result>() &&>;

  PageStream(const StreamEnv& env, grpc::CallbackServerContext* ctx, const char* method)
      : env_(env), ctx_(ctx), method_(method), start_(Clock::now()) {
    if (env_.metrics) env_.metrics->StreamStarted();
  }

  // Must be called once by the most-derived constructor (virtual dispatch is safe from there).
  void Start() {
    absl::MutexLock lock(&mu_);
    reading_ = true;
    this->StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // client half-closed (or the call is over)
      Drive([this] {
        reading_ = false;
        read_done_ = true;
      });
      return;
    }
    absl::Status status;
    std::optional<Work> work;
    uint64_t seq = 0;
    if (!got_header_) {
      got_header_ = true;
      status = OnHeader(req_);
    } else {
      seq = next_seq_;  // only this thread (the one read in flight) advances next_seq_
      auto w = PreparePage(req_, seq);
      if (w.ok()) {
        work.emplace(*std::move(w));
      } else {
        status = w.status();
        if (env_.metrics) env_.metrics->AddPages("rejected", 1);
      }
    }
    if (!work.has_value()) {
      Drive([this, &status] {
        reading_ = false;
        if (!status.ok()) SetError(status);
      });
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      reading_ = false;
      if (finished_) return;  // the stream already failed: drop the page, read no more
      ++next_seq_;
      ++inflight_;
      ++pending_;
    }
    env_.pool->SubmitReserved([this, seq, w = *std::move(work)](absl::Status pool_status) mutable {
      absl::StatusOr<Result> r = !pool_status.ok() ? absl::StatusOr<Result>(pool_status)
                                 : cancelled_.load() ? absl::StatusOr<Result>(absl::CancelledError("stream cancelled"))
                                                     : std::move(w)();
      Complete([this, seq, &r] {
        if (r.ok()) {
          ready_.emplace(seq, *std::move(r));
        } else {
          SetError(r.status());
        }
      });
    });
    Drive([] {});
  }

  void OnWriteDone(bool ok) override {
    Drive([this, ok] {
      writing_ = false;
      if (!ok) {
        SetError(absl::CancelledError("write failed: the client went away"));
        return;
      }
      if (final_in_flight_) {
        final_in_flight_ = false;
        final_written_ = true;
      } else {
        ++next_write_;
        --inflight_;
      }
    });
  }

  void OnCancel() override {
    // Not under mu_: reactions below (failed read/write, task completions) drive the finish.
    cancelled_.store(true);
  }

  void OnDone() override {
    // gRPC runs OnCancel (if at all) before OnDone, ordered by an atomic inside libgrpc++. Reading
    // the flag OnCancel wrote makes that order visible to ThreadSanitizer too (Debian's gRPC is
    // not instrumented), so deleting this object below is not reported as racing with OnCancel.
    (void)cancelled_.load(std::memory_order_acquire);
    if (env_.metrics) env_.metrics->StreamFinished();
    std::atomic<uint32_t>* const open_streams = env_.open_streams;
    bool del;
    {
      absl::MutexLock lock(&mu_);
      done_ = true;
      del = pending_ == 0;
    }
    if (del) delete this;
    // Last, touching nothing after it: the service's destructor waits for this count to reach zero
    // (and its acquire load orders everything above before the service goes away).
    open_streams->fetch_sub(1);
  }

 protected:
  ~PageStream() override = default;

  // gRPC thread, before any page: validates the header message.
  virtual absl::Status OnHeader(const Req& req) = 0;
  // gRPC thread: validates one page message (taking its payload out of `req`) and returns the work
  // to run on the pool.
  [[nodiscard]] virtual absl::StatusOr<Work> PreparePage(Req& req, uint64_t seq) = 0;
  // Under mu_, in sequence order, just before the page's response is written: accounting for the
  // final message; fills `out`.
  virtual absl::Status Account(Result& result, Resp* out) = 0;
  // Pool thread, after the last page was written: the final message (receipt).
  [[nodiscard]] virtual absl::StatusOr<Resp> MakeFinal() = 0;

  const StreamEnv env_;
  grpc::CallbackServerContext* const ctx_;
  std::atomic<bool> cancelled_{false};

 private:
  void SetError(const absl::Status& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (error_.ok()) error_ = s;
  }

  // Applies `update` under mu_, advances the state machine, and schedules the final task if due.
  template <typename F>
  void Drive(F&& update) {
    bool schedule_final;
    {
      absl::MutexLock lock(&mu_);
      update();
      schedule_final = Step();
    }
    if (schedule_final) ScheduleFinal();
  }

  // Like Drive, for a task completion: also drops the task's hold on the reactor.
  template <typename F>
  void Complete(F&& update) {
    bool schedule_final, del;
    {
      absl::MutexLock lock(&mu_);
      --pending_;
      update();
      schedule_final = Step();
      del = done_ && pending_ == 0;
    }
    if (schedule_final) ScheduleFinal();
    if (del) delete this;
  }

  void ScheduleFinal() {
    env_.pool->SubmitReserved([this](absl::Status pool_status) {
      absl::StatusOr<Resp> r = !pool_status.ok() ? absl::StatusOr<Resp>(pool_status)
                               : cancelled_.load() ? absl::StatusOr<Resp>(absl::CancelledError("stream cancelled"))
                                                   : MakeFinal();
      Complete([this, &r] {
        if (r.ok()) {
          final_ = *std::move(r);
          final_ready_ = true;
        } else {
          SetError(r.status());
        }
      });
    });
  }

  // The state machine. Returns true when the final task must be scheduled (by the caller, after
  // releasing mu_, because the pool may run a task inline when it is shutting down).
  bool Step() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return false;
    if (error_.ok() && cancelled_.load()) error_ = absl::CancelledError("stream cancelled by the client");
    if (!error_.ok()) {
      if (writing_) return false;  // finish once the write in flight completes
      FinishWith(error_);
      return false;
    }
    if (!writing_) {
      auto it = ready_.find(next_write_);
      if (it != ready_.end()) {
        write_buf_.Clear();
        absl::Status s = Account(it->second, &write_buf_);
        ready_.erase(it);
        if (!s.ok()) {
          FinishWith(s);
          return false;
        }
        writing_ = true;
        this->StartWrite(&write_buf_, grpc::WriteOptions().set_no_compression());
      } else if (final_ready_ && !final_in_flight_ && !final_written_) {
        final_ready_ = false;
        final_in_flight_ = true;
        writing_ = true;
        this->StartWrite(&final_, grpc::WriteOptions().set_no_compression());
      } else if (final_written_) {
        FinishWith(absl::OkStatus());
        return false;
      }
    }
    if (!reading_ && !read_done_ && inflight_ < env_.options->max_inflight_pages_per_stream) {
      reading_ = true;
      this->StartRead(&req_);
    }
    if (read_done_ && inflight_ == 0 && !writing_ && !final_scheduled_) {
      if (!got_header_) {
        FinishWith(absl::InvalidArgumentError("the stream ended before its header message"));
        return false;
      }
      final_scheduled_ = true;
      ++pending_;
      return true;
    }
    return false;
  }

  void FinishWith(const absl::Status& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    finished_ = true;
    ready_.clear();  // frees buffered results now rather than at deletion
    if (env_.metrics) env_.metrics->RecordRpc(method_, s.code(), SecondsSince(start_));
    this->Finish(ToGrpcStatus(s));
  }

  const char* const method_;
  const Clock::time_point start_;
  Req req_;        // the one read buffer; its payload is moved out before the next read
  bool got_header_ = false;  // gRPC read thread only (reads are serialised)
  uint64_t next_seq_ = 0;    // gRPC read thread only

  absl::Mutex mu_;
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  bool read_done_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool final_scheduled_ ABSL_GUARDED_BY(mu_) = false;
  bool final_ready_ ABSL_GUARDED_BY(mu_) = false;
  bool final_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool final_written_ ABSL_GUARDED_BY(mu_) = false;
  uint32_t inflight_ ABSL_GUARDED_BY(mu_) = 0;  // scheduled or waiting to be written
  uint32_t pending_ ABSL_GUARDED_BY(mu_) = 0;   // tasks on the pool that point at this object
  uint64_t next_write_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<uint64_t, Result> ready_ ABSL_GUARDED_BY(mu_);
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  Resp write_buf_ ABSL_GUARDED_BY(mu_);
  Resp final_ ABSL_GUARDED_BY(mu_);
};

// ----- CompressPages -----

struct CompressResult {
  CompressedPage page;
  v1::CompressedPage resp;  // everything but the frame, which is moved in at write time
};

class CompressReactor final
    : public PageStream<v1::CompressPagesRequest, v1::CompressPagesResponse, CompressResult> {
 public:
  CompressReactor(const StreamEnv& env, grpc::CallbackServerContext* ctx)
      : PageStream(env, ctx, "CompressPages") {
    Start();
  }

 private:
  absl::Status OnHeader(const v1::CompressPagesRequest& req) override {
    if (!req.has_header()) {
      return absl::InvalidArgumentError("the first CompressPages message must carry `header`");
    }
    const v1::CompressStreamHeader& h = req.header();
    FQ_ASSIGN_OR_RETURN(auto entry, env_.registry->Lookup(h.profile_digest()));
    FQ_ASSIGN_OR_RETURN(dtype_, FromProtoDType(h.input_dtype(), "header.input_dtype"));
    const uint32_t d = entry->codec->profile().shape.head_dim;
    if (h.queries_size() % d != 0) {
      return absl::InvalidArgumentError(absl::StrCat("header.queries holds ", h.queries_size(),
                                                     " values, not a multiple of head_dim ", d));
    }
    if (static_cast<size_t>(h.queries_size()) / d > kMaxStreamQueries) {
      return absl::ResourceExhaustedError(absl::StrCat("header.queries holds ", h.queries_size() / d,
                                                       " queries; the limit is ", kMaxStreamQueries));
    }
    if (h.label().size() > kMaxLabelBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.label is ", h.label().size(), " bytes; the limit is ", kMaxLabelBytes));
    }
    codec_ = entry->codec;
    queries_ = std::make_shared<const std::vector<float>>(h.queries().begin(), h.queries().end());
    return_metrics_ = h.return_page_metrics();
    options_.compute_metrics = return_metrics_ || !queries_->empty() ||
                               codec_->profile().quality_budget.has_any_metric();
    label_ = h.label();
    builder_.emplace(codec_);
    return absl::OkStatus();
  }

  absl::StatusOr<Work> PreparePage(v1::CompressPagesRequest& req, uint64_t seq) override {
    const std::string where = absl::StrCat("page ", seq, ": ");
    if (!req.has_page()) {
      return absl::InvalidArgumentError(absl::StrCat(where, "after the header every message must carry `page`"));
    }
    v1::RawPage* page = req.mutable_page();
    if (page->data().size() > env_.options->max_page_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(where, "data is ", page->data().size(),
                                                       " bytes; max_page_bytes is ", env_.options->max_page_bytes));
    }
    const auto& c = page->coordinates();
    KvPageCoords coords{c.batch(), c.layer(), c.kv_head(), c.token_start(), c.token_count()};
    FQ_RETURN_IF_ERROR(Prefixed(codec_->CheckCoords(coords), where));
    const uint64_t want = uint64_t{coords.token_count} * codec_->profile().shape.head_dim * DTypeSize(dtype_);
    if (page->data().size() != want) {
      return absl::InvalidArgumentError(absl::StrCat(where, "data is ", page->data().size(), " bytes; ",
                                                     coords.token_count, " tokens x head_dim ",
                                                     codec_->profile().shape.head_dim, " x ",
                                                     std::string(DTypeName(dtype_)), " need ", want));
    }
    auto data = std::make_shared<std::string>(std::move(*page->mutable_data()));
    const uint64_t client_seq = page->client_sequence();
    return Work([codec = codec_, queries = queries_, data, coords, dtype = dtype_, opts = options_,
                 want_metrics = return_metrics_, seq, client_seq, where, metrics = env_.metrics]() mutable
                -> absl::StatusOr<CompressResult> {
      KvPageInput in;
      in.coords = coords;
      in.dtype = dtype;
      in.data = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(data->data()), data->size());
      in.queries = absl::Span<const float>(queries->data(), queries->size());
      auto page = codec->CompressPage(in, opts);
      if (!page.ok()) return Prefixed(page.status(), where);
      RecordPageMetrics(metrics, *page);
      CompressResult r;
      r.resp.set_sequence(seq);
      r.resp.set_client_sequence(client_seq);
      auto* rc = r.resp.mutable_coordinates();
      rc->set_batch(coords.batch);
      rc->set_layer(coords.layer);
      rc->set_kv_head(coords.kv_head);
      rc->set_token_start(coords.token_start);
      rc->set_token_count(coords.token_count);
      r.resp.set_frame_digest(RenderDigest(page->frame_digest));
      if (want_metrics) FillPageMetrics(*page, r.resp.mutable_metrics());
      r.page = *std::move(page);
      return r;
    });
  }

  absl::Status Account(CompressResult& r, v1::CompressPagesResponse* out) override {
    FQ_RETURN_IF_ERROR(builder_->Add(r.page));
    v1::CompressedPage* p = out->mutable_page();
    *p = std::move(r.resp);
    p->set_frame(std::move(r.page.frame));
    return absl::OkStatus();
  }

  absl::StatusOr<v1::CompressPagesResponse> MakeFinal() override {
    FQ_ASSIGN_OR_RETURN(KvReceipt kr, builder_->Finish(NowUnixSeconds()));
    v1::Receipt r;
    r.set_operation("compress");
    r.set_profile_digest(kr.profile_digest);
    r.set_pages(kr.pages);
    r.set_compressed_vectors(kr.vectors_compressed);
    r.set_raw_vectors(kr.vectors - kr.vectors_compressed);
    r.set_input_bytes(kr.bytes_in);
    r.set_output_bytes(kr.bytes_out);
    r.set_compression_ratio(kr.compression_ratio);
    for (const auto& reason : kr.raw_reasons) r.add_fallback_reasons(reason);
    r.set_receipt_json(kr.ToJson());
    r.set_receipt_digest(kr.digest);
    r.set_recorded_unix_seconds(kr.recorded_unix_seconds.value_or(NowUnixSeconds()));
    r.set_label(label_);
    FQ_ASSIGN_OR_RETURN(v1::Receipt stored, env_.registry->AddReceipt(std::move(r)));
    v1::CompressPagesResponse out;
    *out.mutable_receipt() = std::move(stored);
    return out;
  }

  std::shared_ptr<const KvCodec> codec_;
  std::shared_ptr<const std::vector<float>> queries_;
  DType dtype_ = DType::kF32;
  KvCompressOptions options_;
  bool return_metrics_ = false;
  std::string label_;
  std::optional<KvReceiptBuilder> builder_;  // used under the base's mu_ (Account) and by MakeFinal
                                             // (after the last Account)
};

// ----- DecompressPages -----

struct DecompressResult {
  v1::DecompressPagesResponse resp;
  uint64_t frame_bytes = 0;
  uint64_t raw_bytes = 0;
  uint64_t coded = 0;
  uint64_t raw_vectors = 0;
  std::array<uint8_t, 32> frame_digest{};
};

class DecompressReactor final
    : public PageStream<v1::DecompressPagesRequest, v1::DecompressPagesResponse, DecompressResult> {
 public:
  DecompressReactor(const StreamEnv& env, grpc::CallbackServerContext* ctx)
      : PageStream(env, ctx, "DecompressPages"), frames_(std::string("fq_server_decode_receipt_v1")) {
    Start();
  }

 private:
  absl::Status OnHeader(const v1::DecompressPagesRequest& req) override {
    if (!req.has_header()) {
      return absl::InvalidArgumentError("the first DecompressPages message must carry `header`");
    }
    FQ_ASSIGN_OR_RETURN(dtype_, FromProtoDType(req.header().output_dtype(), "header.output_dtype"));
    only_profile_ = req.header().profile_digest();
    if (!only_profile_.empty()) {
      FQ_RETURN_IF_ERROR(env_.registry->Lookup(only_profile_).status());
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Work> PreparePage(v1::DecompressPagesRequest& req, uint64_t seq) override {
    const std::string where = absl::StrCat("page ", seq, ": ");
    if (!req.has_frame()) {
      return absl::InvalidArgumentError(absl::StrCat(where, "after the header every message must carry `frame`"));
    }
    auto frame = std::make_shared<std::string>(std::move(*req.mutable_frame()->mutable_frame()));
    if (frame->size() > env_.options->max_page_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(where, "frame is ", frame->size(),
                                                       " bytes; max_page_bytes is ", env_.options->max_page_bytes));
    }
    auto header = InspectFrame(absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(frame->data()),
                                                         frame->size()));
    if (!header.ok()) return Prefixed(header.status(), where);
    const std::string digest = RenderDigest(header->profile_digest);
    if (!only_profile_.empty() && digest != only_profile_) {
      return absl::InvalidArgumentError(absl::StrCat(where, "frame belongs to profile ", digest,
                                                     ", the header restricts the stream to ", only_profile_));
    }
    auto entry = env_.registry->Lookup(digest);
    if (!entry.ok()) return Prefixed(entry.status(), where);
    if (first_profile_.empty()) first_profile_ = digest;
    const uint64_t client_seq = req.frame().client_sequence();
    return Work([codec = (*entry)->codec, frame, dtype = dtype_, seq, client_seq, where, digest,
                 metrics = env_.metrics]() -> absl::StatusOr<DecompressResult> {
      auto span = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(frame->data()), frame->size());
      auto page = codec->DecodeFrame(span, dtype);
      if (!page.ok()) return Prefixed(page.status(), where);
      DecompressResult r;
      r.frame_bytes = frame->size();
      r.raw_bytes = page->data.size();
      r.coded = page->counts.coded;
      r.raw_vectors = page->counts.raw_total();
      Sha256Hasher h;
      h.Update(*frame);
      r.frame_digest = h.FinishRaw();
      v1::DecodedPage* out = r.resp.mutable_page();
      out->set_sequence(seq);
      out->set_client_sequence(client_seq);
      out->set_profile_digest(digest);
      auto* c = out->mutable_coordinates();
      c->set_batch(page->coords.batch);
      c->set_layer(page->coords.layer);
      c->set_kv_head(page->coords.kv_head);
      c->set_token_start(page->coords.token_start);
      c->set_token_count(page->coords.token_count);
      out->set_data(reinterpret_cast<const char*>(page->data.data()), page->data.size());
      if (metrics) {
        metrics->AddPages("decompress", 1);
        metrics->AddBytes("compressed_in", r.frame_bytes);
        metrics->AddBytes("raw_out", r.raw_bytes);
      }
      return r;
    });
  }

  absl::Status Account(DecompressResult& r, v1::DecompressPagesResponse* out) override {
    ++pages_;
    frame_bytes_ += r.frame_bytes;
    raw_bytes_ += r.raw_bytes;
    coded_ += r.coded;
    raw_vectors_ += r.raw_vectors;
    frames_.Bytes(r.frame_digest.data(), r.frame_digest.size());
    *out = std::move(r.resp);
    return absl::OkStatus();
  }

  absl::StatusOr<v1::DecompressPagesResponse> MakeFinal() override {
    v1::Receipt r;
    r.set_operation("decompress");
    r.set_profile_digest(only_profile_.empty() ? first_profile_ : only_profile_);
    r.set_pages(pages_);
    r.set_compressed_vectors(coded_);
    r.set_raw_vectors(raw_vectors_);
    r.set_input_bytes(frame_bytes_);
    r.set_output_bytes(raw_bytes_);
    r.set_compression_ratio(frame_bytes_ == 0 ? 0.0
                                              : static_cast<double>(raw_bytes_) / static_cast<double>(frame_bytes_));
    // The decode receipt's digest binds the ordered frame digests and the totals.
    CanonicalWriter w = frames_;
    w.Str(r.profile_digest());
    w.U8(static_cast<uint8_t>(dtype_));
    w.U64(pages_);
    w.U64(frame_bytes_);
    w.U64(raw_bytes_);
    w.U64(coded_);
    w.U64(raw_vectors_);
    const std::string digest = w.Digest();
    const int64_t now = NowUnixSeconds();
    json j = {{"schema_version", "fq_server_decode_receipt_v1"},
              {"profile_digest", r.profile_digest()},
              {"output_dtype", std::string(DTypeName(dtype_))},
              {"pages", pages_},
              {"frame_bytes", frame_bytes_},
              {"raw_bytes", raw_bytes_},
              {"vectors_compressed", coded_},
              {"vectors_raw", raw_vectors_},
              {"frames_digest", Sha256Digest(frames_.bytes())},
              {"digest", digest},
              {"recorded_unix_seconds", now}};
    r.set_receipt_json(j.dump(2));
    r.set_receipt_digest(digest);
    r.set_recorded_unix_seconds(now);
    FQ_ASSIGN_OR_RETURN(v1::Receipt stored, env_.registry->AddReceipt(std::move(r)));
    v1::DecompressPagesResponse out;
    *out.mutable_receipt() = std::move(stored);
    return out;
  }

  DType dtype_ = DType::kF32;
  std::string only_profile_;
  std::string first_profile_;  // gRPC read thread
  // Written by Account (under the base's mu_, in order) and read by MakeFinal (after the last one).
  uint64_t pages_ = 0, frame_bytes_ = 0, raw_bytes_ = 0, coded_ = 0, raw_vectors_ = 0;
  CanonicalWriter frames_;  // ordered raw frame digests
};

}  // namespace

// ----- construction -----

KvCompressionServiceImpl::KvCompressionServiceImpl(const ServiceOptions& options, Metrics* metrics)
    : options_(options), metrics_(metrics) {}

KvCompressionServiceImpl::~KvCompressionServiceImpl() {
  // A stream's OnDone may still be finishing on a gRPC thread just after the server's shutdown
  // returned; its last act is decrementing open_streams_, so wait (bounded) for that before the
  // pools and the registry it used go away.
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (open_streams_.load(std::memory_order_acquire) != 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (const uint32_t open = open_streams_.load(); open != 0) {
    std::fprintf(stderr, "fibquant: service destroyed with %u stream(s) still open\n", open);
  }
  // Runs (with Cancelled) any task still queued, so nothing outlives the service. Builds first: a
  // cancelled build tells its waiters, which finish their reactors (no pool needed).
  if (build_pool_) build_pool_->Shutdown();
  if (pool_) pool_->Shutdown();
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
  RegistryOptions ro;
  ro.data_dir = options_.data_dir;
  ro.max_profiles = options_.max_profiles;
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

size_t KvCompressionServiceImpl::profile_count() const { return registry_->size(); }

absl::StatusOr<KvCompressionProfile> KvCompressionServiceImpl::ParseSpec(const v1::KvProfileSpec* structured,
                                                                       const std::string* spec_json) const {
  absl::StatusOr<KvCompressionProfile> p =
      structured != nullptr ? KvCompressionProfile::FromSpecJson(SpecToJson(*structured))
                            : KvCompressionProfile::FromSpecJson(*spec_json);
  if (!p.ok()) return p.status();
  FQ_RETURN_IF_ERROR(CheckBuildCost(*p, options_.max_profile_build_cost));
  return p;
}

KvCompressionServiceImpl::BuildResult KvCompressionServiceImpl::BuildAndStore(KvCompressionProfile profile,
                                                                             bool* inserted) {
  builds_started_.fetch_add(1);
  const auto t0 = Clock::now();
  FQ_ASSIGN_OR_RETURN(std::shared_ptr<const KvCodec> codec, KvCodec::Build(std::move(profile), options_.build_threads));
  const double seconds = SecondsSince(t0);
  if (metrics_) metrics_->ObserveBuildSeconds(seconds);
  ProfileEntry e;
  e.digest = codec->profile_digest();
  e.profile_json = codec->profile().ToJson();
  e.codec = std::move(codec);
  e.build_seconds = seconds;
  e.build_threads = options_.build_threads == 0 ? static_cast<int>(std::thread::hardware_concurrency())
                                                : options_.build_threads;
  return registry_->Insert(std::move(e), inserted);
}

size_t KvCompressionServiceImpl::builds_in_flight() const {
  absl::MutexLock lock(&spec_mu_);
  return flights_.size();
}

size_t KvCompressionServiceImpl::build_waiters() const {
  absl::MutexLock lock(&spec_mu_);
  size_t n = 0;
  for (const auto& [key, flight] : flights_) n += flight.waiters.size();
  return n;
}

absl::Status KvCompressionServiceImpl::JoinFlight(const std::string& key, const grpc::ServerContextBase* ctx,
                                                  BuildWaiter waiter, bool* lead) {
  absl::MutexLock lock(&spec_mu_);
  auto it = flights_.find(key);
  *lead = it == flights_.end();
  if (*lead) {
    it = flights_.emplace(key, Flight{}).first;
    if (metrics_) metrics_->SetBuildsInFlight(static_cast<int64_t>(flights_.size()));
  } else if (it->second.waiters.size() >= options_.worker_queue_capacity) {
    return absl::ResourceExhaustedError(absl::StrCat(
        it->second.waiters.size(), " registrations already wait for the build of this spec "
        "(worker_queue_capacity ", options_.worker_queue_capacity, "); retry later"));
  }
  it->second.waiters.push_back(Flight::Waiter{ctx, std::move(waiter)});
  return absl::OkStatus();
}

void KvCompressionServiceImpl::RunFlight(const std::string& key, KvCompressionProfile profile,
                                         const absl::Status& pool_status) {
  if (!pool_status.ok()) {
    FinishFlight(key, absl::UnavailableError("server is shutting down"), false);
    return;
  }
  // Skip the build only if nobody is left to want it: one waiter's cancellation does not cancel
  // the build the others wait for.
  bool all_cancelled = false;
  {
    absl::MutexLock lock(&spec_mu_);
    auto it = flights_.find(key);
    all_cancelled = it != flights_.end() &&
                    std::all_of(it->second.waiters.begin(), it->second.waiters.end(), [](const Flight::Waiter& w) {
                      return w.ctx != nullptr && w.ctx->IsCancelled();
                    });
  }
  if (all_cancelled) {
    FinishFlight(key, absl::CancelledError("RegisterProfile cancelled before its build started"), false);
    return;
  }
  // A flight started just after another build of this spec finished: nothing to build.
  if (auto existing = FindSpec(profile)) {
    FinishFlight(key, existing, false);
    return;
  }
  if (absl::Status cap = registry_->CheckCapacity(); !cap.ok()) {
    FinishFlight(key, cap, false);
    return;
  }
  bool inserted = false;
  BuildResult built = BuildAndStore(std::move(profile), &inserted);
  FinishFlight(key, built, inserted);
}

void KvCompressionServiceImpl::FinishFlight(const std::string& key, const BuildResult& result, bool inserted) {
  std::vector<Flight::Waiter> waiters;
  {
    absl::MutexLock lock(&spec_mu_);
    if (result.ok()) spec_digests_[key] = (*result)->digest;
    auto it = flights_.find(key);
    if (it != flights_.end()) {
      waiters = std::move(it->second.waiters);
      flights_.erase(it);
    }
    if (metrics_) metrics_->SetBuildsInFlight(static_cast<int64_t>(flights_.size()));
  }
  for (size_t i = 0; i < waiters.size(); ++i) std::move(waiters[i].done)(result, i == 0 && inserted);
}

std::shared_ptr<const ProfileEntry> KvCompressionServiceImpl::FindSpec(const KvCompressionProfile& p) const {
  std::string digest;
  {
    absl::MutexLock lock(&spec_mu_);
    auto it = spec_digests_.find(SpecKey(p));
    if (it == spec_digests_.end()) return nullptr;
    digest = it->second;
  }
  auto e = registry_->Lookup(digest);
  return e.ok() ? *e : nullptr;
}

absl::Status KvCompressionServiceImpl::PreloadDir(const std::string& dir) {
  std::error_code ec;
  std::vector<std::string> files;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    if (it->path().extension() == ".json" && it->is_regular_file(ec)) files.push_back(it->path().string());
  }
  if (ec) return absl::NotFoundError(absl::StrCat("cannot list preload dir ", dir, ": ", ec.message()));
  std::sort(files.begin(), files.end());
  absl::Status first;
  for (const std::string& f : files) {
    absl::Status s = [&]() -> absl::Status {
      std::error_code fec;
      const uint64_t size = fs::file_size(f, fec);
      if (fec) return absl::InternalError(absl::StrCat("cannot stat: ", fec.message()));
      if (size > kMaxPreloadFileBytes) {
        return absl::ResourceExhaustedError(absl::StrCat("spec file is ", size, " bytes; the limit is ",
                                                         kMaxPreloadFileBytes));
      }
      std::ifstream in(f, std::ios::binary);
      std::stringstream ss;
      ss << in.rdbuf();
      const std::string text = ss.str();
      FQ_ASSIGN_OR_RETURN(KvCompressionProfile p, ParseSpec(nullptr, &text));
      if (FindSpec(p) != nullptr) return absl::OkStatus();
      // Single-flight with RegisterProfile: build here, or wait for the build already running.
      const std::string key = SpecKey(p);
      absl::Notification done;
      BuildResult result = absl::UnknownError("no result");
      bool lead = false;
      FQ_RETURN_IF_ERROR(JoinFlight(key, nullptr, [&](const BuildResult& r, bool /*inserted*/) {
        result = r;
        done.Notify();
      }, &lead));
      if (lead) RunFlight(key, std::move(p), absl::OkStatus());
      done.WaitForNotification();
      FQ_RETURN_IF_ERROR(result.status());
      std::fprintf(stderr, "fibquant: preloaded %s as %s\n", f.c_str(), (*result)->digest.c_str());
      return absl::OkStatus();
    }();
    if (!s.ok()) {
      std::fprintf(stderr, "fibquant: preload of %s failed: %s\n", f.c_str(), s.ToString().c_str());
      if (first.ok()) first = Prefixed(s, absl::StrCat(f, ": "));
    }
  }
  return first;
}

// ----- unary RPCs -----

grpc::ServerUnaryReactor* KvCompressionServiceImpl::RegisterProfile(grpc::CallbackServerContext* ctx,
                                                                    const v1::RegisterProfileRequest* req,
                                                                    v1::RegisterProfileResponse* resp) {
  auto* reactor = ctx->DefaultReactor();
  const UnaryFinisher finish(metrics_, reactor, "RegisterProfile");
  if (options_.authorize_admin) {
    if (absl::Status auth = options_.authorize_admin(*ctx); !auth.ok()) {
      finish(auth);
      return reactor;
    }
  }
  if (draining_.load()) {
    finish(absl::UnavailableError("server is draining; registrations are refused"));
    return reactor;
  }
  absl::StatusOr<KvCompressionProfile> profile;
  if (req->has_structured()) {
    profile = ParseSpec(&req->structured(), nullptr);
  } else if (req->has_spec_json()) {
    profile = ParseSpec(nullptr, &req->spec_json());
  } else {
    profile = absl::InvalidArgumentError("RegisterProfileRequest needs `structured` or `spec_json`");
  }
  if (!profile.ok()) {
    finish(profile.status());
    return reactor;
  }
  if (auto existing = FindSpec(*profile)) {
    FillProfileInfo(*existing, resp->mutable_profile());
    resp->set_already_registered(true);
    finish(absl::OkStatus());
    return reactor;
  }
  if (absl::Status cap = registry_->CheckCapacity(); !cap.ok()) {
    finish(cap);
    return reactor;
  }
  // Single-flight: this reactor finishes when the build of its spec does, whether this call
  // started it or joined one in flight; no thread waits meanwhile.
  const std::string key = SpecKey(*profile);
  bool lead = false;
  absl::Status joined = JoinFlight(key, ctx, [resp, finish](const BuildResult& entry, bool inserted) {
    if (!entry.ok()) {
      finish(entry.status());
      return;
    }
    FillProfileInfo(**entry, resp->mutable_profile());
    resp->set_already_registered(!inserted);
    finish(absl::OkStatus());
  }, &lead);
  if (!joined.ok()) {
    finish(joined);
    return reactor;
  }
  if (!lead) return reactor;
  // The build runs on the build pool. If it cannot be queued, the flight fails: this call and any
  // registration that joined it meanwhile get the pool's error.
  absl::Status submitted = build_pool_->Submit(
      [this, key, p = *std::move(profile)](absl::Status pool_status) mutable {
        RunFlight(key, std::move(p), pool_status);
      });
  if (!submitted.ok()) FinishFlight(key, submitted, false);
  return reactor;
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::GetProfile(grpc::CallbackServerContext* ctx,
                                                               const v1::GetProfileRequest* req,
                                                               v1::GetProfileResponse* resp) {
  return UnaryNow(metrics_, ctx, "GetProfile", [&]() -> absl::Status {
    FQ_ASSIGN_OR_RETURN(auto e, registry_->Lookup(req->digest()));
    FillProfileInfo(*e, resp->mutable_profile());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::ListProfiles(grpc::CallbackServerContext* ctx,
                                                                 const v1::ListProfilesRequest* req,
                                                                 v1::ListProfilesResponse* resp) {
  return UnaryNow(metrics_, ctx, "ListProfiles", [&]() -> absl::Status {
    if (!req->page_token().empty() && !IsDigestString(req->page_token())) {
      return absl::InvalidArgumentError("page_token is not a token returned by ListProfiles");
    }
    uint32_t n = req->page_size() == 0 ? kDefaultListPageSize : std::min(req->page_size(), kMaxListPageSize);
    auto entries = registry_->List(req->page_token(), n + 1);
    const bool more = entries.size() > n;
    if (more) entries.resize(n);
    for (const auto& e : entries) FillProfileInfo(*e, resp->add_profiles());
    if (more && !entries.empty()) resp->set_next_page_token(entries.back()->digest);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::GetCodebook(grpc::CallbackServerContext* ctx,
                                                                const v1::GetCodebookRequest* req,
                                                                v1::GetCodebookResponse* resp) {
  return UnaryNow(metrics_, ctx, "GetCodebook", [&]() -> absl::Status {
    FQ_ASSIGN_OR_RETURN(auto e, registry_->Lookup(req->digest()));
    const auto& q = e->codec->quantizer();
    if (!q) {
      return absl::FailedPreconditionError(
          absl::StrCat("profile ", req->digest(), " uses axis_policy raw; it has no codebook"));
    }
    const Codebook& cb = q->codebook();
    const Rotation& rot = q->rotation();
    const uint64_t matrix_bytes = uint64_t{rot.dim()} * rot.dim() * sizeof(double);
    const uint64_t codebook_bytes = cb.codewords().size() * sizeof(float);
    if (codebook_bytes + (req->include_rotation_matrix() ? matrix_bytes : 0) + 4096 > options_.max_message_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the codebook", req->include_rotation_matrix() ? " and rotation matrix" : "", " need ",
          codebook_bytes + (req->include_rotation_matrix() ? matrix_bytes : 0),
          " bytes, above max_message_bytes ", options_.max_message_bytes,
          req->include_rotation_matrix() ? "; regenerate the rotation from (algorithm, dim, seed) instead" : ""));
    }
    resp->set_profile_digest(e->digest);
    resp->set_fibquant_profile_json(cb.profile().ToJson());
    resp->set_fibquant_profile_digest(cb.profile_digest());
    resp->set_codebook_digest(cb.digest());
    resp->mutable_codewords()->Assign(cb.codewords().begin(), cb.codewords().end());
    resp->set_codebook_size(cb.size());
    resp->set_block_dim(cb.dim());
    resp->set_wire_index_bits(cb.profile().wire_index_bits);
    v1::RotationParams* rp = resp->mutable_rotation();
    rp->set_algorithm(rot.algorithm());
    rp->set_dim(rot.dim());
    rp->set_seed(rot.seed());
    rp->set_digest(rot.digest());
    if (req->include_rotation_matrix()) rp->mutable_matrix()->Assign(rot.matrix().begin(), rot.matrix().end());
    for (int8_t sgn : rot.signs()) rp->add_signs(sgn);
    v1::ProfileInfo info;
    FillProfileInfo(*e, &info);
    *resp->mutable_build_stats() = info.build_stats();
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::GetReceipt(grpc::CallbackServerContext* ctx,
                                                               const v1::GetReceiptRequest* req,
                                                               v1::GetReceiptResponse* resp) {
  return UnaryNow(metrics_, ctx, "GetReceipt", [&]() -> absl::Status {
    if (req->receipt_id().empty()) return absl::InvalidArgumentError("receipt_id is required");
    FQ_ASSIGN_OR_RETURN(*resp->mutable_receipt(), registry_->GetReceipt(req->receipt_id()));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::ListReceipts(grpc::CallbackServerContext* ctx,
                                                                 const v1::ListReceiptsRequest* req,
                                                                 v1::ListReceiptsResponse* resp) {
  return UnaryNow(metrics_, ctx, "ListReceipts", [&]() -> absl::Status {
    // The token is the id of the last receipt returned: ids only grow, so pages stay stable while
    // new receipts arrive.
    uint64_t before = std::numeric_limits<uint64_t>::max();
    if (!req->page_token().empty()) {
      const std::string& t = req->page_token();
      if (t.rfind("rcpt-", 0) != 0 || !absl::SimpleAtoi(t.substr(5), &before)) {
        return absl::InvalidArgumentError("page_token is not a token returned by ListReceipts");
      }
    }
    uint32_t n = req->page_size() == 0 ? kDefaultListPageSize : std::min(req->page_size(), kMaxListPageSize);
    bool more = false;
    auto receipts = registry_->ListReceipts(req->profile_digest(), before, n, &more);
    if (more && !receipts.empty()) resp->set_next_page_token(receipts.back().receipt_id());
    for (auto& r : receipts) *resp->add_receipts() = std::move(r);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::EvaluateQuality(grpc::CallbackServerContext* ctx,
                                                                    const v1::EvaluateQualityRequest* req,
                                                                    v1::EvaluateQualityResponse* resp) {
  auto* reactor = ctx->DefaultReactor();
  const UnaryFinisher finish(metrics_, reactor, "EvaluateQuality");
  std::vector<std::shared_ptr<const KvCodec>> codecs;
  std::vector<KvCompressionProfile> candidates;
  absl::Status s = [&]() -> absl::Status {
    for (const auto& [name, size] : {std::pair<const char*, int>{"keys", req->keys_size()},
                                     {"values", req->values_size()},
                                     {"queries", req->queries_size()}}) {
      if (static_cast<uint64_t>(size) > options_.max_eval_values) {
        return absl::ResourceExhaustedError(absl::StrCat(name, " hold ", size, " values; max_eval_values is ",
                                                         options_.max_eval_values));
      }
    }
    const size_t total = static_cast<size_t>(req->profile_digests_size()) + req->candidates_size() +
                         req->candidate_spec_jsons_size();
    if (total == 0) {
      return absl::InvalidArgumentError("give at least one of profile_digests, candidates, candidate_spec_jsons");
    }
    if (total > options_.max_eval_profiles) {
      return absl::ResourceExhaustedError(absl::StrCat(total, " profiles to evaluate; max_eval_profiles is ",
                                                       options_.max_eval_profiles));
    }
    for (const auto& d : req->profile_digests()) {
      FQ_ASSIGN_OR_RETURN(auto e, registry_->Lookup(d));
      codecs.push_back(e->codec);
    }
    for (int i = 0; i < req->candidates_size(); ++i) {
      auto p = ParseSpec(&req->candidates(i), nullptr);
      if (!p.ok()) return Prefixed(p.status(), absl::StrCat("candidates[", i, "]: "));
      candidates.push_back(*std::move(p));
    }
    for (int i = 0; i < req->candidate_spec_jsons_size(); ++i) {
      auto p = ParseSpec(nullptr, &req->candidate_spec_jsons(i));
      if (!p.ok()) return Prefixed(p.status(), absl::StrCat("candidate_spec_jsons[", i, "]: "));
      candidates.push_back(*std::move(p));
    }
    return absl::OkStatus();
  }();
  if (!s.ok()) {
    finish(s);
    return reactor;
  }
  // Candidates are codebook builds: they run on the build pool, never ahead of stream pages.
  WorkerPool* pool = candidates.empty() ? pool_.get() : build_pool_.get();
  absl::Status submitted = pool->Submit([this, ctx, req, resp, finish, codecs = std::move(codecs),
                                          candidates = std::move(candidates)](absl::Status pool_status) mutable {
    if (!pool_status.ok()) {
      finish(absl::UnavailableError("server is shutting down"));
      return;
    }
    absl::Status st = [&]() -> absl::Status {
      for (auto& c : candidates) {
        if (ctx->IsCancelled()) return absl::CancelledError("EvaluateQuality cancelled");
        if (auto existing = FindSpec(c)) {  // a registered spec: reuse its codebook
          codecs.push_back(existing->codec);
          continue;
        }
        FQ_ASSIGN_OR_RETURN(auto codec, KvCodec::Build(std::move(c), options_.build_threads));
        codecs.push_back(std::move(codec));
      }
      for (const auto& codec : codecs) {
        if (ctx->IsCancelled()) return absl::CancelledError("EvaluateQuality cancelled");
        FQ_ASSIGN_OR_RETURN(*resp->add_reports(), EvaluateSample(codec, *req));
      }
      return absl::OkStatus();
    }();
    finish(st);
  });
  if (!submitted.ok()) finish(submitted);
  return reactor;
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                                  const v1::GetServerInfoRequest* /*req*/,
                                                                  v1::GetServerInfoResponse* resp) {
  auto* reactor = ctx->DefaultReactor();
  const UnaryFinisher finish(metrics_, reactor, "GetServerInfo");
  resp->set_version(options_.version);
  resp->add_frame_formats(absl::StrCat("FQKV v", kKvFrameVersion));
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

// ----- streams -----

namespace {
template <typename Reactor, typename Req, typename Resp>
grpc::ServerBidiReactor<Req, Resp>* OpenStream(const StreamEnv& env, grpc::CallbackServerContext* ctx,
                                               bool draining, const char* method) {
  if (draining) {
    return new RejectReactor<Req, Resp>(absl::UnavailableError("server is draining; new streams are refused"),
                                        env.metrics, method);
  }
  const uint32_t before = env.open_streams->fetch_add(1);
  if (before >= env.options->max_concurrent_streams) {
    env.open_streams->fetch_sub(1);
    return new RejectReactor<Req, Resp>(
        absl::ResourceExhaustedError(absl::StrCat(before, " streams are open; max_concurrent_streams is ",
                                                  env.options->max_concurrent_streams)),
        env.metrics, method);
  }
  return new Reactor(env, ctx);  // OnDone releases the stream slot
}
}  // namespace

grpc::ServerBidiReactor<v1::CompressPagesRequest, v1::CompressPagesResponse>*
KvCompressionServiceImpl::CompressPages(grpc::CallbackServerContext* ctx) {
  StreamEnv env{registry_.get(), pool_.get(), metrics_, &options_, &open_streams_};
  return OpenStream<CompressReactor, v1::CompressPagesRequest, v1::CompressPagesResponse>(
      env, ctx, draining_.load(), "CompressPages");
}

grpc::ServerBidiReactor<v1::DecompressPagesRequest, v1::DecompressPagesResponse>*
KvCompressionServiceImpl::DecompressPages(grpc::CallbackServerContext* ctx) {
  StreamEnv env{registry_.get(), pool_.get(), metrics_, &options_, &open_streams_};
  return OpenStream<DecompressReactor, v1::DecompressPagesRequest, v1::DecompressPagesResponse>(
      env, ctx, draining_.load(), "DecompressPages");
}

}  // namespace fibquant::server
