// Argument parsing, output helpers, tensor input, connection set-up and profile lookup shared by
// every `fibquant` command (client/cli/cli_internal.h).
#include <chrono>
#include <cmath>
#include <limits>

#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "client/cli/cli_internal.h"
#include "client/cli/kv_pages.h"
#include "client/cli/tls_diagnose.h"
#include "client/client.h"
#include "google/protobuf/util/json_util.h"

namespace fibquant::cli::internal {

namespace {

const std::set<std::string> kCommonValueFlags = {"server", "tls-ca", "tls-cert", "tls-key",
                                                 "tls-server-name", "token-file", "deadline"};

}  // namespace

std::variant<Args, UsageError> ParseArgs(std::span<const std::string> in, FlagSpec spec) {
  spec.values.insert(kCommonValueFlags.begin(), kCommonValueFlags.end());
  spec.bools.insert("quiet");
  spec.bools.insert("help");
  Args a;
  bool only_positional = false;
  for (size_t i = 0; i < in.size(); ++i) {
    const std::string& s = in[i];
    if (only_positional || !s.starts_with("--") || s == "-") {
      a.positionals.push_back(s);
      continue;
    }
    if (s == "--") {
      only_positional = true;
      continue;
    }
    std::string name = s.substr(2);
    std::optional<std::string> value;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    if (spec.bools.count(name) != 0) {
      if (value) return UsageError{absl::StrCat("--", name, " takes no value")};
      a.bools.insert(name);
      continue;
    }
    const bool single = spec.values.count(name) != 0;
    if (!single && spec.repeated.count(name) == 0) return UsageError{absl::StrCat("unknown flag --", name)};
    if (!value) {
      if (i + 1 >= in.size()) return UsageError{absl::StrCat("--", name, " needs a value")};
      value = in[++i];
    }
    auto& slot = a.values[name];
    if (single && !slot.empty()) return UsageError{absl::StrCat("--", name, " given twice")};
    slot.push_back(*value);
  }
  return a;
}

// ---- output helpers

int Usage(std::ostream& err, const std::string& command, const std::string& message) {
  err << "fibquant" << (command.empty() ? "" : " ") << command << ": " << message
      << "\n(run `fibquant --help` for usage)\n";
  return kExitUsage;
}

int Failure(std::ostream& err, const std::string& command, const absl::Status& status) {
  err << "fibquant " << command << ": error: " << absl::StatusCodeToString(status.code()) << ": "
      << status.message() << "\n";
  return kExitFailure;
}

std::string ToJson(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions opts;
  opts.add_whitespace = true;
  opts.always_print_primitive_fields = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(m, &out, opts);
  return out;
}

std::string ToCompactJson(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions opts;
  opts.always_print_primitive_fields = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(m, &out, opts);
  return out;
}

v1::DType ToProto(DType d) {
  switch (d) {
    case DType::kF32: return v1::DTYPE_F32;
    case DType::kF16: return v1::DTYPE_F16;
    case DType::kBF16: return v1::DTYPE_BF16;
  }
  return v1::DTYPE_UNSPECIFIED;
}


std::optional<double> ParseDouble(const Args& a, const std::string& name, double def, std::string* error) {
  auto v = a.Get(name);
  if (!v) return def;
  double x = 0;
  if (!absl::SimpleAtod(*v, &x) || !std::isfinite(x)) {
    *error = absl::StrCat("--", name, " '", *v, "' is not a number");
    return std::nullopt;
  }
  return x;
}

std::optional<DType> ParseDTypeFlag(const std::string& name, const std::string& v, std::string* error) {
  auto d = ParseDType(v);
  if (!d.ok()) {
    *error = absl::StrCat("--", name, " '", v, "' is not one of f32, f16, bf16");
    return std::nullopt;
  }
  return *d;
}

// Common connection flags -> Connection; usage problems go to *usage, file problems are a status.
std::variant<ConnectionFlags, UsageError> ConnectionFlagsOf(const Args& a) {
  ConnectionFlags f;
  f.server = a.GetOr("server", f.server);
  f.tls_ca = a.GetOr("tls-ca", "");
  f.tls_cert = a.GetOr("tls-cert", "");
  f.tls_key = a.GetOr("tls-key", "");
  f.tls_server_name = a.GetOr("tls-server-name", "");
  f.token_file = a.GetOr("token-file", "");
  if (auto d = a.Get("deadline")) {
    absl::Duration dur;
    double secs = 0;
    if (absl::SimpleAtod(*d, &secs)) {
      dur = absl::Seconds(secs);
    } else if (!absl::ParseDuration(*d, &dur)) {
      return UsageError{absl::StrCat("--deadline '", *d, "' is not a duration (e.g. 30s, 5m, 1.5)")};
    }
    if (dur <= absl::ZeroDuration() || dur > absl::Hours(24)) {
      return UsageError{absl::StrCat("--deadline '", *d, "' must be in (0, 24h]")};
    }
    f.deadline = absl::ToChronoMilliseconds(dur);
    if (f.deadline->count() == 0) f.deadline = std::chrono::milliseconds(1);
  }
  return f;
}

std::variant<Tensor, UsageError, absl::Status> LoadTensor(const std::string& path, const TensorFlags& f) {
  std::string format = f.format;
  if (format.empty()) {
    if (path.ends_with(".npy")) {
      format = "npy";
    } else if (path.ends_with(".safetensors")) {
      format = "safetensors";
    } else if (!f.raw_dtype.empty() || !f.shape.empty()) {
      format = "raw";
    } else {
      return UsageError{absl::StrCat(path, ": cannot tell the format from the name; pass --format ",
                                     "npy|safetensors|raw (raw needs --raw-dtype and --shape)")};
    }
  }
  absl::StatusOr<Tensor> t;
  if (format == "npy") {
    t = ReadNpy(path, f.npy_bf16);
  } else if (format == "safetensors") {
    t = ReadSafetensors(path, f.tensor);
  } else if (format == "raw") {
    if (f.raw_dtype.empty() || f.shape.empty()) {
      return UsageError{"raw input needs --raw-dtype f32|f16|bf16 and --shape D0,D1,.."};
    }
    std::string error;
    auto dtype = ParseDTypeFlag("raw-dtype", f.raw_dtype, &error);
    if (!dtype) return UsageError{error};
    auto shape = ParseShapeFlag(f.shape);
    if (!shape.ok()) return UsageError{std::string(shape.status().message())};
    t = ReadRaw(path, *dtype, *shape);
  } else {
    return UsageError{absl::StrCat("--format '", format, "' is not one of npy, safetensors, raw")};
  }
  if (!t.ok()) return t.status();
  return std::move(*t);
}

TensorFlags TensorFlagsOf(const Args& a, const std::string& tensor_flag) {
  TensorFlags f;
  f.format = a.GetOr("format", "");
  f.tensor = a.GetOr(tensor_flag, "");
  f.raw_dtype = a.GetOr("raw-dtype", "");
  f.shape = a.GetOr("shape", "");
  f.npy_bf16 = a.Has("npy-bf16");
  return f;
}

// A failed call: with TLS, an UNAVAILABLE (gRPC says only "Socket closed" or "failed to connect")
// is explained by repeating the handshake with the same files (client/cli/tls_diagnose.h).
int Failure(Env& env, const absl::Status& status) {
  absl::Status s = status;
  const ConnectionFlags& f = env.conn_flags;
  if (s.code() == absl::StatusCode::kUnavailable && !f.tls_ca.empty()) {
    TlsProbeConfig probe;
    probe.target = f.server;
    probe.server_name = f.tls_server_name;
    auto ca = ReadFile(f.tls_ca, 1 << 20);
    auto cert = f.tls_cert.empty() ? absl::StatusOr<std::string>("") : ReadFile(f.tls_cert, 1 << 20);
    auto key = f.tls_key.empty() ? absl::StatusOr<std::string>("") : ReadFile(f.tls_key, 1 << 20);
    if (ca.ok() && cert.ok() && key.ok()) {
      probe.ca_pem = *ca;
      probe.cert_pem = *cert;
      probe.key_pem = *key;
      if (std::string why = DiagnoseTls(probe); !why.empty()) {
        s = absl::Status(s.code(), absl::StrCat(why, " (gRPC: ", s.message(), ")"));
      }
    }
  }
  return Failure(env.err, env.command, s);
}

int Connected(Env& env, Connection* conn) {
  auto c = Connect(env.conn_flags);
  if (!c.ok()) {
    if (c.status().code() == absl::StatusCode::kInvalidArgument) {
      return Usage(env.err, env.command, std::string(c.status().message()));
    }
    return Failure(env, c.status());
  }
  *conn = std::move(*c);
  return kExitOk;
}

// Every registered profile (ListProfiles, all pages).
absl::StatusOr<v1::ListProfilesResponse> ListAllProfiles(Connection& conn) {
  v1::ListProfilesResponse all;
  std::string token;
  // Bounded: the server caps its registry; 10000 pages of 1000 is far above any limit.
  for (int page = 0; page < 10000; ++page) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + conn.unary_deadline);
    v1::ListProfilesRequest req;
    req.set_page_size(1000);
    req.set_page_token(token);
    v1::ListProfilesResponse resp;
    grpc::Status st = conn.stub->ListProfiles(&ctx, req, &resp);
    if (!st.ok()) return client::ToAbslStatus(st, "ListProfiles");
    for (auto& p : *resp.mutable_profiles()) *all.add_profiles() = std::move(p);
    token = resp.next_page_token();
    if (token.empty()) break;
  }
  return all;
}

// --profile takes a digest ("sha256:...") or a registered profile id. An id is looked up with
// ListProfiles: NotFound when no profile has it, FailedPrecondition naming the digests when several
// registered specs share it (ids are labels, digests are the identity).
absl::StatusOr<std::string> ResolveProfile(Connection& conn, const std::string& ref) {
  if (ref.starts_with("sha256:")) return ref;
  auto all = ListAllProfiles(conn);
  if (!all.ok()) return all.status();
  std::vector<std::string> hits;
  for (const auto& p : all->profiles()) {
    if (p.profile_id() == ref) hits.push_back(p.digest());
  }
  if (hits.empty()) {
    return absl::NotFoundError(absl::StrCat("--profile ", ref, ": no registered profile has this id (",
                                            all->profiles_size(),
                                            " registered; a digest is written sha256:<64 hex>)"));
  }
  if (hits.size() > 1) {
    return absl::FailedPreconditionError(absl::StrCat("--profile ", ref, ": ", hits.size(),
                                                      " registered profiles have this id (",
                                                      absl::StrJoin(hits, ", "), "); pass a digest"));
  }
  return hits[0];
}

// One (layer, head) sequence of a sample tensor as f32 [tokens, head_dim].
absl::StatusOr<std::vector<float>> SampleRows(const Tensor& t, const std::string& name, uint32_t layer, uint32_t head) {
  auto l = LayoutOf(t.shape, name);
  if (!l.ok()) return l.status();
  if (layer >= l->layers || head >= l->heads) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": --layer ", layer, " / --head ", head,
                                                   " outside the tensor's ", l->layers, " layers x ", l->heads,
                                                   " heads"));
  }
  std::vector<float> out(size_t{l->tokens} * l->head_dim);
  const auto* src = reinterpret_cast<const uint8_t*>(t.data.data());
  for (uint32_t tok = 0; tok < l->tokens; ++tok) {
    const uint64_t row = l->RowOffset(layer, head, tok);
    for (uint32_t d = 0; d < l->head_dim; ++d) {
      out[size_t{tok} * l->head_dim + d] = LoadElement(t.dtype, src, row + d);
    }
  }
  return out;
}

}  // namespace fibquant::cli::internal
