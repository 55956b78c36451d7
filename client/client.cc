#include "client/client.h"

#include <algorithm>
#include <condition_variable>
#include <future>
#include <mutex>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/generic/generic_stub.h"

namespace fibquant::client {
namespace {

namespace v1 = fibquant::v1;

// gRPC's default receive limit (4 MiB) is below the server's page and message limits; the server
// enforces its own, so the client accepts whatever the server is willing to send.
grpc::ChannelArguments DefaultChannelArgs(int connection) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  if (connection != 0) {
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    args.SetInt("fibquant.connection", connection);
  }
  return args;
}

// Per-thread generator for backoff jitter (no shared state between client threads).
double JitterFactor() {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  return std::uniform_real_distribution<double>(0.5, 1.0)(gen);
}

}  // namespace

absl::Status ToAbslStatus(const grpc::Status& status, const char* method) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(method, ": ", status.error_message()));
}

std::shared_ptr<grpc::Channel> MakeInsecureChannel(const std::string& target, int connection) {
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(),
                                   DefaultChannelArgs(connection));
}

std::shared_ptr<grpc::Channel> MakeTlsChannel(const std::string& target,
                                              const TlsChannelConfig& config, int connection) {
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = config.root_certs_pem;
  ssl.pem_cert_chain = config.client_cert_chain_pem;
  ssl.pem_private_key = config.client_key_pem;
  grpc::ChannelArguments args = DefaultChannelArgs(connection);
  if (!config.server_name_override.empty()) {
    args.SetSslTargetNameOverride(config.server_name_override);
  }
  return grpc::CreateCustomChannel(target, grpc::SslCredentials(ssl), args);
}

KvClient::KvClient(std::shared_ptr<grpc::Channel> channel, ClientOptions options)
    : channel_(std::move(channel)),
      stub_(v1::KvCompressionService::NewStub(channel_)),
      options_(std::move(options)) {
  options_.max_attempts = std::max(options_.max_attempts, 1);
  options_.max_pages_in_flight = std::max<size_t>(options_.max_pages_in_flight, 1);
}

void KvClient::AddAdminToken(grpc::ClientContext& ctx) const {
  if (!options_.admin_token.empty()) {
    ctx.AddMetadata("authorization", absl::StrCat("Bearer ", options_.admin_token));
  }
}

void KvClient::SetDeadline(grpc::ClientContext& ctx, std::chrono::milliseconds budget) const {
  ctx.set_deadline(std::chrono::system_clock::now() + budget);
}

template <typename Fn>
absl::Status KvClient::WithRetries(Fn&& attempt) {
  std::chrono::duration<double, std::milli> backoff = options_.initial_backoff;
  for (int n = 1;; ++n) {
    absl::Status s = attempt();
    if (s.code() != absl::StatusCode::kUnavailable || n >= options_.max_attempts) return s;
    if (options_.on_retry) options_.on_retry(n + 1, s);
    std::this_thread::sleep_for(backoff * JitterFactor());
    backoff = std::min<std::chrono::duration<double, std::milli>>(
        backoff * options_.backoff_multiplier, options_.max_backoff);
  }
}

// --- registration and recovery --------------------------------------------------------------

absl::StatusOr<v1::ProfileInfo> KvClient::Register(const v1::RegisterProfileRequest& req,
                                                    bool* already_registered) {
  v1::RegisterProfileResponse resp;
  absl::Status s = WithRetries([&] {
    grpc::ClientContext ctx;
    SetDeadline(ctx, options_.register_timeout);
    AddAdminToken(ctx);
    resp.Clear();
    return ToAbslStatus(stub_->RegisterProfile(&ctx, req, &resp), "RegisterProfile");
  });
  if (!s.ok()) return s;
  if (resp.profile().digest().empty()) {
    return absl::InternalError("RegisterProfile: server returned no digest");
  }
  if (already_registered != nullptr) *already_registered = resp.already_registered();
  absl::MutexLock lock(&mu_);
  held_[resp.profile().digest()] = HeldSpec{req};
  return resp.profile();
}

absl::StatusOr<v1::ProfileInfo> KvClient::RegisterProfile(const v1::KvProfileSpec& spec) {
  v1::RegisterProfileRequest req;
  *req.mutable_structured() = spec;
  return Register(req);
}

absl::StatusOr<v1::ProfileInfo> KvClient::RegisterProfileJson(const std::string& spec_json,
                                                               bool* already_registered) {
  v1::RegisterProfileRequest req;
  req.set_spec_json(spec_json);
  return Register(req, already_registered);
}

std::optional<v1::RegisterProfileRequest> KvClient::HeldRegistration(const std::string& digest) const {
  absl::MutexLock lock(&mu_);
  auto it = held_.find(digest);
  if (it == held_.end()) return std::nullopt;
  return it->second.request;
}

absl::Status KvClient::RecoverProfile(const std::string& digest, const absl::Status& not_found) {
  v1::RegisterProfileRequest req;
  {
    absl::MutexLock lock(&mu_);
    auto it = held_.find(digest);
    if (it == held_.end()) return not_found;  // not ours to recover
    req = it->second.request;
  }
  absl::StatusOr<v1::ProfileInfo> info = Register(req);
  if (!info.ok()) {
    return absl::Status(info.status().code(),
                        absl::StrCat("re-registering profile ", digest, " after \"",
                                     not_found.message(), "\": ", info.status().message()));
  }
  // The digest is a function of the spec; a different one means the server computes digests
  // differently now (another format version), and retrying would only fail again.
  if (info->digest() != digest) {
    return absl::FailedPreconditionError(
        absl::StrCat("re-registered spec of profile ", digest, " now has digest ", info->digest()));
  }
  return absl::OkStatus();
}

std::vector<std::string> KvClient::HeldDigests() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> out;
  for (const auto& [digest, spec] : held_) out.push_back(digest);
  return out;
}

// --- unary reads ----------------------------------------------------------------------------

absl::StatusOr<v1::ProfileInfo> KvClient::GetProfile(const std::string& digest) {
  v1::GetProfileRequest req;
  req.set_digest(digest);
  v1::GetProfileResponse resp;
  auto call = [&] {
    return WithRetries([&] {
      grpc::ClientContext ctx;
      SetDeadline(ctx, options_.unary_timeout);
      resp.Clear();
      return ToAbslStatus(stub_->GetProfile(&ctx, req, &resp), "GetProfile");
    });
  };
  absl::Status s = call();
  // Behind a load balancer each re-registration reaches one replica and the retry may reach
  // another that lacks the profile too: recover again, a bounded number of times.
  for (int r = 0; absl::IsNotFound(s) && r < options_.max_profile_recoveries; ++r) {
    if (absl::Status rs = RecoverProfile(digest, s); !rs.ok()) return rs;
    s = call();
  }
  if (!s.ok()) return s;
  return resp.profile();
}

absl::StatusOr<v1::GetCodebookResponse> KvClient::GetCodebook(const std::string& digest,
                                                              bool include_rotation_matrix) {
  v1::GetCodebookRequest req;
  req.set_digest(digest);
  req.set_include_rotation_matrix(include_rotation_matrix);
  v1::GetCodebookResponse resp;
  auto call = [&] {
    return WithRetries([&] {
      grpc::ClientContext ctx;
      SetDeadline(ctx, options_.unary_timeout);
      resp.Clear();
      return ToAbslStatus(stub_->GetCodebook(&ctx, req, &resp), "GetCodebook");
    });
  };
  absl::Status s = call();
  // Behind a load balancer each re-registration reaches one replica and the retry may reach
  // another that lacks the profile too: recover again, a bounded number of times.
  for (int r = 0; absl::IsNotFound(s) && r < options_.max_profile_recoveries; ++r) {
    if (absl::Status rs = RecoverProfile(digest, s); !rs.ok()) return rs;
    s = call();
  }
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::Receipt> KvClient::GetReceipt(const std::string& receipt_id) {
  v1::GetReceiptRequest req;
  req.set_receipt_id(receipt_id);
  v1::GetReceiptResponse resp;
  absl::Status s = WithRetries([&] {
    grpc::ClientContext ctx;
    SetDeadline(ctx, options_.unary_timeout);
    resp.Clear();
    return ToAbslStatus(stub_->GetReceipt(&ctx, req, &resp), "GetReceipt");
  });
  if (!s.ok()) return s;
  return resp.receipt();
}

absl::StatusOr<std::vector<v1::Receipt>> KvClient::ListReceipts(const std::string& profile_digest,
                                                                size_t max_receipts) {
  std::vector<v1::Receipt> out;
  std::string token;
  while (out.size() < max_receipts) {
    v1::ListReceiptsRequest req;
    req.set_profile_digest(profile_digest);
    req.set_page_size(static_cast<uint32_t>(std::min<size_t>(max_receipts - out.size(), 1000)));
    req.set_page_token(token);
    v1::ListReceiptsResponse resp;
    absl::Status s = WithRetries([&] {
      grpc::ClientContext ctx;
      SetDeadline(ctx, options_.unary_timeout);
      resp.Clear();
      return ToAbslStatus(stub_->ListReceipts(&ctx, req, &resp), "ListReceipts");
    });
    if (!s.ok()) return s;
    for (auto& r : *resp.mutable_receipts()) {
      if (out.size() < max_receipts) out.push_back(std::move(r));
    }
    token = resp.next_page_token();
    if (token.empty() || resp.receipts_size() == 0) break;
  }
  return out;
}

absl::StatusOr<v1::GetServerInfoResponse> KvClient::GetServerInfo() {
  v1::GetServerInfoRequest req;
  v1::GetServerInfoResponse resp;
  absl::Status s = WithRetries([&] {
    grpc::ClientContext ctx;
    SetDeadline(ctx, options_.unary_timeout);
    resp.Clear();
    return ToAbslStatus(stub_->GetServerInfo(&ctx, req, &resp), "GetServerInfo");
  });
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<bool> KvClient::CheckHealth(const std::string& service) {
  // The health messages are tiny, so they are encoded by hand on a generic stub instead of
  // generating grpc.health.v1 code: request field 1 (service, string); response field 1 (status,
  // enum: 1 SERVING, 2 NOT_SERVING; an all-default response is empty).
  if (service.size() >= 128)
    return absl::InvalidArgumentError("CheckHealth: service name too long");
  std::string req;
  if (!service.empty()) {
    req.push_back(0x0a);
    req.push_back(static_cast<char>(service.size()));
    req += service;
  }
  grpc::Slice slice(req);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::ClientContext ctx;
  SetDeadline(ctx, options_.unary_timeout);
  grpc::GenericStub stub(channel_);
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status s) { done.set_value(std::move(s)); });
  const grpc::Status status = done.get_future().get();
  if (!status.ok()) return ToAbslStatus(status, "Health/Check");
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return absl::InternalError("Health/Check: unreadable response");
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  const int serving = bytes.size() >= 2 && bytes[0] == 0x08 ? bytes[1] : 0;
  if (serving != 1 && serving != 2) {
    return absl::UnknownError(
        absl::StrCat("Health/Check: status ", serving, " for '", service, "'"));
  }
  return serving == 1;
}

// --- pipelined streams ----------------------------------------------------------------------

namespace {

// One attempt of a bidirectional page stream: a writer thread sends the header and then one item
// per input while at most `window` items are unanswered; this thread reads the answers, checks
// that they arrive in input order and collects them. Any failure cancels the call, so neither side
// can block on the other.
//   Req/Resp: the stream's message types; MakeItem(i, &req) fills request i;
//   OnAnswer(resp, index, &error) consumes one response (index = answers so far) and returns true
//   if it was a page answer (false: a trailing message such as a receipt).
template <typename Req, typename Resp, typename MakeHeader, typename MakeItem, typename OnAnswer>
absl::Status RunPipelinedStream(grpc::ClientContext& ctx,
                                grpc::ClientReaderWriter<Req, Resp>& stream, size_t count,
                                size_t window, const char* method, MakeHeader&& make_header,
                                MakeItem&& make_item, OnAnswer&& on_answer) {
  std::mutex mu;
  std::condition_variable cv;
  size_t answered = 0;
  bool stop = false;

  std::thread writer([&] {
    Req req;
    make_header(&req);
    bool ok = stream.Write(req);
    for (size_t i = 0; ok && i < count; ++i) {
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return stop || i - answered < window; });
        if (stop) return;
      }
      req.Clear();
      make_item(i, &req);
      ok = stream.Write(req);
    }
    // A failed Write means the call is over; Finish() below reports why.
    if (ok) stream.WritesDone();
  });

  absl::Status protocol_error;
  Resp resp;
  while (stream.Read(&resp)) {
    size_t index;
    {
      std::lock_guard lock(mu);
      index = answered;
    }
    absl::Status item_error;
    const bool was_page = on_answer(resp, index, &item_error);
    if (!item_error.ok()) {
      protocol_error = item_error;
      ctx.TryCancel();
      break;
    }
    if (was_page) {
      std::lock_guard lock(mu);
      ++answered;
      cv.notify_all();
    }
  }
  {
    std::lock_guard lock(mu);
    stop = true;
    cv.notify_all();
  }
  writer.join();
  absl::Status finish = ToAbslStatus(stream.Finish(), method);
  if (!protocol_error.ok()) return protocol_error;
  if (!finish.ok()) return finish;
  if (answered != count) {
    return absl::DataLossError(
        absl::StrCat(method, ": stream ended after ", answered, " of ", count, " pages"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CompressResult> KvClient::CompressPages(const std::string& profile_digest,
                                                       std::span<const v1::RawPage> pages,
                                                       const CompressOptions& options) {
  CompressResult result;
  // A spec this client registered travels with the stream: a replica that never saw it builds it
  // and answers UNAVAILABLE until it has it (retried below with backoff).
  const std::optional<v1::RegisterProfileRequest> held = HeldRegistration(profile_digest);
  auto attempt = [&]() -> absl::Status {
    result = CompressResult{};
    result.pages.reserve(pages.size());
    bool have_receipt = false;
    grpc::ClientContext ctx;
    SetDeadline(ctx, options_.stream_timeout);
    // register_if_missing follows RegisterProfile's rules: without the token a replica that lacks
    // the profile ignores it and answers NOT_FOUND (then the slower recovery path runs).
    if (held) AddAdminToken(ctx);
    auto stream = stub_->CompressPages(&ctx);
    absl::Status s = RunPipelinedStream(
        ctx, *stream, pages.size(), options_.max_pages_in_flight, "CompressPages",
        [&](v1::CompressPagesRequest* req) {
          v1::CompressStreamHeader* h = req->mutable_header();
          h->set_profile_digest(profile_digest);
          h->set_input_dtype(options.input_dtype);
          h->set_return_page_metrics(options.return_page_metrics);
          h->set_label(options.label);
          h->mutable_queries()->Assign(options.queries.begin(), options.queries.end());
          if (held) *h->mutable_register_if_missing() = *held;
        },
        [&](size_t i, v1::CompressPagesRequest* req) {
          *req->mutable_page() = pages[i];
          req->mutable_page()->set_client_sequence(i);
        },
        [&](v1::CompressPagesResponse& resp, size_t index, absl::Status* error) {
          if (resp.has_receipt()) {
            *error = have_receipt ? absl::InternalError("CompressPages: two receipts")
                                  : absl::OkStatus();
            have_receipt = true;
            result.receipt = std::move(*resp.mutable_receipt());
            return false;
          }
          if (have_receipt || !resp.has_page() || resp.page().sequence() != index ||
              resp.page().client_sequence() != index) {
            *error = absl::InternalError(absl::StrCat(
                "CompressPages: answer ", index, " out of order or malformed (sequence ",
                resp.page().sequence(), ", client_sequence ", resp.page().client_sequence(), ")"));
            return false;
          }
          result.pages.push_back(std::move(*resp.mutable_page()));
          return true;
        });
    if (s.ok() && !have_receipt) {
      return absl::DataLossError("CompressPages: stream finished without a receipt");
    }
    return s;
  };
  auto call = [&] { return WithRetries(attempt); };
  absl::Status s = call();
  // Behind a load balancer each re-registration reaches one replica and the retry may reach
  // another that lacks the profile too: recover again, a bounded number of times.
  for (int r = 0; absl::IsNotFound(s) && r < options_.max_profile_recoveries; ++r) {
    if (absl::Status rs = RecoverProfile(profile_digest, s); !rs.ok()) return rs;
    s = call();
  }
  if (!s.ok()) return s;
  return result;
}

absl::StatusOr<DecompressResult> KvClient::DecompressPages(std::span<const std::string> frames,
                                                           v1::DType output_dtype,
                                                           const std::string& profile_digest) {
  DecompressResult result;
  const std::optional<v1::RegisterProfileRequest> held =
      profile_digest.empty() ? std::nullopt : HeldRegistration(profile_digest);
  auto attempt = [&]() -> absl::Status {
    result = DecompressResult{};
    result.pages.reserve(frames.size());
    grpc::ClientContext ctx;
    SetDeadline(ctx, options_.stream_timeout);
    if (held) AddAdminToken(ctx);
    auto stream = stub_->DecompressPages(&ctx);
    return RunPipelinedStream(
        ctx, *stream, frames.size(), options_.max_pages_in_flight, "DecompressPages",
        [&](v1::DecompressPagesRequest* req) {
          req->mutable_header()->set_output_dtype(output_dtype);
          req->mutable_header()->set_profile_digest(profile_digest);
          if (held) *req->mutable_header()->mutable_register_if_missing() = *held;
        },
        [&](size_t i, v1::DecompressPagesRequest* req) {
          req->mutable_frame()->set_frame(frames[i]);
          req->mutable_frame()->set_client_sequence(i);
        },
        [&](v1::DecompressPagesResponse& resp, size_t index, absl::Status* error) {
          if (resp.has_receipt()) {
            if (result.receipt) *error = absl::InternalError("DecompressPages: two receipts");
            result.receipt = std::move(*resp.mutable_receipt());
            return false;
          }
          if (result.receipt || !resp.has_page() || resp.page().sequence() != index ||
              resp.page().client_sequence() != index) {
            *error = absl::InternalError(absl::StrCat(
                "DecompressPages: answer ", index, " out of order or malformed (sequence ",
                resp.page().sequence(), ", client_sequence ", resp.page().client_sequence(), ")"));
            return false;
          }
          result.pages.push_back(std::move(*resp.mutable_page()));
          return true;
        });
  };
  auto call = [&] { return WithRetries(attempt); };
  absl::Status s = call();
  // Behind a load balancer each re-registration reaches one replica and the retry may reach
  // another that lacks the profile too: recover again, a bounded number of times.
  for (int r = 0; absl::IsNotFound(s) && !profile_digest.empty() && r < options_.max_profile_recoveries; ++r) {
    if (absl::Status rs = RecoverProfile(profile_digest, s); !rs.ok()) return rs;
    s = call();
  }
  if (!s.ok()) return s;
  return result;
}

}  // namespace fibquant::client
