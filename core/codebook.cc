#include "core/codebook.h"

#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/digest.h"
#include "core/directions.h"
#include "core/lloyd.h"
#include "core/parallel.h"
#include "core/radii.h"
#include "core/rotation.h"
#include "core/status_macros.h"

namespace fibquant {

// Fills the private fields of a Codebook (declared a friend in codebook.h).
class CodebookBuilder {
 public:
  static Codebook Make(Profile profile, std::string profile_digest, std::string rotation_digest,
                       std::vector<float> codewords, LloydReport report, BuildStats stats) {
    Codebook c;
    c.profile_ = std::move(profile);
    c.profile_digest_ = std::move(profile_digest);
    c.rotation_digest_ = std::move(rotation_digest);
    c.codewords_ = std::move(codewords);
    c.report_ = std::move(report);
    c.stats_ = stats;
    c.digest_ = CodebookDigest(c.profile_digest_, c.rotation_digest_, c.size(), c.dim(),
                               c.codewords_, c.report_);
    return c;
  }
};

namespace {

constexpr uint64_t kRestartSeedStep = 0x9E3779B9ull;

std::string S(std::string_view v) { return std::string(v); }

absl::StatusOr<std::vector<double>> Directions(const Profile& p) {
  switch (p.direction_method) {
    case DirectionMethod::kFibonacciSpiral:
      return FibonacciSpiral(p.codebook_size);
    case DirectionMethod::kFibonacciSphere:
      return FibonacciSphere(p.codebook_size);
    case DirectionMethod::kRobertsKronecker:
      return RobertsKronecker(p.block_dim, p.codebook_size);
    case DirectionMethod::kScalarQuantile:
      break;
  }
  return absl::InvalidArgumentError("profile.direction_method has no direction generator");
}

absl::Status CheckReport(const Profile& p, const LloydReport& r) {
  if (r.restarts != p.lloyd_restarts || r.iterations != p.lloyd_iterations ||
      r.training_samples != p.training_samples || r.seed != p.codebook_seed) {
    return absl::InvalidArgumentError(absl::StrCat(
        "codebook report (restarts ", r.restarts, ", iterations ", r.iterations,
        ", training_samples ", r.training_samples, ", seed ", r.seed,
        ") does not match the profile (", p.lloyd_restarts, ", ", p.lloyd_iterations, ", ",
        p.training_samples, ", ", p.codebook_seed, ")"));
  }
  if (!std::isfinite(r.init_mse) || !std::isfinite(r.best_mse) || r.init_mse < 0 ||
      r.best_mse < 0 || r.best_mse > r.init_mse) {
    return absl::InvalidArgumentError(
        absl::StrCat("codebook report: init_mse ", r.init_mse, " and best_mse ", r.best_mse,
                     " must be finite, >= 0 and best_mse <= init_mse"));
  }
  if (r.best_restart >= r.restarts) {
    return absl::InvalidArgumentError(absl::StrCat("codebook report: best_restart ", r.best_restart,
                                                   " must be < restarts ", r.restarts));
  }
  for (size_t i = 0; i < r.repair_events.size(); ++i) {
    const RepairEvent& e = r.repair_events[i];
    if (e.restart >= r.restarts || e.iteration >= r.iterations || e.empty_cell >= p.codebook_size ||
        e.donor_cell >= p.codebook_size || e.empty_cell == e.donor_cell ||
        !std::isfinite(e.donor_distortion) || !std::isfinite(e.residual_norm)) {
      return absl::InvalidArgumentError(
          absl::StrCat("codebook report: repair_events[", i, "] is out of range"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckCodewords(const Profile& p, const std::vector<float>& cw) {
  const size_t k = p.block_dim;
  const size_t want = static_cast<size_t>(p.codebook_size) * k;
  if (cw.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("codebook: ", cw.size(),
                                                   " codeword values, expected N*k = ", want));
  }
  for (size_t t = 0; t < p.codebook_size; ++t) {
    double s = 0.0;
    for (size_t j = 0; j < k; ++j) {
      const float v = cw[t * k + j];
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("codebook: codeword ", t, " component ", j, " is not finite"));
      }
      s += static_cast<double>(v) * static_cast<double>(v);
    }
    if (std::sqrt(s) > 1.0 + 1e-6) {
      return absl::InvalidArgumentError(absl::StrCat(
          "codebook: codeword ", t, " has norm ", std::sqrt(s), " outside the unit ball (+1e-6)"));
    }
  }
  return absl::OkStatus();
}

// An empty-cell split moves the donor 1e-6 away from its farthest sample; a donor split again
// and again in one Lloyd pass (few samples per cell: d=2, k=1, N=16384 on 16384 samples) drifts
// that far outward each time and can end its last pass 2e-5 outside the unit ball, which
// CheckCodewords then refuses after the whole build. Such a codeword (norm > 1 + 1e-6 in f64) is
// scaled back onto the unit sphere. Codewords within the tolerance are left untouched, so every
// codebook a build produced before this rule keeps its bytes and digest.
void ProjectFarOutsideCodewords(uint32_t k, std::vector<double>* c) {
  for (size_t t = 0; t + k <= c->size(); t += k) {
    double s = 0.0;
    for (uint32_t j = 0; j < k; ++j) s += (*c)[t + j] * (*c)[t + j];
    const double norm = std::sqrt(s);
    if (norm > 1.0 + 1e-6) {
      for (uint32_t j = 0; j < k; ++j) (*c)[t + j] /= norm;
    }
  }
}

}  // namespace

absl::StatusOr<std::vector<double>> InitialCodebook(const Profile& p) {
  FQ_RETURN_IF_ERROR(p.Validate());
  const uint32_t n = p.codebook_size, k = p.block_dim, d = p.rotation_dim();
  std::vector<double> c;
  if (p.direction_method == DirectionMethod::kScalarQuantile) {
    FQ_ASSIGN_OR_RETURN(c, ScalarQuantileCodewords(d, n));
  } else {
    std::vector<double> r;
    if (p.radius_method == RadiusMethod::kK2ClosedForm) {
      FQ_ASSIGN_OR_RETURN(r, K2ClosedFormRadii(d, n));
    } else {
      FQ_ASSIGN_OR_RETURN(r, BetaQuantileRadii(d, k, n));
    }
    std::vector<double> u;
    FQ_ASSIGN_OR_RETURN(u, Directions(p));
    if (u.size() != static_cast<size_t>(n) * k) {
      return absl::InternalError("InitialCodebook: direction generator returned the wrong size");
    }
    c.resize(u.size());
    for (size_t t = 0; t < n; ++t) {
      for (size_t j = 0; j < k; ++j) c[t * k + j] = r[t] * u[t * k + j];
    }
  }
  // libm and Boost may differ in the last ulp between CPUs; rounding to f32 removes that
  // difference except when a value lies within an ulp of an f32 rounding boundary.
  for (size_t i = 0; i < c.size(); ++i) {
    c[i] = static_cast<double>(static_cast<float>(c[i]));
    if (!std::isfinite(c[i])) {
      return absl::InternalError(
          absl::StrCat("InitialCodebook: value ", i, " (codeword ", i / k, ") is not finite"));
    }
  }
  return c;
}

absl::StatusOr<std::vector<double>> TrainingSamples(const Profile& p) {
  FQ_RETURN_IF_ERROR(p.Validate());
  return SphericalBetaSamples(p.rotation_dim(), p.block_dim, p.training_samples,
                              p.codebook_seed ^ kTrainingSeedXor);
}

absl::StatusOr<std::vector<double>> RestartStart(const Profile& p,
                                                 const std::vector<double>& initial,
                                                 uint32_t restart) {
  const uint32_t k = p.block_dim;
  std::vector<double> c(initial.size());
  if (k == 1) {
    const double sign = restart % 2 == 0 ? 1.0 : -1.0;
    for (size_t i = 0; i < c.size(); ++i) c[i] = sign * initial[i];
    return c;
  }
  FQ_ASSIGN_OR_RETURN(
      Rotation q, Rotation::Create(kRotationHaarQr, k,
                                   p.codebook_seed + static_cast<uint64_t>(restart) * kRestartSeedStep));
  for (size_t t = 0; t + k <= initial.size(); t += k) q.Apply(&initial[t], &c[t]);
  return c;
}

std::string CodebookDigest(std::string_view profile_digest, std::string_view rotation_digest,
                           uint32_t codebook_size, uint32_t block_dim,
                           const std::vector<float>& codewords, const LloydReport& r) {
  CanonicalWriter w(kCodebookSchema);
  w.Str(profile_digest);
  w.Str(rotation_digest);
  w.U32(codebook_size);
  w.U32(block_dim);
  for (float v : codewords) w.F32(v);
  w.F64(r.init_mse);
  w.F64(r.best_mse);
  w.U32(r.restarts);
  w.U32(r.iterations);
  w.U32(r.training_samples);
  w.U32(r.best_restart);
  w.U64(r.seed);
  w.U32(static_cast<uint32_t>(r.repair_events.size()));
  for (const RepairEvent& e : r.repair_events) {
    w.U32(e.restart);
    w.U32(e.iteration);
    w.U32(e.empty_cell);
    w.U32(e.donor_cell);
    w.U64(e.donor_count_before);
    w.F64(e.donor_distortion);
    w.F64(e.residual_norm);
  }
  return w.Digest();
}

absl::StatusOr<Codebook> Codebook::Build(const Profile& profile, int threads,
                                         const CancelToken* cancel) {
  const auto start = std::chrono::steady_clock::now();
  FQ_RETURN_IF_ERROR(profile.Validate());
  FQ_ASSIGN_OR_RETURN(std::string profile_digest, profile.Digest());
  std::string rotation_digest;
  {
    FQ_ASSIGN_OR_RETURN(Rotation rot, Rotation::Create(profile.rotation_algorithm,
                                                       profile.rotation_dim(), profile.rotation_seed));
    rotation_digest = rot.digest();
  }
  FQ_RETURN_IF_ERROR(CheckCancelled(cancel, "codebook build (after the rotation)"));
  FQ_ASSIGN_OR_RETURN(std::vector<double> initial, InitialCodebook(profile));
  FQ_ASSIGN_OR_RETURN(std::vector<double> samples, TrainingSamples(profile));
  FQ_RETURN_IF_ERROR(CheckCancelled(cancel, "codebook build (after sampling)"));
  LloydParams params;
  params.block_dim = profile.block_dim;
  params.restarts = profile.lloyd_restarts;
  params.iterations = profile.lloyd_iterations;
  params.empty_cell_policy = profile.empty_cell_policy;
  params.threads = threads;
  params.cancel = cancel;
  FQ_ASSIGN_OR_RETURN(
      LloydResult lloyd,
      RunLloyd(initial, samples, params, [&](uint32_t r) { return RestartStart(profile, initial, r); }));
  lloyd.report.seed = profile.codebook_seed;
  ProjectFarOutsideCodewords(profile.block_dim, &lloyd.codewords);
  std::vector<float> codewords(lloyd.codewords.size());
  for (size_t i = 0; i < codewords.size(); ++i) {
    codewords[i] = static_cast<float>(lloyd.codewords[i]);
  }
  FQ_RETURN_IF_ERROR(CheckCodewords(profile, codewords));
  BuildStats stats;
  stats.threads = threads <= 0 ? DefaultThreadCount() : threads;
  stats.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return CodebookBuilder::Make(profile, std::move(profile_digest), std::move(rotation_digest),
                               std::move(codewords), std::move(lloyd.report), stats);
}

absl::StatusOr<Codebook> Codebook::FromStored(const Profile& profile, std::vector<float> codewords,
                                              LloydReport report,
                                              std::string_view expected_digest) {
  FQ_RETURN_IF_ERROR(profile.Validate());
  if (!IsDigestString(expected_digest)) {
    return absl::InvalidArgumentError(
        absl::StrCat("codebook_digest \"", S(expected_digest), "\" is not a sha256: digest"));
  }
  FQ_RETURN_IF_ERROR(CheckCodewords(profile, codewords));
  FQ_RETURN_IF_ERROR(CheckReport(profile, report));
  FQ_ASSIGN_OR_RETURN(std::string profile_digest, profile.Digest());
  FQ_ASSIGN_OR_RETURN(Rotation rot, Rotation::Create(profile.rotation_algorithm,
                                                     profile.rotation_dim(), profile.rotation_seed));
  Codebook c = CodebookBuilder::Make(profile, std::move(profile_digest), rot.digest(),
                                     std::move(codewords), std::move(report), BuildStats{});
  if (c.digest() != expected_digest) {
    return absl::DataLossError(absl::StrCat("codebook digest mismatch: stored ",
                                            S(expected_digest), ", recomputed ", c.digest()));
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// JSON

std::string Codebook::ToJson(int indent) const {
  nlohmann::json events = nlohmann::json::array();
  for (const RepairEvent& e : report_.repair_events) {
    events.push_back({{"restart", e.restart},
                      {"iteration", e.iteration},
                      {"empty_cell", e.empty_cell},
                      {"donor_cell", e.donor_cell},
                      {"donor_count_before", e.donor_count_before},
                      {"donor_distortion", e.donor_distortion},
                      {"residual_norm", e.residual_norm}});
  }
  nlohmann::json cw = nlohmann::json::array();
  for (float v : codewords_) cw.push_back(static_cast<double>(v));
  nlohmann::json j;
  j["schema"] = S(kCodebookSchema);
  j["profile"] = profile_.ToJsonValue();
  j["profile_digest"] = profile_digest_;
  j["rotation_digest"] = rotation_digest_;
  j["codebook_digest"] = digest_;
  j["codewords"] = std::move(cw);
  j["report"] = {{"restarts", report_.restarts},
                 {"iterations", report_.iterations},
                 {"training_samples", report_.training_samples},
                 {"init_mse", report_.init_mse},
                 {"best_mse", report_.best_mse},
                 {"best_restart", report_.best_restart},
                 {"seed", report_.seed},
                 {"repair_events", std::move(events)}};
  return j.dump(indent);
}

namespace {

absl::Status CheckKeys(const nlohmann::json& obj, const std::set<std::string>& keys,
                       const std::string& ctx) {
  if (!obj.is_object()) return absl::InvalidArgumentError(ctx + " must be a JSON object");
  for (const auto& [key, value] : obj.items()) {
    if (!keys.count(key)) {
      return absl::InvalidArgumentError(absl::StrCat(ctx, ": unknown field \"", key, "\""));
    }
  }
  for (const std::string& key : keys) {
    if (!obj.contains(key)) {
      return absl::InvalidArgumentError(absl::StrCat(ctx, ": missing field \"", key, "\""));
    }
  }
  return absl::OkStatus();
}

template <typename T>
absl::StatusOr<T> GetUnsigned(const nlohmann::json& obj, const std::string& key,
                              const std::string& ctx) {
  const nlohmann::json& v = obj.at(key);
  if (!v.is_number_unsigned() || v.get<uint64_t>() > std::numeric_limits<T>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, ".", key, " must be an unsigned integer <= ",
                                                   std::numeric_limits<T>::max()));
  }
  return static_cast<T>(v.get<uint64_t>());
}

absl::StatusOr<double> GetDouble(const nlohmann::json& obj, const std::string& key,
                                 const std::string& ctx) {
  const nlohmann::json& v = obj.at(key);
  if (!v.is_number()) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, ".", key, " must be a number"));
  }
  return v.get<double>();
}

absl::StatusOr<std::string> GetString(const nlohmann::json& obj, const std::string& key,
                                      const std::string& ctx) {
  const nlohmann::json& v = obj.at(key);
  if (!v.is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, ".", key, " must be a string"));
  }
  return v.get<std::string>();
}

}  // namespace

absl::StatusOr<Codebook> Codebook::FromJson(std::string_view json) {
  nlohmann::json j = nlohmann::json::parse(json.begin(), json.end(), nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError("codebook JSON does not parse");
  const std::string ctx = "codebook";
  FQ_RETURN_IF_ERROR(CheckKeys(j,
                               {"schema", "profile", "profile_digest", "rotation_digest",
                                "codebook_digest", "codewords", "report"},
                               ctx));
  FQ_ASSIGN_OR_RETURN(std::string schema, GetString(j, "schema", ctx));
  if (schema != kCodebookSchema) {
    return absl::InvalidArgumentError(absl::StrCat("codebook.schema must be \"",
                                                   S(kCodebookSchema), "\"; got \"", schema, "\""));
  }
  FQ_ASSIGN_OR_RETURN(Profile profile, Profile::FromJsonValue(j.at("profile")));
  FQ_ASSIGN_OR_RETURN(std::string profile_digest, GetString(j, "profile_digest", ctx));
  FQ_ASSIGN_OR_RETURN(std::string rotation_digest, GetString(j, "rotation_digest", ctx));
  FQ_ASSIGN_OR_RETURN(std::string codebook_digest, GetString(j, "codebook_digest", ctx));

  const nlohmann::json& cw = j.at("codewords");
  if (!cw.is_array()) return absl::InvalidArgumentError("codebook.codewords must be an array");
  std::vector<float> codewords;
  codewords.reserve(cw.size());
  for (size_t i = 0; i < cw.size(); ++i) {
    if (!cw[i].is_number()) {
      return absl::InvalidArgumentError(absl::StrCat("codebook.codewords[", i, "] is not a number"));
    }
    const double v = cw[i].get<double>();
    const float f = static_cast<float>(v);
    if (!std::isfinite(f) || static_cast<double>(f) != v) {
      return absl::InvalidArgumentError(
          absl::StrCat("codebook.codewords[", i, "] = ", v, " is not a finite f32 value"));
    }
    codewords.push_back(f);
  }

  const std::string rctx = "codebook.report";
  const nlohmann::json& r = j.at("report");
  FQ_RETURN_IF_ERROR(CheckKeys(r,
                               {"restarts", "iterations", "training_samples", "init_mse",
                                "best_mse", "best_restart", "seed", "repair_events"},
                               rctx));
  LloydReport rep;
  FQ_ASSIGN_OR_RETURN(rep.restarts, GetUnsigned<uint32_t>(r, "restarts", rctx));
  FQ_ASSIGN_OR_RETURN(rep.iterations, GetUnsigned<uint32_t>(r, "iterations", rctx));
  FQ_ASSIGN_OR_RETURN(rep.training_samples, GetUnsigned<uint32_t>(r, "training_samples", rctx));
  FQ_ASSIGN_OR_RETURN(rep.init_mse, GetDouble(r, "init_mse", rctx));
  FQ_ASSIGN_OR_RETURN(rep.best_mse, GetDouble(r, "best_mse", rctx));
  FQ_ASSIGN_OR_RETURN(rep.best_restart, GetUnsigned<uint32_t>(r, "best_restart", rctx));
  FQ_ASSIGN_OR_RETURN(rep.seed, GetUnsigned<uint64_t>(r, "seed", rctx));
  const nlohmann::json& ev = r.at("repair_events");
  if (!ev.is_array()) return absl::InvalidArgumentError("codebook.report.repair_events must be an array");
  for (size_t i = 0; i < ev.size(); ++i) {
    const std::string ectx = absl::StrCat(rctx, ".repair_events[", i, "]");
    FQ_RETURN_IF_ERROR(CheckKeys(ev[i],
                                 {"restart", "iteration", "empty_cell", "donor_cell",
                                  "donor_count_before", "donor_distortion", "residual_norm"},
                                 ectx));
    RepairEvent e;
    FQ_ASSIGN_OR_RETURN(e.restart, GetUnsigned<uint32_t>(ev[i], "restart", ectx));
    FQ_ASSIGN_OR_RETURN(e.iteration, GetUnsigned<uint32_t>(ev[i], "iteration", ectx));
    FQ_ASSIGN_OR_RETURN(e.empty_cell, GetUnsigned<uint32_t>(ev[i], "empty_cell", ectx));
    FQ_ASSIGN_OR_RETURN(e.donor_cell, GetUnsigned<uint32_t>(ev[i], "donor_cell", ectx));
    FQ_ASSIGN_OR_RETURN(e.donor_count_before,
                        GetUnsigned<uint64_t>(ev[i], "donor_count_before", ectx));
    FQ_ASSIGN_OR_RETURN(e.donor_distortion, GetDouble(ev[i], "donor_distortion", ectx));
    FQ_ASSIGN_OR_RETURN(e.residual_norm, GetDouble(ev[i], "residual_norm", ectx));
    rep.repair_events.push_back(e);
  }

  FQ_ASSIGN_OR_RETURN(Codebook c,
                      FromStored(profile, std::move(codewords), std::move(rep), codebook_digest));
  if (c.profile_digest() != profile_digest) {
    return absl::DataLossError(absl::StrCat("codebook.profile_digest mismatch: stored ",
                                            profile_digest, ", recomputed ", c.profile_digest()));
  }
  if (c.rotation_digest() != rotation_digest) {
    return absl::DataLossError(absl::StrCat("codebook.rotation_digest mismatch: stored ",
                                            rotation_digest, ", recomputed ", c.rotation_digest()));
  }
  return c;
}

}  // namespace fibquant
