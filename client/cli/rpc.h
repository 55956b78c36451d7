// Connection set-up from the CLI's common flags, and the two pipelined streams the CLI drives
// directly on the generated stub (CompressPages, DecompressPages). The CLI uses fq_client
// (client/client.h) for unary calls; it runs the streams itself because it needs a callback per
// answered page (progress bar, per-page latency for `fibquant bench`), which fq_client's
// all-or-nothing batch calls do not offer. The streams keep up to `window` pages written but not
// yet answered, read answers on a second thread and verify their order by sequence number.
//
// Ownership: the CLI engineer. Thread safety: each call uses its own context and threads; the stub
// may be shared between concurrent calls (gRPC stubs are thread-safe).
#ifndef FIBQUANT_CLIENT_CLI_RPC_H_
#define FIBQUANT_CLIENT_CLI_RPC_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace fibquant::cli {

struct ConnectionFlags {
  std::string server = "127.0.0.1:50051";
  std::string tls_ca;           // PEM CA bundle; set => TLS
  std::string tls_cert;         // PEM client certificate (mTLS; needs tls_key and tls_ca)
  std::string tls_key;          // PEM client key
  std::string tls_server_name;  // SAN override when it differs from the --server host
  std::string token_file;       // admin bearer token (RegisterProfile)
  std::optional<std::chrono::milliseconds> deadline;  // per call; unset: fq_client defaults
  int connection = 0;  // != 0: a TCP connection of its own (client::MakeInsecureChannel)
};

// Reads the TLS files and token (NotFound / PermissionDenied naming the file; InvalidArgument for
// --tls-cert without --tls-key and the like) and builds the channel and fq_client options.
struct Connection {
  std::shared_ptr<grpc::Channel> channel;
  client::ClientOptions client_options;
  std::unique_ptr<fibquant::v1::KvCompressionService::Stub> stub;
  std::chrono::milliseconds stream_deadline{600'000};
  std::chrono::milliseconds unary_deadline{10'000};
};
[[nodiscard]] absl::StatusOr<Connection> Connect(const ConnectionFlags& flags);

// True for 127.0.0.0/8, ::1, localhost and unix: targets (what `fibquant bench` accepts).
bool IsLoopbackTarget(const std::string& target);

struct StreamOptions {
  std::chrono::milliseconds deadline{600'000};
  size_t window = 16;  // pages written but not yet answered
  // Sent as `authorization: Bearer <token>` when not empty: a header carrying register_if_missing
  // needs the admin token on servers that have one (the build follows RegisterProfile's rules).
  std::string bearer_token;
};

// Called after each answered page with the count done so far and the raw bytes they carried.
using PageCallback = std::function<void(uint64_t pages_done, uint64_t raw_bytes_done)>;

struct CompressStreamResult {
  std::vector<fibquant::v1::CompressedPage> pages;  // input order
  fibquant::v1::Receipt receipt;
  std::vector<double> latency_seconds;  // per page: written -> answered
};
[[nodiscard]] absl::StatusOr<CompressStreamResult> CompressStream(
    fibquant::v1::KvCompressionService::Stub& stub, const fibquant::v1::CompressStreamHeader& header,
    std::span<const fibquant::v1::RawPage> pages, const StreamOptions& options,
    const PageCallback& on_page = nullptr);

struct DecompressStreamResult {
  std::vector<fibquant::v1::DecodedPage> pages;  // input order
  std::optional<fibquant::v1::Receipt> receipt;
  std::vector<double> latency_seconds;
};
[[nodiscard]] absl::StatusOr<DecompressStreamResult> DecompressStream(
    fibquant::v1::KvCompressionService::Stub& stub, const fibquant::v1::DecompressStreamHeader& header,
    std::span<const std::string> frames, const StreamOptions& options,
    const PageCallback& on_page = nullptr);

}  // namespace fibquant::cli

#endif  // FIBQUANT_CLIENT_CLI_RPC_H_
