#include "client/cli/cli.h"

#include <map>
#include <span>
#include <string>
#include <variant>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli/bench.h"
#include "client/cli/cli_internal.h"
#include "nlohmann/json.hpp"

namespace fibquant::cli {
namespace {

using internal::Args;
using internal::CmdCompress;
using internal::CmdDecompress;
using internal::CmdEval;
using internal::CmdHealth;
using internal::CmdInfo;
using internal::CmdProfile;
using internal::CmdReceipt;
using internal::CmdRecommend;
using internal::Connected;
using internal::ConnectionFlagsOf;
using internal::Env;
using internal::Failure;
using internal::FlagSpec;
using internal::kTensorFlags;
using internal::ParseArgs;
using internal::ParseDouble;
using internal::ParseDTypeFlag;
using internal::ParseUint;
using internal::ResolveProfile;
using internal::Usage;
using internal::UsageError;

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
    "  compress (--profile DIGEST|ID | --spec SPEC.json [--profile DIGEST]) --in FILE --out FILE.fqc\n"
    "           [--format npy|safetensors|raw] [--tensor NAME] [--raw-dtype f32|f16|bf16 --shape D0,D1,..]\n"
    "           [--npy-bf16] [--label TEXT] [--window N] [--no-register-if-missing]\n"
    "                                 --spec: the stream carries the spec, so a server without the\n"
    "                                 profile builds it (register_if_missing; kept in the .fqc for\n"
    "                                 decompress); without --profile the digest is computed locally\n"
    "  decompress --in FILE.fqc --out FILE [--dtype f16|bf16|f32] [--format npy|raw] [--window N]\n"
    "           [--no-register-if-missing]\n"
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
  compress.values.insert({"profile", "spec", "in", "out", "label", "window"});
  compress.bools.insert("no-register-if-missing");
  FlagSpec eval{{"format", "raw-dtype", "shape", "keys", "values", "queries", "keys-tensor", "values-tensor",
                 "queries-tensor", "layer", "head", "top-k", "max-logit-mse", "max-attention-tv",
                 "max-topk-disagreement", "max-value-aggregation-mse"},
                {"profile", "candidate"},
                {"npy-bf16"}};
  return {
      {"profile", {CmdProfile, {}}},
      {"compress", {CmdCompress, compress}},
      {"decompress", {CmdDecompress, {{"in", "out", "dtype", "format", "window"}, {}, {"no-register-if-missing"}}}},
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
