// `fibquant profile register|get|list`, `receipt`, `health`, `info`: the registry and server
// administration commands (client/cli/cli_internal.h).
#include <string>

#include "client/cli/cli_internal.h"
#include "client/client.h"
#include "nlohmann/json.hpp"

namespace fibquant::cli::internal {

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

}  // namespace fibquant::cli::internal
