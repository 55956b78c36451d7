// Profile RPCs of KvCompressionServiceImpl: spec parsing, single-flight codebook builds, preload,
// RegisterProfile, GetProfile, ListProfiles and GetCodebook.
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

// A unary reactor that holds the bytes of its answer against --max-buffered-bytes until gRPC is
// done with the call (the answer sent, or the call cancelled), and is watched by the idle reaper
// so a client that withholds HTTP/2 flow control cannot pin the answer beyond the idle timeout
// (issue 14 item 2: 16 GetCodebook calls of a Haar d = 2048 rotation held about 1 GB).
class LeasedUnaryReactor final : public grpc::ServerUnaryReactor {
 public:
  LeasedUnaryReactor(Metrics* metrics, const char* method, grpc::CallbackServerContext* ctx,
                     IdleReaper* reaper)
      : finish_(metrics, this, method), reaper_(reaper), reap_id_(reaper->Register(ctx)) {}
  void FinishWith(const absl::Status& s, Lease lease) {
    lease_ = std::move(lease);
    finish_(s);
  }
  void OnDone() override {
    reaper_->Unregister(reap_id_);
    delete this;  // releases the lease
  }

 private:
  const UnaryFinisher finish_;
  IdleReaper* const reaper_;
  const uint64_t reap_id_;
  Lease lease_;
};
}  // namespace

absl::StatusOr<KvCompressionProfile> KvCompressionServiceImpl::ParseSpec(const v1::KvProfileSpec* structured,
                                                                       const std::string* spec_json) const {
  absl::StatusOr<KvCompressionProfile> p =
      structured != nullptr ? KvCompressionProfile::FromSpecJson(SpecToJson(*structured))
                            : KvCompressionProfile::FromSpecJson(*spec_json);
  if (!p.ok()) return p.status();
  FQ_RETURN_IF_ERROR(CheckBuildCost(*p, options_.max_profile_build_cost));
  if (p->fib_profile.has_value()) {
    // Memory of the build, estimated before it runs (core/lloyd.cc, core/rotation.cc): the f64
    // training samples and per-sample index, distance, order and cell scratch; the search's group
    // bounds (at most 2^25 floats); the codebook and its restart copies; the Haar QR matrices.
    const Profile& f = *p->fib_profile;
    const uint64_t ts = f.training_samples, k = f.block_dim, n = f.codebook_size, d = f.ambient_dim;
    const uint64_t bounds = std::min<uint64_t>(ts * 4 * std::max<uint64_t>(1, n / 64), uint64_t{128} << 20);
    const uint64_t rotation = f.rotation_algorithm == kRotationHaarQr ? 3 * d * d * 8 : d * 8;
    const uint64_t bytes = ts * (8 * k + 32) + bounds + n * k * 8 * 4 + rotation;
    if (bytes > options_.max_build_memory_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "profile build needs about ", bytes, " bytes (training_samples ", ts, " x block_dim ", k,
          ", codebook_size ", n, ", head_dim ", d, "); max_build_memory_bytes (--max-build-memory-bytes) is ",
          options_.max_build_memory_bytes));
    }
  }
  FQ_RETURN_IF_ERROR(CalibrationFor(*p).status());  // a calibrated spec needs its artifact registered
  return p;
}

absl::StatusOr<std::shared_ptr<const KvCalibration>> KvCompressionServiceImpl::CalibrationFor(
    const KvCompressionProfile& profile) const {
  if (profile.channel_transform != KvChannelTransform::kCalibration) return std::shared_ptr<const KvCalibration>();
  auto c = registry_->LookupCalibration(profile.calibration_digest);
  if (!c.ok()) {
    return absl::NotFoundError(absl::StrCat("kv_profile.calibration_digest: calibration ", profile.calibration_digest,
                                            " is not registered (RegisterCalibration first)"));
  }
  return c;
}

KvCompressionServiceImpl::BuildResult KvCompressionServiceImpl::BuildAndStore(KvCompressionProfile profile,
                                                                             bool* inserted,
                                                                             const CancelToken* cancel) {
  builds_started_.fetch_add(1);
  const auto t0 = Clock::now();
  FQ_ASSIGN_OR_RETURN(std::shared_ptr<const KvCalibration> calibration, CalibrationFor(profile));
  FQ_ASSIGN_OR_RETURN(std::shared_ptr<const KvCodec> codec,
                      KvCodec::Build(std::move(profile), options_.build_threads,
                                     cancel != nullptr ? cancel : &builds_cancel_, std::move(calibration)));
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
  // The build stops (Cancelled, at its next Lloyd iteration) at the end of a drain, or once every
  // registration waiting for it has been cancelled (a PreloadDir waiter never is).
  const CancelToken cancel(&builds_cancel_, [this, &key] {
    absl::MutexLock lock(&spec_mu_);
    auto it = flights_.find(key);
    return it != flights_.end() &&
           std::all_of(it->second.waiters.begin(), it->second.waiters.end(),
                       [](const Flight::Waiter& w) { return w.ctx != nullptr && w.ctx->IsCancelled(); });
  });
  bool inserted = false;
  BuildResult built = BuildAndStore(std::move(profile), &inserted, &cancel);
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
      std::fprintf(stderr, "fibquant-server: preloaded %s as %s\n", f.c_str(), (*result)->digest.c_str());
      return absl::OkStatus();
    }();
    if (!s.ok()) {
      std::fprintf(stderr, "fibquant-server: preload of %s failed: %s\n", f.c_str(), s.ToString().c_str());
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

absl::Status KvCompressionServiceImpl::BuildMissingProfile(const std::string& digest,
                                                         const v1::RegisterProfileRequest& registration,
                                                         const grpc::ServerContextBase& ctx) {
  const std::string what = absl::StrCat("profile ", digest, " is not registered on this server");
  if (options_.authorize_admin) {
    if (absl::Status auth = options_.authorize_admin(ctx); !auth.ok()) {
      // Still NOT_FOUND: a client without the token on its streams re-registers through
      // RegisterProfile (with the token) on NOT_FOUND, as it did before streams carried specs.
      return absl::NotFoundError(absl::StrCat(what, " (header.register_if_missing ignored: building needs the "
                                                    "admin token, as RegisterProfile: ", auth.message(), ")"));
    }
  }
  if (draining_.load()) return absl::UnavailableError(absl::StrCat(what, "; server is draining"));
  absl::StatusOr<KvCompressionProfile> profile =
      registration.has_structured() ? ParseSpec(&registration.structured(), nullptr)
      : registration.has_spec_json() ? ParseSpec(nullptr, &registration.spec_json())
                                     : absl::InvalidArgumentError("it has neither `structured` nor `spec_json`");
  if (!profile.ok()) {
    return Prefixed(profile.status(), absl::StrCat(what, "; header.register_if_missing: "));
  }
  if (auto existing = FindSpec(*profile)) {
    return absl::NotFoundError(absl::StrCat(what, "; header.register_if_missing is registered as ",
                                            existing->digest, ", a different profile"));
  }
  FQ_RETURN_IF_ERROR(registry_->CheckCapacity());
  // Single-flight with RegisterProfile; nobody waits (the stream fails now and is retried), and
  // the build is not tied to this stream's lifetime (no context: never cancelled by it).
  const std::string key = SpecKey(*profile);
  bool lead = false;
  FQ_RETURN_IF_ERROR(JoinFlight(key, nullptr, [](const BuildResult&, bool) {}, &lead));
  if (lead) {
    absl::Status submitted = build_pool_->Submit(
        [this, key, p = *std::move(profile)](absl::Status pool_status) mutable {
          RunFlight(key, std::move(p), pool_status);
        });
    if (!submitted.ok()) {
      FinishFlight(key, submitted, false);
      return submitted;
    }
  }
  return absl::UnavailableError(
      absl::StrCat(what, "; building it from header.register_if_missing now: retry shortly"));
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
  auto* reactor = new LeasedUnaryReactor(metrics_, "GetCodebook", ctx, reaper_.get());
  Lease lease;
  absl::Status status = [&]() -> absl::Status {
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
    // The answer's bytes (the repeated fields, then their serialised copy in gRPC's send buffer)
    // are admitted before they are built.
    const uint64_t answer = 2 * (codebook_bytes + (req->include_rotation_matrix() ? matrix_bytes : 0)) + 4096;
    {
      absl::StatusOr<Lease> admitted = budget_->TryAcquire(answer, "GetCodebook answer");
      if (!admitted.ok()) {
        budget_->CountRefusal();
        return admitted.status();
      }
      lease = *std::move(admitted);
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
  }();
  reactor->FinishWith(status, std::move(lease));
  return reactor;
}

}  // namespace fibquant::server
