#include "client/cli/cli.h"

#include <chrono>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <variant>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "client/cli/bench.h"
#include "client/cli/container.h"
#include "client/cli/kv_pages.h"
#include "client/cli/progress.h"
#include "client/cli/rpc.h"
#include "client/cli/tensor_io.h"
#include "client/cli/tls_diagnose.h"
#include "client/client.h"
#include "core/kv_profile.h"
#include "google/protobuf/util/json_util.h"
#include "nlohmann/json.hpp"

namespace fibquant::cli {
namespace {

namespace v1 = fibquant::v1;

constexpr const char* kCommonFlagsHelp =
    "Common flags:\n"
    "  --server HOST:PORT      server address (default 127.0.0.1:50051)\n"
    "  --tls-ca FILE           PEM CA bundle; enables TLS\n"
    "  --tls-cert FILE --tls-key FILE   client certificate and key (mTLS)\n"
    "  --tls-server-name NAME  expected server certificate name when it differs from the host\n"
    "  --token-file FILE       admin bearer token (needed by `profile register` on servers with one)\n"
    "  --deadline DURATION     per-call deadline, e.g. 30s, 5m (default: 10s unary, 300s register,\n"
    "                          600s streams)\n"
    "  --quiet                 no progress bar\n";

constexpr const char* kUsage =
    "usage: fibquant <command> [flags]\n"
    "Commands:\n"
    "  profile register <spec.json>   register a KV profile spec; prints the ProfileInfo JSON\n"
    "  profile get <digest|id>        one registered profile\n"
    "  profile list                   all registered profiles\n"
    "  compress --profile DIGEST|ID --in FILE --out FILE.fqc [--format npy|safetensors|raw]\n"
    "           [--tensor NAME] [--raw-dtype f32|f16|bf16 --shape D0,D1,..] [--npy-bf16]\n"
    "           [--label TEXT] [--window N]\n"
    "  decompress --in FILE.fqc --out FILE [--dtype f16|bf16|f32] [--format npy|raw] [--window N]\n"
    "  receipt <id>                   one stored receipt\n"
    "  eval (--profile DIGEST|ID | --candidate SPEC.json)... --keys FILE [--values FILE]\n"
    "       [--queries FILE] [--layer L] [--head H] [--top-k K] [--max-logit-mse X]\n"
    "       [--max-attention-tv X] [--max-topk-disagreement X] [--max-value-aggregation-mse X]\n"
    "       [--keys-tensor|--values-tensor|--queries-tensor NAME] [--format, --raw-dtype, --shape,\n"
    "       --npy-bf16 as for compress]\n"
    "  recommend --keys FILE [--queries FILE] [--values FILE] [--role key|value] [--layer L]\n"
    "       [--head H] [--max-attention-tv X ...] [--min-ratio R] [--calibration-fraction F]\n"
    "       [--tokens-per-page T] [--prefix ID] [--target-shape SHAPE.json] [--store-calibration]\n"
    "       [--max-codebook-size N]\n"
    "                                 calibrate on part of the sample, rank candidate profiles\n"
    "                                 measured on the rest (exit 3: none meets the budget)\n"
    "  info                           server version, formats and limits\n"
    "  health [SERVICE]               grpc.health.v1 check (default fibquant.v1.KvCompressionService);\n"
    "                                 exit 0 only when SERVING\n"
    "  bench [--streams N] [--pages M] [--page-tokens T] [--head-dim D] [--dtype f32|f16|bf16]\n"
    "        [--profile DIGEST|ID | --spec FILE] [--window W] [--max-seconds S] [--max-rel-mse X]\n"
    "        [--seed S] [--channels C] [--verify-every K] [--transport-ceiling]\n"
    "                                 loopback load generator with round-trip checks (every K-th page,\n"
    "                                 after the timed phases); streams over C connections; the ceiling\n"
    "                                 repeats the same streams through a raw (uncoded) profile\n"
    "Exit codes: 0 ok, 1 failure, 2 usage error, 3 eval over budget / no recommendation meets it.\n";

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

const std::set<std::string> kCommonValueFlags = {"server", "tls-ca", "tls-cert", "tls-key",
                                                 "tls-server-name", "token-file", "deadline"};

// A usage error: exit code 2 with the message and a pointer to --help.
struct UsageError {
  std::string message;
};

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

// ---- tensor input (compress, eval)

struct TensorFlags {
  std::string format;  // npy | safetensors | raw | "" (from the extension)
  std::string tensor;
  std::string raw_dtype;
  std::string shape;
  bool npy_bf16 = false;
};

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

TensorFlags TensorFlagsOf(const Args& a, const std::string& tensor_flag = "tensor") {
  TensorFlags f;
  f.format = a.GetOr("format", "");
  f.tensor = a.GetOr(tensor_flag, "");
  f.raw_dtype = a.GetOr("raw-dtype", "");
  f.shape = a.GetOr("shape", "");
  f.npy_bf16 = a.Has("npy-bf16");
  return f;
}

const std::set<std::string> kTensorFlags = {"format", "tensor", "raw-dtype", "shape"};

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

int CmdProfile(Env& env) {
  const auto& pos = env.args.positionals;
  if (pos.empty()) return Usage(env.err, env.command, "needs a subcommand: register <spec.json>, get <digest>, list");
  const std::string sub = pos[0];
  env.command = "profile " + sub;
  Connection conn;
  if (sub == "register") {
    if (pos.size() != 2) return Usage(env.err, env.command, "needs exactly one spec file");
    auto spec = ReadFile(pos[1], 1 << 20);
    if (!spec.ok()) return Failure(env, spec.status());
    if (int rc = Connected(env, &conn)) return rc;
    client::KvClient kv(conn.channel, conn.client_options);
    bool already = false;
    auto info = kv.RegisterProfileJson(*spec, &already);
    if (!info.ok()) return Failure(env, info.status());
    env.out << ToJson(*info) << "\n";
    env.err << (already ? "already registered: " : "registered ") << info->profile_id() << " as "
            << info->digest() << (already ? " (same spec, nothing was built)" : "") << "\n";
    return kExitOk;
  }
  if (sub == "get") {
    if (pos.size() != 2) return Usage(env.err, env.command, "needs exactly one digest or profile id");
    if (int rc = Connected(env, &conn)) return rc;
    auto digest = ResolveProfile(conn, pos[1]);
    if (!digest.ok()) return Failure(env, digest.status());
    client::KvClient kv(conn.channel, conn.client_options);
    auto info = kv.GetProfile(*digest);
    if (!info.ok()) return Failure(env, info.status());
    env.out << ToJson(*info) << "\n";
    return kExitOk;
  }
  if (sub == "list") {
    if (pos.size() != 1) return Usage(env.err, env.command, "takes no arguments");
    if (int rc = Connected(env, &conn)) return rc;
    auto listed = ListAllProfiles(conn);
    if (!listed.ok()) return Failure(env, listed.status());
    const v1::ListProfilesResponse& all = *listed;
    env.out << ToJson(all) << "\n";
    env.err << all.profiles_size() << " profile(s)\n";
    return kExitOk;
  }
  return Usage(env.err, "profile", absl::StrCat("unknown subcommand '", sub, "' (register, get, list)"));
}

int CmdCompress(Env& env) {
  const Args& a = env.args;
  if (!a.positionals.empty()) return Usage(env.err, env.command, absl::StrCat("unexpected argument '", a.positionals[0], "'"));
  auto digest = a.Get("profile");
  auto in = a.Get("in");
  auto out_path = a.Get("out");
  if (!digest || !in || !out_path) return Usage(env.err, env.command, "needs --profile, --in and --out");
  std::string error;
  auto window = ParseUint<uint32_t>(a, "window", 16, &error);
  if (!window) return Usage(env.err, env.command, error);
  if (*window < 1 || *window > 1024) return Usage(env.err, env.command, "--window must be in [1, 1024]");
  auto tensor = LoadTensor(*in, TensorFlagsOf(a));
  if (auto* u = std::get_if<UsageError>(&tensor)) return Usage(env.err, env.command, u->message);
  if (auto* s = std::get_if<absl::Status>(&tensor)) return Failure(env, *s);
  Tensor& t = std::get<Tensor>(tensor);
  auto layout = LayoutOf(t.shape, *in);
  if (!layout.ok()) return Failure(env, layout.status());

  Connection conn;
  if (int rc = Connected(env, &conn)) return rc;
  {
    auto resolved = ResolveProfile(conn, *digest);
    if (!resolved.ok()) return Failure(env, resolved.status());
    digest = *resolved;
  }
  client::KvClient kv(conn.channel, conn.client_options);
  auto info = kv.GetProfile(*digest);
  if (!info.ok()) return Failure(env, info.status());
  auto profile = KvCompressionProfile::FromJson(info->profile_json());
  if (!profile.ok()) {
    return Failure(env.err, env.command,
                   absl::Status(profile.status().code(), absl::StrCat("profile ", *digest, " from the server: ",
                                                                      profile.status().message())));
  }
  const uint32_t tpp = profile->page_geometry.tokens_per_page;
  const DType page_dtype = profile->shape.dtype;
  absl::Status fit = CheckLayoutFitsProfile(*layout, profile->shape, tpp, *in);
  if (!fit.ok()) return Failure(env, fit);

  std::vector<KvPageCoords> plan = PlanPages(*layout, tpp);
  std::vector<v1::RawPage> pages;
  pages.reserve(plan.size());
  uint64_t raw_bytes = 0;
  for (const auto& c : plan) {
    v1::RawPage p;
    auto* pc = p.mutable_coordinates();
    pc->set_batch(c.batch);
    pc->set_layer(c.layer);
    pc->set_kv_head(c.kv_head);
    pc->set_token_start(c.token_start);
    pc->set_token_count(c.token_count);
    p.set_data(GatherPage(t, *layout, c, page_dtype));
    raw_bytes += p.data().size();
    pages.push_back(std::move(p));
  }
  const DType source_dtype = t.dtype;
  const std::vector<uint64_t> source_shape = t.shape;
  t.data = std::string();  // the pages hold their own copy now

  v1::CompressStreamHeader header;
  header.set_profile_digest(*digest);
  header.set_input_dtype(ToProto(page_dtype));
  header.set_label(a.GetOr("label", ""));
  Progress progress("compress", pages.size(), env.progress());
  auto result = CompressStream(*conn.stub, header, pages, StreamOptions{conn.stream_deadline, *window},
                               [&](uint64_t n, uint64_t b) { progress.Update(n, b); });
  progress.Finish();
  if (!result.ok()) return Failure(env, result.status());

  nlohmann::json meta = {
      {"schema", "fq_cli_container_meta_v1"},
      {"profile_digest", *digest},
      {"profile_id", info->profile_id()},
      {"source", {{"file", *in}, {"dtype", std::string(DTypeName(source_dtype))}, {"shape", source_shape}}},
      {"page_dtype", std::string(DTypeName(page_dtype))},
      {"tokens_per_page", tpp},
      {"pages", pages.size()}};
  Container c;
  c.metadata_json = meta.dump();
  uint64_t frame_bytes = 0;
  for (auto& p : result->pages) {
    frame_bytes += p.frame().size();
    c.frames.push_back(std::move(*p.mutable_frame()));
  }
  c.receipt_json = ToCompactJson(result->receipt);
  auto encoded = EncodeContainer(c);
  if (!encoded.ok()) return Failure(env, encoded.status());
  absl::Status w = WriteFileAtomically(*out_path, *encoded);
  if (!w.ok()) return Failure(env, w);
  env.out << ToJson(result->receipt) << "\n";
  env.err << "compressed " << pages.size() << " pages of " << *in << ": " << raw_bytes << " -> " << frame_bytes
          << " bytes (" << absl::StrFormat("%.2fx", frame_bytes ? double(raw_bytes) / double(frame_bytes) : 0.0)
          << "), receipt " << result->receipt.receipt_id() << ", wrote " << *out_path << " (" << encoded->size()
          << " bytes)\n";
  return kExitOk;
}

int CmdDecompress(Env& env) {
  const Args& a = env.args;
  if (!a.positionals.empty()) return Usage(env.err, env.command, absl::StrCat("unexpected argument '", a.positionals[0], "'"));
  auto in = a.Get("in");
  auto out_path = a.Get("out");
  if (!in || !out_path) return Usage(env.err, env.command, "needs --in and --out");
  const std::string format = a.GetOr("format", "npy");
  if (format != "npy" && format != "raw") return Usage(env.err, env.command, "--format must be npy or raw");
  std::string error;
  auto window = ParseUint<uint32_t>(a, "window", 16, &error);
  if (!window) return Usage(env.err, env.command, error);
  if (*window < 1 || *window > 1024) return Usage(env.err, env.command, "--window must be in [1, 1024]");
  std::optional<DType> out_dtype;
  if (auto d = a.Get("dtype")) {
    out_dtype = ParseDTypeFlag("dtype", *d, &error);
    if (!out_dtype) return Usage(env.err, env.command, error);
  }
  const ContainerLimits limits;
  auto bytes = ReadFile(*in, limits.max_container_bytes);
  if (!bytes.ok()) return Failure(env, bytes.status());
  auto c = DecodeContainer(*bytes, limits);
  if (!c.ok()) {
    return Failure(env, absl::Status(c.status().code(), absl::StrCat(*in, ": ", c.status().message())));
  }
  bytes->clear();
  bytes->shrink_to_fit();
  nlohmann::json meta = nlohmann::json::parse(c->metadata_json);
  auto bad_meta = [&](const std::string& what) {
    return Failure(env, absl::DataLossError(absl::StrCat(*in, ": container metadata: ", what)));
  };
  if (!meta.contains("profile_digest") || !meta["profile_digest"].is_string()) return bad_meta("no profile_digest");
  if (!meta.contains("source") || !meta["source"].is_object() || !meta["source"].contains("shape") ||
      !meta["source"]["shape"].is_array() || !meta["source"].contains("dtype") || !meta["source"]["dtype"].is_string()) {
    return bad_meta("no source shape/dtype");
  }
  if (!meta.contains("tokens_per_page") || !meta["tokens_per_page"].is_number_unsigned()) {
    return bad_meta("no tokens_per_page");
  }
  std::vector<uint64_t> shape;
  for (const auto& d : meta["source"]["shape"]) {
    if (!d.is_number_unsigned()) return bad_meta("shape holds a non-integer");
    shape.push_back(d.get<uint64_t>());
  }
  auto layout = LayoutOf(shape, *in);
  if (!layout.ok()) return bad_meta(std::string(layout.status().message()));
  const uint64_t tpp64 = meta["tokens_per_page"].get<uint64_t>();
  if (tpp64 == 0 || tpp64 > kMaxKvTokensPerPage) return bad_meta("tokens_per_page out of range");
  const uint32_t tpp = static_cast<uint32_t>(tpp64);
  auto source_dtype = ParseDType(meta["source"]["dtype"].get<std::string>());
  if (!source_dtype.ok()) return bad_meta("unknown source dtype");
  const DType dtype = out_dtype.value_or(*source_dtype);
  // Both checks are arithmetic: the metadata is untrusted and may declare billions of pages.
  const TensorLimits tlimits;
  if (layout->element_count() > tlimits.max_data_bytes / DTypeSize(dtype)) {
    return Failure(env.err, env.command,
                   absl::ResourceExhaustedError(absl::StrCat(*in, ": decoded tensor of ", layout->element_count(),
                                                             " elements is above the limit of ",
                                                             tlimits.max_data_bytes, " bytes")));
  }
  const uint64_t expected_pages = PageCount(*layout, tpp);
  if (expected_pages != c->frames.size()) {
    return bad_meta(absl::StrCat("the tensor needs ", expected_pages, " pages but the container holds ",
                                 c->frames.size(), " frames"));
  }
  const std::string digest = meta["profile_digest"].get<std::string>();

  Connection conn;
  if (int rc = Connected(env, &conn)) return rc;
  v1::DecompressStreamHeader header;
  header.set_output_dtype(ToProto(dtype));
  header.set_profile_digest(digest);
  Progress progress("decompress", c->frames.size(), env.progress());
  auto result = DecompressStream(*conn.stub, header, c->frames, StreamOptions{conn.stream_deadline, *window},
                                 [&](uint64_t n, uint64_t b) { progress.Update(n, b); });
  progress.Finish();
  if (!result.ok()) return Failure(env, result.status());
  TensorAssembler assembler(*layout, shape, tpp, dtype);
  for (const auto& p : result->pages) {
    const auto& pc = p.coordinates();
    absl::Status st = assembler.Add(
        KvPageCoords{pc.batch(), pc.layer(), pc.kv_head(), pc.token_start(), pc.token_count()}, p.data());
    if (!st.ok()) return Failure(env, st);
  }
  auto tensor = assembler.Finish();
  if (!tensor.ok()) return Failure(env, tensor.status());
  const std::string file = format == "npy" ? EncodeNpy(*tensor) : tensor->data;
  absl::Status w = WriteFileAtomically(*out_path, file);
  if (!w.ok()) return Failure(env, w);
  nlohmann::json compress_receipt = nlohmann::json::parse(c->receipt_json);
  nlohmann::json summary = {{"out", *out_path},
                            {"format", format},
                            {"dtype", std::string(DTypeName(dtype))},
                            {"shape", shape},
                            {"pages", result->pages.size()},
                            {"profile_digest", digest},
                            {"compress_receipt", compress_receipt}};
  if (result->receipt) summary["decompress_receipt"] = nlohmann::json::parse(ToCompactJson(*result->receipt));
  env.out << summary.dump(2) << "\n";
  env.err << "decompressed " << result->pages.size() << " pages to " << *out_path << " ("
          << DTypeName(dtype) << ", shape [" << absl::StrJoin(shape, ", ") << "], " << format << ")\n";
  return kExitOk;
}

int CmdReceipt(Env& env) {
  if (env.args.positionals.size() != 1) return Usage(env.err, env.command, "needs exactly one receipt id");
  Connection conn;
  if (int rc = Connected(env, &conn)) return rc;
  client::KvClient kv(conn.channel, conn.client_options);
  auto r = kv.GetReceipt(env.args.positionals[0]);
  if (!r.ok()) return Failure(env, r.status());
  env.out << ToJson(*r) << "\n";
  return kExitOk;
}

// grpc.health.v1 over the same channel options as every other command (TLS, mTLS), so it can
// serve as an exec probe where the kubelet's plaintext gRPC probe cannot.
int CmdHealth(Env& env) {
  if (env.args.positionals.size() > 1) return Usage(env.err, env.command, "takes at most one service name");
  const std::string service =
      env.args.positionals.empty() ? "fibquant.v1.KvCompressionService" : env.args.positionals[0];
  Connection conn;
  if (int rc = Connected(env, &conn)) return rc;
  client::KvClient kv(conn.channel, conn.client_options);
  auto serving = kv.CheckHealth(service);
  if (!serving.ok()) return Failure(env, serving.status());
  nlohmann::json j = {{"service", service}, {"status", *serving ? "SERVING" : "NOT_SERVING"}};
  env.out << j.dump() << "\n";
  return *serving ? kExitOk : kExitFailure;
}

int CmdInfo(Env& env) {
  if (!env.args.positionals.empty()) return Usage(env.err, env.command, "takes no arguments");
  Connection conn;
  if (int rc = Connected(env, &conn)) return rc;
  client::KvClient kv(conn.channel, conn.client_options);
  auto r = kv.GetServerInfo();
  if (!r.ok()) return Failure(env, r.status());
  env.out << ToJson(*r) << "\n";
  return kExitOk;
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

int CmdEval(Env& env) {
  const Args& a = env.args;
  if (!a.positionals.empty()) return Usage(env.err, env.command, absl::StrCat("unexpected argument '", a.positionals[0], "'"));
  const auto digests = a.GetAll("profile");
  const auto candidates = a.GetAll("candidate");
  if (digests.empty() && candidates.empty()) {
    return Usage(env.err, env.command, "needs at least one --profile DIGEST or --candidate SPEC.json");
  }
  auto keys_path = a.Get("keys");
  auto values_path = a.Get("values");
  if (!keys_path && !values_path) return Usage(env.err, env.command, "needs --keys and/or --values sample files");
  std::string error;
  auto layer = ParseUint<uint32_t>(a, "layer", 0, &error);
  auto head = layer ? ParseUint<uint32_t>(a, "head", 0, &error) : std::nullopt;
  auto top_k = head ? ParseUint<uint32_t>(a, "top-k", 0, &error) : std::nullopt;
  if (!top_k) return Usage(env.err, env.command, error);

  // Budget overrides go into every candidate spec's quality_budget.
  std::map<std::string, double> budget;
  for (const char* m : {"max-logit-mse", "max-attention-tv", "max-topk-disagreement", "max-value-aggregation-mse"}) {
    if (!a.Get(m)) continue;
    auto v = ParseDouble(a, m, 0, &error);
    if (!v) return Usage(env.err, env.command, error);
    std::string key(m);
    std::replace(key.begin(), key.end(), '-', '_');
    budget[key] = *v;
  }
  if (!budget.empty() && candidates.empty()) {
    return Usage(env.err, env.command,
                 "budget flags apply to --candidate specs (a registered profile keeps its own budget)");
  }
  v1::EvaluateQualityRequest req;
  for (const auto& path : candidates) {
    auto spec = ReadFile(path, 1 << 20);
    if (!spec.ok()) return Failure(env, spec.status());
    if (budget.empty()) {
      req.add_candidate_spec_jsons(*spec);
      continue;
    }
    nlohmann::json j = nlohmann::json::parse(*spec, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      return Failure(env, absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object")));
    }
    for (const auto& [k, v] : budget) j["quality_budget"][k] = v;
    req.add_candidate_spec_jsons(j.dump());
  }
  struct Input {
    const char* flag;
    const char* tensor_flag;
    google::protobuf::RepeatedField<float>* dest;
  };
  for (const Input& in : {Input{"keys", "keys-tensor", req.mutable_keys()},
                          Input{"values", "values-tensor", req.mutable_values()},
                          Input{"queries", "queries-tensor", req.mutable_queries()}}) {
    auto path = a.Get(in.flag);
    if (!path) continue;
    auto tensor = LoadTensor(*path, TensorFlagsOf(a, in.tensor_flag));
    if (auto* u = std::get_if<UsageError>(&tensor)) return Usage(env.err, env.command, u->message);
    if (auto* s = std::get_if<absl::Status>(&tensor)) return Failure(env, *s);
    auto rows = SampleRows(std::get<Tensor>(tensor), *path, *layer, *head);
    if (!rows.ok()) return Failure(env, rows.status());
    in.dest->Add(rows->begin(), rows->end());
  }
  req.set_top_k(*top_k);

  Connection conn;
  if (int rc = Connected(env, &conn)) return rc;
  for (const auto& d : digests) {
    auto resolved = ResolveProfile(conn, d);
    if (!resolved.ok()) return Failure(env, resolved.status());
    req.add_profile_digests(*resolved);
  }
  grpc::ClientContext ctx;
  // Candidates are built on the server like registrations, hence the registration budget.
  ctx.set_deadline(std::chrono::system_clock::now() + conn.client_options.register_timeout);
  v1::EvaluateQualityResponse resp;
  grpc::Status st = conn.stub->EvaluateQuality(&ctx, req, &resp);
  if (!st.ok()) return Failure(env, client::ToAbslStatus(st, "EvaluateQuality"));
  env.out << ToJson(resp) << "\n";
  bool all_within = true;
  for (const auto& r : resp.reports()) {
    all_within = all_within && r.within_budget();
    env.err << r.profile_id() << " " << r.profile_digest() << ": "
            << (r.within_budget() ? "within budget" : "OVER BUDGET")
            << absl::StrFormat(" (mse %.4g, cosine %.5f, %.3f wire bits/coord, ratio %.2fx)",
                               r.metrics().reconstruction_mse(), r.metrics().cosine_similarity(),
                               r.wire_bits_per_coord(), r.compression_ratio());
    if (r.violations_size() > 0) env.err << ": " << absl::StrJoin(r.violations(), "; ");
    env.err << "\n";
  }
  return all_within ? kExitOk : kExitOverBudget;
}

// `fibquant recommend`: one (layer, head) of sample keys (values, queries) to RecommendProfile; the
// ranked candidates as JSON on stdout, a table and the verdict on stderr. Exit 0 with a
// recommendation, kExitOverBudget when no candidate meets the budget (an answer, not a failure).
int CmdRecommend(Env& env) {
  const Args& a = env.args;
  if (!a.positionals.empty()) return Usage(env.err, env.command, absl::StrCat("unexpected argument '", a.positionals[0], "'"));
  auto keys_path = a.Get("keys");
  auto values_path = a.Get("values");
  const std::string role = a.GetOr("role", keys_path ? "key" : "value");
  if (role != "key" && role != "value") return Usage(env.err, env.command, "--role must be key or value");
  if (role == "key" ? !keys_path : !values_path) {
    return Usage(env.err, env.command, role == "key" ? "needs --keys (the sample to compress)" : "needs --values");
  }
  std::string error;
  auto layer = ParseUint<uint32_t>(a, "layer", 0, &error);
  auto head = layer ? ParseUint<uint32_t>(a, "head", 0, &error) : std::nullopt;
  auto tpp = head ? ParseUint<uint32_t>(a, "tokens-per-page", 0, &error) : std::nullopt;
  auto min_ratio = tpp ? ParseDouble(a, "min-ratio", 0, &error) : std::nullopt;
  auto fraction = min_ratio ? ParseDouble(a, "calibration-fraction", 0, &error) : std::nullopt;
  auto max_n = fraction ? ParseUint<uint32_t>(a, "max-codebook-size", 0, &error) : std::nullopt;
  if (!max_n) return Usage(env.err, env.command, error);
  v1::RecommendProfileRequest req;
  req.set_role(role);
  req.set_min_ratio(*min_ratio);
  req.set_calibration_fraction(*fraction);
  req.set_tokens_per_page(*tpp);
  req.set_max_codebook_size(*max_n);
  req.set_profile_id_prefix(a.GetOr("prefix", ""));
  req.set_store_calibration(a.Has("store-calibration"));
  if (auto t = a.Get("target-shape")) {
    auto text = ReadFile(*t, 1 << 20);
    if (!text.ok()) return Failure(env.err, env.command, text.status());
    req.set_target_shape_json(*text);
  }
  for (const char* m : {"max-logit-mse", "max-attention-tv", "max-topk-disagreement", "max-value-aggregation-mse"}) {
    if (!a.Get(m)) continue;
    auto v = ParseDouble(a, m, 0, &error);
    if (!v) return Usage(env.err, env.command, error);
    const std::string name(m);
    v1::QualityBudget* b = req.mutable_budget();
    if (name == "max-logit-mse") b->set_max_logit_mse(*v);
    if (name == "max-attention-tv") b->set_max_attention_tv(*v);
    if (name == "max-topk-disagreement") b->set_max_topk_disagreement(*v);
    if (name == "max-value-aggregation-mse") b->set_max_value_aggregation_mse(*v);
  }
  struct Input {
    const char* flag;
    const char* tensor_flag;
    google::protobuf::RepeatedField<float>* dest;
  };
  uint32_t head_dim = 0;
  for (const Input& in : {Input{"keys", "keys-tensor", req.mutable_keys()},
                          Input{"values", "values-tensor", req.mutable_values()},
                          Input{"queries", "queries-tensor", req.mutable_queries()}}) {
    auto path = a.Get(in.flag);
    if (!path) continue;
    auto tensor = LoadTensor(*path, TensorFlagsOf(a, in.tensor_flag));
    if (auto* u = std::get_if<UsageError>(&tensor)) return Usage(env.err, env.command, u->message);
    if (auto* s = std::get_if<absl::Status>(&tensor)) return Failure(env.err, env.command, *s);
    auto l = LayoutOf(std::get<Tensor>(tensor).shape, *path);
    if (!l.ok()) return Failure(env.err, env.command, l.status());
    head_dim = l->head_dim;
    auto rows = SampleRows(std::get<Tensor>(tensor), *path, *layer, *head);
    if (!rows.ok()) return Failure(env.err, env.command, rows.status());
    in.dest->Add(rows->begin(), rows->end());
  }
  req.set_head_dim(head_dim);

  Connection conn;
  if (int rc = Connected(env, &conn)) return rc;
  grpc::ClientContext ctx;
  // Candidate codebooks are built on the server like registrations, hence the registration budget.
  ctx.set_deadline(std::chrono::system_clock::now() + conn.client_options.register_timeout);
  v1::RecommendProfileResponse resp;
  grpc::Status st = conn.stub->RecommendProfile(&ctx, req, &resp);
  if (!st.ok()) return Failure(env.err, env.command, client::ToAbslStatus(st, "RecommendProfile"));
  env.out << ToJson(resp) << "\n";
  env.err << absl::StrFormat("calibrated on %u tokens, measured on %u held-out tokens in %.1f s; calibration %s%s\n",
                             resp.calibration_tokens(), resp.evaluation_tokens(), resp.seconds(),
                             resp.calibration_digest(), resp.calibration_stored() ? " (stored)" : "");
  for (int i = 0; i < resp.candidates_size(); ++i) {
    const auto& c = resp.candidates(i);
    env.err << absl::StrFormat("%s %-36s ratio %6.2fx  %s%s\n", i == resp.best_index() ? "*" : " ", c.profile_id(),
                               c.compression_ratio(), c.qualifies() ? "qualifies" : "no: ", c.reason());
  }
  env.err << resp.summary() << "\n";
  return resp.best_index() >= 0 ? kExitOk : kExitOverBudget;
}

int CmdBench(Env& env) {
  const Args& a = env.args;
  if (!a.positionals.empty()) return Usage(env.err, env.command, absl::StrCat("unexpected argument '", a.positionals[0], "'"));
  BenchOptions o;
  std::string error;
  auto streams = ParseUint<uint32_t>(a, "streams", o.streams, &error);
  auto pages = streams ? ParseUint<uint32_t>(a, "pages", o.pages_per_stream, &error) : std::nullopt;
  auto tokens = pages ? ParseUint<uint32_t>(a, "page-tokens", o.page_tokens, &error) : std::nullopt;
  auto dim = tokens ? ParseUint<uint32_t>(a, "head-dim", o.head_dim, &error) : std::nullopt;
  auto window = dim ? ParseUint<uint32_t>(a, "window", o.window, &error) : std::nullopt;
  auto seed = window ? ParseUint<uint64_t>(a, "seed", o.seed, &error) : std::nullopt;
  auto secs = seed ? ParseDouble(a, "max-seconds", o.max_seconds, &error) : std::nullopt;
  auto bound = secs ? ParseDouble(a, "max-rel-mse", o.max_rel_mse, &error) : std::nullopt;
  auto channels = bound ? ParseUint<uint32_t>(a, "channels", o.channels, &error) : std::nullopt;
  auto every = channels ? ParseUint<uint32_t>(a, "verify-every", o.verify_every, &error) : std::nullopt;
  if (!every) return Usage(env.err, env.command, error);
  o.channels = *channels;
  o.verify_every = *every;
  o.transport_ceiling = a.Has("transport-ceiling");
  o.streams = *streams;
  o.pages_per_stream = *pages;
  o.page_tokens = *tokens;
  o.head_dim = *dim;
  o.window = *window;
  o.seed = *seed;
  o.max_seconds = *secs;
  o.max_rel_mse = *bound;
  if (auto d = a.Get("dtype")) {
    auto dt = ParseDTypeFlag("dtype", *d, &error);
    if (!dt) return Usage(env.err, env.command, error);
    o.dtype = *dt;
  }
  o.profile_digest = a.GetOr("profile", "");
  o.spec_path = a.GetOr("spec", "");
  absl::Status valid = ValidateBenchOptions(o, env.conn_flags.server);
  if (!valid.ok()) return Usage(env.err, env.command, std::string(valid.message()));
  Connection conn;
  if (int rc = Connected(env, &conn)) return rc;
  if (!o.profile_digest.empty()) {
    auto resolved = ResolveProfile(conn, o.profile_digest);
    if (!resolved.ok()) return Failure(env, resolved.status());
    o.profile_digest = *resolved;
  }
  auto report = RunBench(o, conn, env.conn_flags.server, &env.conn_flags);
  if (!report.ok()) return Failure(env, report.status());
  env.out << report->dump(2) << "\n";
  const auto& c = (*report)["compress"];
  env.err << absl::StrFormat(
      "bench: %d streams x %d pages: compress %.1f pages/s (%s/s in), latency p50 %.2f ms p90 %.2f ms p99 %.2f ms; "
      "decompress %.1f pages/s; %d pages checked, max rel err %.3g; %d errors\n",
      o.streams, o.pages_per_stream, c["pages_per_second"].get<double>(),
      HumanBytes(c["raw_bytes_per_second"].get<double>()), c["latency_ms"]["p50"].get<double>(),
      c["latency_ms"]["p90"].get<double>(), c["latency_ms"]["p99"].get<double>(),
      (*report)["decompress"]["pages_per_second"].get<double>(),
      (*report)["round_trip"]["checked_pages"].get<uint64_t>(), (*report)["round_trip"]["max_rel_mse"].get<double>(),
      (*report)["errors"].get<uint64_t>());
  if (report->contains("transport_ceiling")) {
    const auto& t = (*report)["transport_ceiling"];
    env.err << absl::StrFormat(
        "bench: transport ceiling (raw profile, same streams): compress %.1f pages/s, decompress %.1f pages/s; "
        "codec at %.2f / %.2f of it\n",
        t["compress"]["pages_per_second"].get<double>(), t["decompress"]["pages_per_second"].get<double>(),
        (*report)["codec_vs_transport"]["compress"].get<double>(),
        (*report)["codec_vs_transport"]["decompress"].get<double>());
  }
  if ((*report)["errors"].get<uint64_t>() != 0) {
    env.err << "fibquant bench: error: " << (*report).value("first_error", std::string("errors")) << "\n";
    return kExitFailure;
  }
  return kExitOk;
}

struct Command {
  int (*run)(Env&);
  FlagSpec flags;
};

std::map<std::string, Command> Commands() {
  std::set<std::string> tensor = kTensorFlags;
  FlagSpec compress{tensor, {}, {"npy-bf16"}};
  compress.values.insert({"profile", "in", "out", "label", "window"});
  FlagSpec eval{{"format", "raw-dtype", "shape", "keys", "values", "queries", "keys-tensor", "values-tensor",
                 "queries-tensor", "layer", "head", "top-k", "max-logit-mse", "max-attention-tv",
                 "max-topk-disagreement", "max-value-aggregation-mse"},
                {"profile", "candidate"},
                {"npy-bf16"}};
  return {
      {"profile", {CmdProfile, {}}},
      {"compress", {CmdCompress, compress}},
      {"decompress", {CmdDecompress, {{"in", "out", "dtype", "format", "window"}, {}, {}}}},
      {"receipt", {CmdReceipt, {}}},
      {"info", {CmdInfo, {}}},
      {"health", {CmdHealth, {}}},
      {"eval", {CmdEval, eval}},
      {"recommend",
       {CmdRecommend,
        {{"format", "raw-dtype", "shape", "keys", "values", "queries", "keys-tensor", "values-tensor",
          "queries-tensor", "layer", "head", "role", "tokens-per-page", "min-ratio", "calibration-fraction",
          "prefix", "target-shape", "max-codebook-size", "max-logit-mse", "max-attention-tv", "max-topk-disagreement",
          "max-value-aggregation-mse"},
         {},
         {"npy-bf16", "store-calibration"}}}},
      {"bench",
       {CmdBench,
        {{"streams", "pages", "page-tokens", "head-dim", "dtype", "profile", "spec", "window", "max-seconds",
          "max-rel-mse", "seed", "channels", "verify-every"},
         {},
         {"transport-ceiling"}}}},
  };
}

}  // namespace

int RunCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  if (args.empty()) {
    err << kUsage << kCommonFlagsHelp;
    return kExitUsage;
  }
  if (args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    out << kUsage << kCommonFlagsHelp;
    return kExitOk;
  }
  const auto commands = Commands();
  auto it = commands.find(args[0]);
  if (it == commands.end()) return Usage(err, "", absl::StrCat("unknown command '", args[0], "'"));
  auto parsed = ParseArgs(std::span<const std::string>(args).subspan(1), it->second.flags);
  if (auto* u = std::get_if<UsageError>(&parsed)) return Usage(err, args[0], u->message);
  Args a = std::move(std::get<Args>(parsed));
  if (a.Has("help")) {
    out << kUsage << kCommonFlagsHelp;
    return kExitOk;
  }
  auto conn = ConnectionFlagsOf(a);
  if (auto* u = std::get_if<UsageError>(&conn)) return Usage(err, args[0], u->message);
  Env env{args[0], std::move(a), std::get<ConnectionFlags>(conn), out, err};
  return it->second.run(env);
}

}  // namespace fibquant::cli
