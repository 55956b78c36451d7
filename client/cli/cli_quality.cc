// `fibquant eval` (EvaluateQuality) and `fibquant recommend` (RecommendProfile): sample tensors
// measured against registered profiles or candidate specs (client/cli/cli_internal.h).
#include <algorithm>
#include <chrono>
#include <map>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/cli/cli_internal.h"
#include "client/cli/kv_pages.h"
#include "client/client.h"
#include "nlohmann/json.hpp"

namespace fibquant::cli::internal {

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

}  // namespace fibquant::cli::internal
