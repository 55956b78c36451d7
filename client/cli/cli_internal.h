// Internal to the `fibquant` CLI (client/cli/cli*.cc, not an API): the parsed-argument types, the
// output and flag helpers every command shares, and one entry point per command. The CLI is split
// by command family so that no file has to hold all of it:
//   cli.cc          usage text, the command table, RunCli, `bench`
//   cli_flags.cc    argument parsing, output helpers, tensor input, connection and profile lookup
//   cli_admin.cc    `profile register|get|list`, `receipt`, `info`, `health`
//   cli_pages.cc    `compress`, `decompress` (the page streams and the .fqc container)
//   cli_quality.cc  `eval`, `recommend`
//
// Ownership: the CLI engineer. Thread safety: every function works on the Env it is given; there
// is no global mutable state (RunCli is reentrant, client/cli/cli.h).
#ifndef FIBQUANT_CLIENT_CLI_CLI_INTERNAL_H_
#define FIBQUANT_CLIENT_CLI_CLI_INTERNAL_H_

#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <ostream>
#include <set>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "client/cli/cli.h"
#include "client/cli/progress.h"
#include "client/cli/rpc.h"
#include "client/cli/tensor_io.h"
#include "fibquant/v1/kv_compression.pb.h"
#include "google/protobuf/message.h"

namespace fibquant::cli::internal {

namespace v1 = fibquant::v1;

// ---- argument parsing

struct FlagSpec {
  std::set<std::string> values;    // --name VALUE / --name=VALUE, at most once
  std::set<std::string> repeated;  // --name VALUE, any number of times
  std::set<std::string> bools;     // --name
};

struct Args {
  std::map<std::string, std::vector<std::string>> values;
  std::set<std::string> bools;
  std::vector<std::string> positionals;
  std::optional<std::string> Get(const std::string& name) const {
    auto it = values.find(name);
    if (it == values.end() || it->second.empty()) return std::nullopt;
    return it->second.front();
  }
  std::string GetOr(const std::string& name, const std::string& def) const { return Get(name).value_or(def); }
  std::vector<std::string> GetAll(const std::string& name) const {
    auto it = values.find(name);
    return it == values.end() ? std::vector<std::string>{} : it->second;
  }
  bool Has(const std::string& name) const { return bools.count(name) != 0; }
};

// A usage error: exit code 2 with the message and a pointer to --help.
struct UsageError {
  std::string message;
};

// `spec` plus the common flags (connection, --quiet, --help).
std::variant<Args, UsageError> ParseArgs(std::span<const std::string> in, FlagSpec spec);

// ---- output helpers

int Usage(std::ostream& err, const std::string& command, const std::string& message);
int Failure(std::ostream& err, const std::string& command, const absl::Status& status);
std::string ToJson(const google::protobuf::Message& m);
std::string ToCompactJson(const google::protobuf::Message& m);
v1::DType ToProto(DType d);

// Flag value parsers: nullopt plus a usage message on failure.
template <typename T>
std::optional<T> ParseUint(const Args& a, const std::string& name, T def, std::string* error) {
  auto v = a.Get(name);
  if (!v) return def;
  uint64_t x = 0;
  if (!absl::SimpleAtoi(*v, &x) || x > std::numeric_limits<T>::max()) {
    *error = absl::StrCat("--", name, " '", *v, "' is not a non-negative integer");
    return std::nullopt;
  }
  return static_cast<T>(x);
}
std::optional<double> ParseDouble(const Args& a, const std::string& name, double def, std::string* error);
std::optional<DType> ParseDTypeFlag(const std::string& name, const std::string& v, std::string* error);

// Common connection flags -> ConnectionFlags (a malformed --deadline is a usage error).
std::variant<ConnectionFlags, UsageError> ConnectionFlagsOf(const Args& a);

// ---- tensor input (compress, eval, recommend)

struct TensorFlags {
  std::string format;  // npy | safetensors | raw | "" (from the extension)
  std::string tensor;
  std::string raw_dtype;
  std::string shape;
  bool npy_bf16 = false;
};

inline const std::set<std::string> kTensorFlags = {"format", "tensor", "raw-dtype", "shape"};

std::variant<Tensor, UsageError, absl::Status> LoadTensor(const std::string& path, const TensorFlags& f);
TensorFlags TensorFlagsOf(const Args& a, const std::string& tensor_flag = "tensor");

// One (layer, head) sequence of a sample tensor as f32 [tokens, head_dim].
absl::StatusOr<std::vector<float>> SampleRows(const Tensor& t, const std::string& name, uint32_t layer,
                                              uint32_t head);

// ---- commands

// Everything a command needs after parsing; `Run` returns the exit code.
struct Env {
  std::string command;
  Args args;
  ConnectionFlags conn_flags;
  std::ostream& out;
  std::ostream& err;
  bool progress() const { return StderrIsTerminal() && !args.Has("quiet"); }
};

// A failed call: with TLS, an UNAVAILABLE (gRPC says only "Socket closed" or "failed to connect")
// is explained by repeating the handshake with the same files (client/cli/tls_diagnose.h).
int Failure(Env& env, const absl::Status& status);

// Connects with the common flags; returns kExitOk, or the exit code after printing why not.
int Connected(Env& env, Connection* conn);

// Every registered profile (ListProfiles, all pages).
absl::StatusOr<v1::ListProfilesResponse> ListAllProfiles(Connection& conn);

// --profile takes a digest ("sha256:...") or a registered profile id. An id is looked up with
// ListProfiles: NotFound when no profile has it, FailedPrecondition naming the digests when several
// registered specs share it (ids are labels, digests are the identity).
absl::StatusOr<std::string> ResolveProfile(Connection& conn, const std::string& ref);

int CmdProfile(Env& env);     // cli_admin.cc
int CmdReceipt(Env& env);     // cli_admin.cc
int CmdHealth(Env& env);      // cli_admin.cc
int CmdInfo(Env& env);        // cli_admin.cc
int CmdCompress(Env& env);    // cli_pages.cc
int CmdDecompress(Env& env);  // cli_pages.cc
int CmdEval(Env& env);        // cli_quality.cc
int CmdRecommend(Env& env);   // cli_quality.cc

}  // namespace fibquant::cli::internal

#endif  // FIBQUANT_CLIENT_CLI_CLI_INTERNAL_H_
