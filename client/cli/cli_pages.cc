// `fibquant compress` and `fibquant decompress`: a tensor file to pages on a CompressPages stream
// and into a .fqc container, and back (client/cli/cli_internal.h, client/cli/container.h).
#include <algorithm>
#include <chrono>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/cli/cli_internal.h"
#include "client/cli/container.h"
#include "client/cli/kv_pages.h"
#include "client/client.h"
#include "core/kv_codec.h"
#include "core/kv_profile.h"
#include "nlohmann/json.hpp"

namespace fibquant::cli::internal {
namespace {

// A stream repeated after UNAVAILABLE, with fq_client's backoff (client/client.h): a server
// restarting or draining, or one building the profile from header.register_if_missing, which
// answers UNAVAILABLE ("building ... retry shortly") until the build is done. A build may take as
// long as a registration, so while the header carries a spec the retries go on up to the
// registration deadline (bounded in count too). Repeating a stream is safe: the same pages give the
// same frames, and a stream refused at its header stores no receipt.
template <typename T, typename Fn>
absl::StatusOr<T> WithStreamRetries(Env& env, const Connection& conn, bool building, Fn&& attempt) {
  constexpr int kMaxBuildAttempts = 200;
  const client::ClientOptions& o = conn.client_options;
  const auto give_up = std::chrono::steady_clock::now() + o.register_timeout;
  std::chrono::duration<double, std::milli> backoff = o.initial_backoff;
  std::mt19937_64 gen{std::random_device{}()};
  for (int n = 1;; ++n) {
    absl::StatusOr<T> r = attempt();
    if (r.ok() || r.status().code() != absl::StatusCode::kUnavailable) return r;
    // Only the server's own "building it from header.register_if_missing" answer earns the long
    // wait; a server that is down or draining gets fq_client's few attempts.
    const bool build_running = building && absl::StrContains(r.status().message(), "register_if_missing");
    const bool again = n < o.max_attempts ||
                       (build_running && n < kMaxBuildAttempts && std::chrono::steady_clock::now() < give_up);
    if (!again) return r;
    env.err << "fibquant " << env.command << ": UNAVAILABLE: " << r.status().message() << "; retrying\n";
    std::this_thread::sleep_for(backoff * std::uniform_real_distribution<double>(0.5, 1.0)(gen));
    backoff = std::min<std::chrono::duration<double, std::milli>>(backoff * o.backoff_multiplier, o.max_backoff);
  }
}

}  // namespace

int CmdCompress(Env& env) {
  const Args& a = env.args;
  if (!a.positionals.empty()) return Usage(env.err, env.command, absl::StrCat("unexpected argument '", a.positionals[0], "'"));
  auto digest = a.Get("profile");
  auto spec_path = a.Get("spec");
  auto in = a.Get("in");
  auto out_path = a.Get("out");
  if ((!digest && !spec_path) || !in || !out_path) {
    return Usage(env.err, env.command, "needs --profile (or --spec), --in and --out");
  }
  if (spec_path && digest && !digest->starts_with("sha256:")) {
    return Usage(env.err, env.command, "with --spec, --profile must be the spec's digest (sha256:...), not an id");
  }
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

  // --spec: the CLI holds the whole spec, so the stream header carries it (register_if_missing) and
  // a server without the profile (a fresh replica behind a load balancer) builds it. The header
  // names the profile by digest; without --profile it is learnt by building the profile here as
  // the server does (deterministic: same spec, same digest on every machine).
  std::optional<std::string> spec_json;
  std::optional<KvCompressionProfile> profile;
  std::string profile_id;
  if (spec_path) {
    auto text = ReadFile(*spec_path, 1 << 20);
    if (!text.ok()) return Failure(env, text.status());
    auto p = KvCompressionProfile::FromSpecJson(*text);
    if (!p.ok()) {
      return Failure(env, absl::Status(p.status().code(), absl::StrCat(*spec_path, ": ", p.status().message())));
    }
    if (!digest) {
      auto codec = KvCodec::Build(*p);
      if (!codec.ok()) {
        return Failure(env, absl::Status(codec.status().code(),
                                         absl::StrCat(*spec_path, ": building the profile to learn its digest: ",
                                                      codec.status().message(),
                                                      " (a calibrated spec: pass its digest with --profile)")));
      }
      digest = (*codec)->profile_digest();
    }
    spec_json = *std::move(text);
    profile_id = p->profile_id;
    profile = *std::move(p);
  }

  Connection conn;
  if (int rc = Connected(env, &conn)) return rc;
  if (!spec_path) {
    auto resolved = ResolveProfile(conn, *digest);
    if (!resolved.ok()) return Failure(env, resolved.status());
    digest = *resolved;
    client::KvClient kv(conn.channel, conn.client_options);
    auto info = kv.GetProfile(*digest);
    if (!info.ok()) return Failure(env, info.status());
    auto p = KvCompressionProfile::FromJson(info->profile_json());
    if (!p.ok()) {
      return Failure(env.err, env.command,
                     absl::Status(p.status().code(), absl::StrCat("profile ", *digest, " from the server: ",
                                                                  p.status().message())));
    }
    profile_id = info->profile_id();
    profile = *std::move(p);
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
  StreamOptions stream_options{conn.stream_deadline, *window, ""};
  const bool register_if_missing = spec_json && !a.Has("no-register-if-missing");
  if (register_if_missing) {
    header.mutable_register_if_missing()->set_spec_json(*spec_json);
    stream_options.bearer_token = conn.client_options.admin_token;
  }
  auto result = WithStreamRetries<CompressStreamResult>(env, conn, register_if_missing, [&] {
    Progress progress("compress", pages.size(), env.progress());
    auto r = CompressStream(*conn.stub, header, pages, stream_options,
                            [&](uint64_t n, uint64_t b) { progress.Update(n, b); });
    progress.Finish();
    return r;
  });
  if (!result.ok()) return Failure(env, result.status());

  nlohmann::json meta = {
      {"schema", "fq_cli_container_meta_v1"},
      {"profile_digest", *digest},
      {"profile_id", profile_id},
      {"source", {{"file", *in}, {"dtype", std::string(DTypeName(source_dtype))}, {"shape", source_shape}}},
      {"page_dtype", std::string(DTypeName(page_dtype))},
      {"tokens_per_page", tpp},
      {"pages", pages.size()}};
  // Kept so that `decompress` can send it too (register_if_missing on its stream header).
  if (spec_json) meta["profile_spec_json"] = *spec_json;
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
  std::optional<std::string> spec_json;  // written by `compress --spec`
  if (meta.contains("profile_spec_json")) {
    if (!meta["profile_spec_json"].is_string()) return bad_meta("profile_spec_json is not a string");
    spec_json = meta["profile_spec_json"].get<std::string>();
  }

  Connection conn;
  if (int rc = Connected(env, &conn)) return rc;
  v1::DecompressStreamHeader header;
  header.set_output_dtype(ToProto(dtype));
  header.set_profile_digest(digest);
  StreamOptions stream_options{conn.stream_deadline, *window, ""};
  const bool register_if_missing = spec_json && !a.Has("no-register-if-missing");
  if (register_if_missing) {
    header.mutable_register_if_missing()->set_spec_json(*spec_json);
    stream_options.bearer_token = conn.client_options.admin_token;
  }
  auto result = WithStreamRetries<DecompressStreamResult>(env, conn, register_if_missing, [&] {
    Progress progress("decompress", c->frames.size(), env.progress());
    auto r = DecompressStream(*conn.stub, header, c->frames, stream_options,
                              [&](uint64_t n, uint64_t b) { progress.Update(n, b); });
    progress.Finish();
    return r;
  });
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

}  // namespace fibquant::cli::internal
