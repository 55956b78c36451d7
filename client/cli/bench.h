// `fibquant bench`: a bounded load generator for a loopback fibquant-server. N concurrent
// CompressPages streams of M synthetic pages each (standard normal values from a fixed seed,
// converted to the profile's dtype), then N concurrent DecompressPages streams of the frames; it
// reports throughput (pages/s, raw bytes/s in), per-page latency percentiles (written -> answered,
// so it includes the client window's queueing), errors, and, after the timed phases, checks that
// every page (or every k-th with --verify-every k) round-trips:
// coordinates and size echoed, all values finite, and relative squared error
// sum((x-y)^2)/sum(x^2) <= max_rel_mse (raw-stored vectors come back exactly, coded ones within
// the quantizer's distortion); and, when the codec can be rebuilt locally, the server's decode
// equals the local KvCodec::DecodeFrame of the same frame bit for bit. The local codec comes from
// GetCodebook through Codebook::FromStored (digest recomputed) or, when the build repaired empty
// cells (whose events are not served), from a deterministic local rebuild of bounded cost whose
// digests KvCodec::Create checks against the server's profile. report["round_trip"]["local_decode"]
// says which check ran.
//
// Bounded: streams <= 64, pages per stream <= 100000, generated data <= 2 GiB, every stream's
// deadline ends at max_seconds after the start. Loopback only: RunBench refuses other targets.
//
// Ownership: the CLI engineer. Thread safety: RunBench owns its threads; call it from one thread.
#ifndef FIBQUANT_CLIENT_CLI_BENCH_H_
#define FIBQUANT_CLIENT_CLI_BENCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/cli/rpc.h"
#include "core/half.h"
#include "nlohmann/json.hpp"

namespace fibquant::cli {

struct BenchOptions {
  uint32_t streams = 2;
  uint32_t pages_per_stream = 8;
  // Used only when neither profile_digest nor spec_path is given: the generated profile
  // ("fibquant-bench-...": key, per_token, block_dim 2, codebook 256, 1 layer x 1 head).
  uint32_t page_tokens = 16;
  uint32_t head_dim = 128;
  DType dtype = DType::kF32;
  std::string profile_digest;  // a registered profile, or
  std::string spec_path;       // a spec JSON registered first
  uint32_t window = 16;
  double max_seconds = 60;
  double max_rel_mse = 0.05;
  uint64_t seed = 1;
  // Load-generator mode: streams spread over `channels` TCP connections; only every
  // verify_every-th page of each stream (0, k, 2k, ...) is checked, after the timed phases (the
  // check never counts in the throughput); transport_ceiling repeats the same streams through a
  // raw profile of the same shape (no coding) and reports both.
  uint32_t channels = 1;
  uint32_t verify_every = 1;
  bool transport_ceiling = false;
};

// Validates the options (InvalidArgument naming the flag and its bound).
absl::Status ValidateBenchOptions(const BenchOptions& options, const std::string& server);

// The spec JSON the bench registers when it is given no profile.
std::string BenchSpecJson(const BenchOptions& options);

// Percentile by nearest rank (p in [0, 100]) of unsorted samples; 0 for none.
double Percentile(std::vector<double> samples, double p);

// Runs the benchmark. A failed page or stream is counted in "errors" (the report is still
// returned); only set-up failures (profile, options) are an error status.
// `more`: the connection flags, to open options.channels - 1 further connections.
[[nodiscard]] absl::StatusOr<nlohmann::json> RunBench(const BenchOptions& options, Connection& conn,
                                                      const std::string& server,
                                                      const ConnectionFlags* more = nullptr);

}  // namespace fibquant::cli

#endif  // FIBQUANT_CLIENT_CLI_BENCH_H_
