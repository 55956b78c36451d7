// Page streams of KvCompressionServiceImpl: the CompressPages and DecompressPages bidi reactors
// (protocol in the PageStream comment below) and the stream slot admission.
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
#include "core/kv_frame_auth.h"
#include "core/kv_profile.h"
#include "core/kv_receipt.h"
#include "core/status_macros.h"
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
      : env_(env), ctx_(ctx), method_(method), start_(Clock::now()),
        reap_id_(env.reaper->Register(ctx)) {
    if (env_.metrics) env_.metrics->StreamStarted();
  }

  // Must be called once by the most-derived constructor (virtual dispatch is safe from there).
  void Start() {
    absl::MutexLock lock(&mu_);
    reading_ = true;
    this->StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    env_.reaper->Touch(reap_id_);
    if (!ok) {
      // A half-close, or the end of a call that failed (client cancel, deadline, server shutdown):
      // only the first may lead to a receipt (issue 14 item 5), so a cancelled context is an error.
      const bool call_over = ctx_->IsCancelled();
      Drive([this, call_over] {
        reading_ = false;
        read_done_ = true;
        if (call_over) SetError(absl::CancelledError("the call ended before the client half-closed"));
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
    // The page's memory is admitted against --max-buffered-bytes before its work is scheduled (in
    // Drive, through UnparkLocked); until it fits, no further message is read from this stream.
    const uint64_t bytes = page_bytes_;
    Drive([this, seq, bytes, &work] {
      reading_ = false;
      if (finished_) return;  // the stream already failed: drop the page, read no more
      parked_.emplace(Parked{seq, std::move(*work), bytes});
    });
  }

  void Submit(uint64_t seq, Work work) {
    env_.pool->SubmitReserved([this, seq, w = std::move(work)](absl::Status pool_status) mutable {
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
  }

  void OnWriteDone(bool ok) override {
    env_.reaper->Touch(reap_id_);
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
        leases_.erase(next_write_);  // the page's bytes have left the server
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
    env_.reaper->Unregister(reap_id_);
    if (env_.metrics) env_.metrics->StreamFinished();
    std::atomic<uint32_t>* const open_streams = env_.open_streams;
    bool del;
    std::string withdraw;
    {
      absl::MutexLock lock(&mu_);
      done_ = true;
      del = pending_ == 0;
      // A receipt is kept only for a stream that finished OK and whose status reached the client;
      // a cancel or deadline that raced the final write leaves none (issue 14 item 5).
      if (!stored_receipt_id_.empty() && (!finished_ok_ || ctx_->IsCancelled())) {
        withdraw = stored_receipt_id_;
      }
    }
    if (!withdraw.empty()) env_.registry->RemoveReceipt(withdraw);
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

  // MakeFinal: stores the stream's receipt and remembers its id (withdrawn in OnDone if the
  // stream then fails). A stream that carried no page gets its receipt in the final message but
  // nothing is stored (empty id, persisted false): header-only streams must not evict the
  // receipts of real work from --receipt-retention (issue 14 item 7).
  [[nodiscard]] absl::StatusOr<v1::Receipt> StoreReceipt(v1::Receipt r) {
    if (r.pages() == 0) {
      r.set_persisted(false);
      return r;
    }
    FQ_ASSIGN_OR_RETURN(v1::Receipt stored, env_.registry->AddReceipt(std::move(r)));
    absl::MutexLock lock(&mu_);
    stored_receipt_id_ = stored.receipt_id();
    return stored;
  }

  const StreamEnv env_;
  grpc::CallbackServerContext* const ctx_;
  std::atomic<bool> cancelled_{false};
  // PreparePage: the bytes the page will make the server hold (its payload, its result and the
  // response), admitted against --max-buffered-bytes before the work is scheduled. gRPC read
  // thread only.
  uint64_t page_bytes_ = 0;

 private:
  void SetError(const absl::Status& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (error_.ok()) error_ = s;
  }

  // Applies `update` under mu_, advances the state machine, and schedules the final task if due.
  template <typename F>
  void Drive(F&& update) {
    bool schedule_final;
    std::optional<std::pair<uint64_t, Work>> submit;
    {
      absl::MutexLock lock(&mu_);
      update();
      submit = UnparkLocked();
      schedule_final = Step();
    }
    if (submit) Submit(submit->first, std::move(submit->second));
    if (schedule_final) ScheduleFinal();
  }

  // Admits the parked page when its bytes fit in the budget. While this stream has pages in flight
  // the page waits for them (each write completion retries); with none in flight there is nothing
  // of ours to wait for, so the stream fails with ResourceExhausted naming the flag.
  std::optional<std::pair<uint64_t, Work>> UnparkLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!parked_.has_value()) return std::nullopt;
    if (finished_ || !error_.ok()) {
      parked_.reset();
      return std::nullopt;
    }
    absl::StatusOr<Lease> lease =
        env_.budget->TryAcquire(parked_->bytes, absl::StrCat(method_, " page ", parked_->seq));
    if (!lease.ok()) {
      if (inflight_ == 0) {
        env_.budget->CountRefusal();
        SetError(lease.status());
        parked_.reset();
      } else if (!parked_->waited) {
        env_.budget->CountWait();
        parked_->waited = true;
      }
      return std::nullopt;
    }
    leases_.emplace(parked_->seq, *std::move(lease));
    ++next_seq_;
    ++inflight_;
    ++pending_;
    std::pair<uint64_t, Work> out(parked_->seq, std::move(parked_->work));
    parked_.reset();
    return out;
  }

  // Like Drive, for a task completion: also drops the task's hold on the reactor.
  template <typename F>
  void Complete(F&& update) {
    env_.reaper->Touch(reap_id_);  // registered until OnDone; Touch of a gone id is a no-op
    bool schedule_final, del;
    std::optional<std::pair<uint64_t, Work>> submit;
    {
      absl::MutexLock lock(&mu_);
      --pending_;
      update();
      submit = UnparkLocked();
      schedule_final = Step();
      del = done_ && pending_ == 0;
    }
    if (submit) Submit(submit->first, std::move(submit->second));
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
    if (!reading_ && !read_done_ && !parked_.has_value() &&
        inflight_ < env_.options->max_inflight_pages_per_stream) {
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
    finished_ok_ = s.ok();
    ready_.clear();  // frees buffered results now rather than at deletion
    parked_.reset();
    leases_.clear();
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
  // A page read and validated but not yet admitted against --max-buffered-bytes.
  struct Parked {
    uint64_t seq;
    Work work;
    uint64_t bytes;
    bool waited = false;  // counted in the budget's waits once
  };
  std::optional<Parked> parked_ ABSL_GUARDED_BY(mu_);
  // Bytes of each admitted page, released when its response has been written.
  std::map<uint64_t, Lease> leases_ ABSL_GUARDED_BY(mu_);
  bool finished_ok_ ABSL_GUARDED_BY(mu_) = false;
  std::string stored_receipt_id_ ABSL_GUARDED_BY(mu_);
  const uint64_t reap_id_;
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
    auto found = env_.registry->Lookup(h.profile_digest());
    if (absl::IsNotFound(found.status()) && h.has_register_if_missing() && env_.service != nullptr) {
      return env_.service->BuildMissingProfile(h.profile_digest(), h.register_if_missing(), *ctx_);
    }
    FQ_ASSIGN_OR_RETURN(auto entry, std::move(found));
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
    // The budget's own k, as EvaluateQuality uses: one profile, one verdict rule.
    options_.top_k = codec_->profile().quality_budget.top_k.value_or(kDefaultTopK);
    label_ = h.label();
    builder_.emplace(codec_);
    if (env_.options->frame_keys) keys_ = env_.options->frame_keys();
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
    // The raw page, its frame (at most the raw size plus headers) and the response holding it.
    page_bytes_ = 3 * data->size() + 4096;
    const bool sampled = env_.service != nullptr && env_.metrics != nullptr && env_.service->SampleQuality();
    KvCompressOptions opts = options_;
    const bool metrics_requested = options_.compute_metrics;
    if (sampled) opts.compute_metrics = true;
    return Work([codec = codec_, queries = queries_, data, coords, dtype = dtype_, opts,
                 want_metrics = return_metrics_, seq, client_seq, where, metrics = env_.metrics,
                 keys = keys_, sampled, metrics_requested]() mutable -> absl::StatusOr<CompressResult> {
      const auto started = Clock::now();
      KvPageInput in;
      in.coords = coords;
      in.dtype = dtype;
      in.data = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(data->data()), data->size());
      in.queries = absl::Span<const float>(queries->data(), queries->size());
      auto page = codec->CompressPage(in, opts);
      if (!page.ok()) return Prefixed(page.status(), where);
      if (keys != nullptr) {  // seal; the receipt and frame_digest then cover the sealed bytes
        auto sealed = SealKvFrame(
            absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(page->frame.data()), page->frame.size()),
            *keys);
        if (!sealed.ok()) return Prefixed(sealed.status(), where);
        page->frame = *std::move(sealed);
        Sha256Hasher fh;
        fh.Update(page->frame);
        page->frame_digest = fh.FinishRaw();
      }
      if (metrics != nullptr) {
        metrics->ObservePageSeconds("compress", SecondsSince(started));
        if (sampled && page->metrics.has_value()) {
          // Label: the digest's first 16 hex digits (server-derived; at most --max-profiles values).
          const std::string label = codec->profile_digest().substr(7, 16);
          metrics->ObserveSampledQuality(label, "mse", page->metrics->reconstruction_mse);
          metrics->ObserveSampledQuality(label, "cosine_distance", 1.0 - page->metrics->cosine_similarity);
          if (page->metrics->attention_tv) metrics->ObserveSampledQuality(label, "attention_tv", *page->metrics->attention_tv);
        }
      }
      // Sampled metrics are for the dashboard only: the stream did not ask for them, and its receipt
      // (quality_mean, digest) must not depend on which pages the server happened to sample.
      if (sampled && !metrics_requested) page->metrics.reset();
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
    FQ_ASSIGN_OR_RETURN(v1::Receipt stored, StoreReceipt(std::move(r)));
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
  std::shared_ptr<const KvFrameKeyRing> keys_;  // frame keys of this stream (null: unsealed)
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
  // The page's raw size in its profile's dtype: the compression ratio must not depend on the
  // dtype the client asked the output in (bf16 data decoded to f32 is twice the bytes).
  uint64_t profile_raw_bytes = 0;
  std::array<uint8_t, 32> frame_digest{};
  std::array<uint8_t, 32> output_digest{};  // SHA-256 of the decoded bytes
};

class DecompressReactor final
    : public PageStream<v1::DecompressPagesRequest, v1::DecompressPagesResponse, DecompressResult> {
 public:
  DecompressReactor(const StreamEnv& env, grpc::CallbackServerContext* ctx)
      : PageStream(env, ctx, "DecompressPages"),
        frames_(std::string("fq_server_decode_receipt_v2")),
        outputs_(std::string("fq_server_decode_outputs_v1")) {
    Start();
  }

 private:
  absl::Status OnHeader(const v1::DecompressPagesRequest& req) override {
    if (!req.has_header()) {
      return absl::InvalidArgumentError("the first DecompressPages message must carry `header`");
    }
    FQ_ASSIGN_OR_RETURN(dtype_, FromProtoDType(req.header().output_dtype(), "header.output_dtype"));
    only_profile_ = req.header().profile_digest();
    if (env_.options->frame_keys) keys_ = env_.options->frame_keys();
    if (!only_profile_.empty()) {
      absl::Status found = env_.registry->Lookup(only_profile_).status();
      if (absl::IsNotFound(found) && req.header().has_register_if_missing() && env_.service != nullptr) {
        return env_.service->BuildMissingProfile(only_profile_, req.header().register_if_missing(), *ctx_);
      }
      FQ_RETURN_IF_ERROR(found);
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
    // A small frame can decode to a large page (a 17 KB frame of a head_dim 4096 profile decodes
    // to 64 MiB), so the decoded size, not the frame size, is what the page makes the server hold:
    // the decoder's f32 page, the page in the output dtype and the response holding a copy. The
    // token count comes from the header, capped at the profile's page size (a larger claim is
    // refused by DecodeFrame as DataLoss anyway).
    {
      const KvCompressionProfile& prof = (*entry)->codec->profile();
      const uint64_t tokens = std::min<uint64_t>(header->coords.token_count, prof.page_geometry.tokens_per_page);
      const uint64_t values = tokens * prof.shape.head_dim;
      page_bytes_ = frame->size() + values * (sizeof(float) + 2 * DTypeSize(dtype_)) + 4096;
    }
    return Work([codec = (*entry)->codec, frame, dtype = dtype_, seq, client_seq, where, digest,
                 metrics = env_.metrics, keys = keys_]() -> absl::StatusOr<DecompressResult> {
      const auto started = Clock::now();
      auto span = absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(frame->data()), frame->size());
      if (keys != nullptr) {
        if (absl::Status a = VerifyKvFrameAuth(span, *keys); !a.ok()) return Prefixed(a, where);
      }
      DecompressResult r;
      v1::DecodedPage* out = r.resp.mutable_page();
      // Decoded straight into the response's bytes: no copy of the page.
      auto page = codec->DecodeFrameInto(span, dtype, out->mutable_data());
      if (!page.ok()) return Prefixed(page.status(), where);
      if (metrics != nullptr) metrics->ObservePageSeconds("decompress", SecondsSince(started));
      const std::string& data = out->data();
      r.frame_bytes = frame->size();
      r.raw_bytes = data.size();
      r.coded = page->counts.coded;
      r.raw_vectors = page->counts.raw_total();
      r.profile_raw_bytes = uint64_t{page->coords.token_count} * codec->profile().shape.head_dim *
                            DTypeSize(codec->profile().shape.dtype);
      Sha256Hasher h;
      h.Update(*frame);
      r.frame_digest = h.FinishRaw();
      Sha256Hasher out_hash;
      out_hash.Update(data);
      r.output_digest = out_hash.FinishRaw();
      out->set_sequence(seq);
      out->set_client_sequence(client_seq);
      out->set_profile_digest(digest);
      auto* c = out->mutable_coordinates();
      c->set_batch(page->coords.batch);
      c->set_layer(page->coords.layer);
      c->set_kv_head(page->coords.kv_head);
      c->set_token_start(page->coords.token_start);
      c->set_token_count(page->coords.token_count);
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
    profile_raw_bytes_ += r.profile_raw_bytes;
    frames_.Bytes(r.frame_digest.data(), r.frame_digest.size());
    outputs_.Bytes(r.output_digest.data(), r.output_digest.size());
    const std::string& profile = r.resp.page().profile_digest();
    if (std::find(profiles_.begin(), profiles_.end(), profile) == profiles_.end()) profiles_.push_back(profile);
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
    // Raw size in the profiles' own dtypes over frame bytes: the same figure as the compress
    // receipt's, whatever output dtype was asked for.
    r.set_compression_ratio(frame_bytes_ == 0 ? 0.0
                                              : static_cast<double>(profile_raw_bytes_) /
                                                    static_cast<double>(frame_bytes_));
    // The decode receipt's digest binds the ordered frame digests, the ordered digests of the decoded
    // pages (what was handed out), every profile involved and the totals.
    const std::string output_digest = Sha256Digest(outputs_.bytes());
    CanonicalWriter w = frames_;
    w.Str(output_digest);
    w.U64(profiles_.size());
    for (const auto& p : profiles_) w.Str(p);
    w.U64(profile_raw_bytes_);
    w.Str(r.profile_digest());
    w.U8(static_cast<uint8_t>(dtype_));
    w.U64(pages_);
    w.U64(frame_bytes_);
    w.U64(raw_bytes_);
    w.U64(coded_);
    w.U64(raw_vectors_);
    const std::string digest = w.Digest();
    const int64_t now = NowUnixSeconds();
    json j = {{"schema_version", "fq_server_decode_receipt_v2"},
              {"profile_digest", r.profile_digest()},
              {"profile_digests", profiles_},
              {"output_digest", output_digest},
              {"profile_raw_bytes", profile_raw_bytes_},
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
    FQ_ASSIGN_OR_RETURN(v1::Receipt stored, StoreReceipt(std::move(r)));
    v1::DecompressPagesResponse out;
    *out.mutable_receipt() = std::move(stored);
    return out;
  }

  DType dtype_ = DType::kF32;
  std::shared_ptr<const KvFrameKeyRing> keys_;  // frame keys of this stream (null: not verified)
  std::string only_profile_;
  std::string first_profile_;  // gRPC read thread
  // Written by Account (under the base's mu_, in order) and read by MakeFinal (after the last one).
  uint64_t pages_ = 0, frame_bytes_ = 0, raw_bytes_ = 0, coded_ = 0, raw_vectors_ = 0;
  uint64_t profile_raw_bytes_ = 0;
  CanonicalWriter frames_;   // ordered raw frame digests
  CanonicalWriter outputs_;  // ordered digests of the decoded pages
  std::vector<std::string> profiles_;  // every profile of the stream, in order of first use
};
}  // namespace

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
  StreamEnv env{registry_.get(), pool_.get(), metrics_, &options_, &open_streams_, budget_.get(), reaper_.get(), this};
  return OpenStream<CompressReactor, v1::CompressPagesRequest, v1::CompressPagesResponse>(
      env, ctx, draining_.load(), "CompressPages");
}

grpc::ServerBidiReactor<v1::DecompressPagesRequest, v1::DecompressPagesResponse>*
KvCompressionServiceImpl::DecompressPages(grpc::CallbackServerContext* ctx) {
  StreamEnv env{registry_.get(), pool_.get(), metrics_, &options_, &open_streams_, budget_.get(), reaper_.get(), this};
  return OpenStream<DecompressReactor, v1::DecompressPagesRequest, v1::DecompressPagesResponse>(
      env, ctx, draining_.load(), "DecompressPages");
}

}  // namespace fibquant::server
