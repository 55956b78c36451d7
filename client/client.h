// C++ client library for fibquant.v1.KvCompressionService (target fq_client).
//
// What it adds over the generated stub:
//   - a deadline on every call (ClientOptions: unary, registration and per-stream budgets);
//   - retries with exponential backoff and jitter for UNAVAILABLE (server restarting, draining,
//     connection not up yet). Every retried call is idempotent on the server: registration is keyed
//     by the spec's digest, and compressing or decompressing the same pages gives the same bytes
//     (a retried stream may leave one extra receipt behind);
//   - profile recovery: the client keeps every spec it registered, and when a call fails with
//     NOT_FOUND for one of those digests (e.g. the server lost its data dir, or the call reached
//     a replica that never saw the spec) it registers the spec again, checks that the digest is
//     unchanged and retries the call (up to max_profile_recoveries times);
//   - streams carry the held registration (header.register_if_missing): a replica behind a load
//     balancer that lacks the profile builds it and answers UNAVAILABLE meanwhile (retried);
//   - pipelined streaming: CompressPages/DecompressPages keep up to max_pages_in_flight pages
//     written but not yet answered, while results are read concurrently and returned in input
//     order (the order is verified against the server's sequence numbers);
//   - errors as absl::Status with the gRPC code and the method name in the message.
//
// Thread safety: a KvClient may be used from many threads at once (the held-spec table is guarded;
// every call has its own context). Ownership: the client shares the channel it was given.
#ifndef FIBQUANT_CLIENT_CLIENT_H_
#define FIBQUANT_CLIENT_CLIENT_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace fibquant::client {

struct ClientOptions {
  // Deadlines, per attempt. Registration builds a codebook on the server, hence the larger budget;
  // a stream's deadline covers the whole batch.
  std::chrono::milliseconds unary_timeout{10'000};
  std::chrono::milliseconds register_timeout{300'000};
  std::chrono::milliseconds stream_timeout{600'000};
  // UNAVAILABLE retries: at most max_attempts attempts in all; the wait before retry n is
  // min(initial_backoff * multiplier^(n-1), max_backoff), scaled by a random factor in [0.5, 1]
  // so many clients do not retry in lockstep.
  int max_attempts = 5;
  std::chrono::milliseconds initial_backoff{100};
  std::chrono::milliseconds max_backoff{5'000};
  double backoff_multiplier = 2.0;
  // Pages written to a stream and not yet answered. The server works on a few pages per stream at
  // once (ServerInfo.limits.max_inflight_pages_per_stream); a deeper client window keeps its input
  // queue full across network round trips. Bounded so a huge batch does not sit in gRPC buffers.
  size_t max_pages_in_flight = 32;
  // Sent as `authorization: Bearer <token>` on RegisterProfile, and on page streams whose header
  // carries register_if_missing (a replica builds the profile from it only for an admin), when the
  // server was started with --admin-token-file. Empty: not sent.
  std::string admin_token;
  // Called before each retry (attempt number from 2, the failure); for logs and tests.
  std::function<void(int attempt, const absl::Status& failure)> on_retry;
  // Profile recovery: re-registrations per call on NOT_FOUND. Behind round_robin over N replicas
  // each re-registration lands on one replica and the retry on the next, so one is not enough;
  // a few cover small N, and every recovery leaves one more replica with the profile.
  int max_profile_recoveries = 6;
};

struct CompressOptions {
  fibquant::v1::DType input_dtype = fibquant::v1::DTYPE_F32;
  bool return_page_metrics = false;
  std::string label;
  // Optional queries for the receipt's attention evaluation (query_count * head_dim f32 values).
  std::vector<float> queries;
};

struct CompressResult {
  std::vector<fibquant::v1::CompressedPage> pages;  // in input order
  fibquant::v1::Receipt receipt;
};

struct DecompressResult {
  std::vector<fibquant::v1::DecodedPage> pages;  // in input order
  // Set when the server sends a receipt for the stream (it may not).
  std::optional<fibquant::v1::Receipt> receipt;
};

// Channel helpers. Plaintext is for loopback and trusted networks; TLS takes PEM contents.
// `connection` != 0 gives the channel its own TCP connection (a local subchannel pool and a
// distinct channel argument), e.g. for a load generator spreading streams over connections;
// 0 lets gRPC share one connection between channels to the same target.
std::shared_ptr<grpc::Channel> MakeInsecureChannel(const std::string& target, int connection = 0);
struct TlsChannelConfig {
  std::string root_certs_pem;         // CA bundle that signed the server certificate
  std::string client_cert_chain_pem;  // mTLS only
  std::string client_key_pem;         // mTLS only
  std::string server_name_override;   // when the certificate's SAN differs from the target host
};
std::shared_ptr<grpc::Channel> MakeTlsChannel(const std::string& target,
                                              const TlsChannelConfig& config, int connection = 0);

class KvClient {
 public:
  explicit KvClient(std::shared_ptr<grpc::Channel> channel, ClientOptions options = {});

  // Registers a profile from a structured spec or from the KV layer's spec JSON, and remembers the
  // spec for recovery. Returns the server's ProfileInfo (digest = registry key);
  // `already_registered`, when given, receives whether the server already had the profile.
  [[nodiscard]] absl::StatusOr<fibquant::v1::ProfileInfo> RegisterProfile(
      const fibquant::v1::KvProfileSpec& spec);
  [[nodiscard]] absl::StatusOr<fibquant::v1::ProfileInfo> RegisterProfileJson(
      const std::string& spec_json, bool* already_registered = nullptr);

  [[nodiscard]] absl::StatusOr<fibquant::v1::ProfileInfo> GetProfile(const std::string& digest);
  [[nodiscard]] absl::StatusOr<fibquant::v1::GetCodebookResponse> GetCodebook(
      const std::string& digest, bool include_rotation_matrix = false);
  [[nodiscard]] absl::StatusOr<fibquant::v1::Receipt> GetReceipt(const std::string& receipt_id);
  // Receipts newest first, following next_page_token until `max_receipts` are collected.
  [[nodiscard]] absl::StatusOr<std::vector<fibquant::v1::Receipt>> ListReceipts(
      const std::string& profile_digest, size_t max_receipts = 1000);
  [[nodiscard]] absl::StatusOr<fibquant::v1::GetServerInfoResponse> GetServerInfo();

  // Compresses `pages` (raw bytes + coordinates; client_sequence is set to the input index) with a
  // registered profile. All-or-nothing: on error no partial result is returned.
  [[nodiscard]] absl::StatusOr<CompressResult> CompressPages(
      const std::string& profile_digest, std::span<const fibquant::v1::RawPage> pages,
      const CompressOptions& options = {});
  // Decompresses frames from CompressPages. `profile_digest` (optional) makes the server check that
  // every frame belongs to it and lets the client recover that profile on NOT_FOUND.
  [[nodiscard]] absl::StatusOr<DecompressResult> DecompressPages(
      std::span<const std::string> frames, fibquant::v1::DType output_dtype,
      const std::string& profile_digest = "");

  // grpc.health.v1.Health/Check for `service` ("" = the server as a whole): true if SERVING,
  // false if NOT_SERVING; NOT_FOUND for a service the server does not know. One attempt, no
  // retries (a probe must report what it sees), deadline unary_timeout.
  [[nodiscard]] absl::StatusOr<bool> CheckHealth(const std::string& service);

  // Digests whose specs this client holds (registered through it).
  std::vector<std::string> HeldDigests() const;

 private:
  struct HeldSpec {
    fibquant::v1::RegisterProfileRequest request;
  };
  // Runs attempt() until it returns anything but UNAVAILABLE or max_attempts are used up.
  template <typename Fn>
  absl::Status WithRetries(Fn&& attempt);
  [[nodiscard]] absl::StatusOr<fibquant::v1::ProfileInfo> Register(
      const fibquant::v1::RegisterProfileRequest& req, bool* already_registered = nullptr);
  // The registration this client sent for `digest` (streams carry it as register_if_missing).
  std::optional<fibquant::v1::RegisterProfileRequest> HeldRegistration(const std::string& digest) const;
  // On NOT_FOUND for a held digest: re-registers it. OK means "retry the call".
  absl::Status RecoverProfile(const std::string& digest, const absl::Status& not_found);
  void SetDeadline(grpc::ClientContext& ctx, std::chrono::milliseconds budget) const;
  void AddAdminToken(grpc::ClientContext& ctx) const;

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<fibquant::v1::KvCompressionService::Stub> stub_;
  ClientOptions options_;
  mutable absl::Mutex mu_;
  std::map<std::string, HeldSpec> held_ ABSL_GUARDED_BY(mu_);
};

// grpc::Status -> absl::Status (the code spaces are identical), prefixed with the method name.
absl::Status ToAbslStatus(const grpc::Status& status, const char* method);

}  // namespace fibquant::client

#endif  // FIBQUANT_CLIENT_CLIENT_H_
