#include "core/kv_calib.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/digest.h"
#include "core/kv_internal.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

using kv_internal::S;
constexpr std::string_view kCtx = "kv_calibration";

// Smallest variance / query moment considered: keeps t finite for constant channels.
constexpr double kFloor = 1e-12;

}  // namespace

std::string_view KvCalibScalingName(KvCalibScaling s) {
  switch (s) {
    case KvCalibScaling::kNone: return "none";
    case KvCalibScaling::kQueryWhiten: return "query_whiten";
    case KvCalibScaling::kWhiten: return "whiten";
    case KvCalibScaling::kQuery: return "query";
  }
  return "unknown";
}

absl::StatusOr<KvCalibScaling> ParseKvCalibScaling(std::string_view s) {
  for (KvCalibScaling v : {KvCalibScaling::kNone, KvCalibScaling::kQueryWhiten, KvCalibScaling::kWhiten,
                           KvCalibScaling::kQuery}) {
    if (s == KvCalibScalingName(v)) return v;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("calibration scaling must be none, query_whiten, whiten or query; got \"", S(s), "\""));
}

absl::Status KvCalibration::Validate() const {
  if (schema_version != kKvCalibrationArtifactSchema) {
    return absl::InvalidArgumentError(absl::StrCat("kv_calibration.schema_version must be \"",
                                                   S(kKvCalibrationArtifactSchema), "\""));
  }
  if (layers == 0 || kv_heads == 0 || head_dim == 0) {
    return absl::InvalidArgumentError("kv_calibration: layers, kv_heads and head_dim must be > 0");
  }
  const uint64_t n = uint64_t{layers} * kv_heads * head_dim;
  if (n > kMaxKvCalibrationChannels || uint64_t{layers} * kv_heads > kMaxKvCalibrationChannels) {
    return absl::ResourceExhaustedError(absl::StrCat("kv_calibration: layers * kv_heads * head_dim must be <= ",
                                                     kMaxKvCalibrationChannels));
  }
  if (!std::isfinite(options.outlier_rms_ratio) || options.outlier_rms_ratio <= 0) {
    return absl::InvalidArgumentError("kv_calibration.options.outlier_rms_ratio must be finite and > 0");
  }
  if (role == KvRole::kValue && !query_second_moment.empty()) {
    return absl::InvalidArgumentError("kv_calibration.query_second_moment must be empty for values");
  }
  auto table = [&](const std::vector<float>& t, const char* name, bool allow_empty, double min_excl,
                   bool strict) -> absl::Status {
    if (t.empty() && allow_empty) return absl::OkStatus();
    if (t.size() != n) {
      return absl::InvalidArgumentError(absl::StrCat("kv_calibration.", name, " must have ", n, " values; got ",
                                                     t.size()));
    }
    for (size_t i = 0; i < t.size(); ++i) {
      if (!std::isfinite(t[i]) || (strict ? !(t[i] > min_excl) : !(t[i] >= min_excl))) {
        return absl::InvalidArgumentError(absl::StrCat("kv_calibration.", name, "[", i, "] = ", t[i],
                                                       " is not finite or out of range"));
      }
    }
    return absl::OkStatus();
  };
  const double lowest = -std::numeric_limits<double>::infinity();
  FQ_RETURN_IF_ERROR(table(mean, "mean", false, lowest, false));
  FQ_RETURN_IF_ERROR(table(scale, "scale", false, 0, true));
  FQ_RETURN_IF_ERROR(table(channel_sd, "channel_sd", false, 0, false));
  FQ_RETURN_IF_ERROR(table(query_second_moment, "query_second_moment", true, 0, false));
  for (size_t i = 0; i < outlier_channels.size(); ++i) {
    if (outlier_channels[i] >= n || (i > 0 && outlier_channels[i] <= outlier_channels[i - 1])) {
      return absl::InvalidArgumentError(absl::StrCat("kv_calibration.outlier_channels[", i,
                                                     "] must be increasing and < ", n));
    }
  }
  if (!options.center) {
    for (float m : mean) {
      if (m != 0) return absl::InvalidArgumentError("kv_calibration.mean must be zero when options.center is false");
    }
  }
  return absl::OkStatus();
}

std::string KvCalibration::CanonicalBytes() const {
  CanonicalWriter w(kKvCalibrationArtifactSchema);
  w.Str(schema_version);
  w.Str(KvRoleName(role));
  w.U32(layers);
  w.U32(kv_heads);
  w.U32(head_dim);
  w.Bool(options.center);
  w.Str(KvCalibScalingName(options.scaling));
  w.F64(options.outlier_rms_ratio);
  w.U64(sample_vectors);
  w.U64(sample_queries);
  auto table = [&](const std::vector<float>& t) {
    w.U64(t.size());
    for (float v : t) w.F32(v);
  };
  table(mean);
  table(scale);
  table(channel_sd);
  table(query_second_moment);
  w.U64(outlier_channels.size());
  for (uint32_t c : outlier_channels) w.U32(c);
  return w.bytes();
}

std::string KvCalibration::ComputeDigest() const { return Sha256Digest(CanonicalBytes()); }

std::string KvCalibration::ToJson(int indent) const {
  nlohmann::ordered_json j;
  j["schema_version"] = schema_version;
  j["role"] = S(KvRoleName(role));
  j["layers"] = layers;
  j["kv_heads"] = kv_heads;
  j["head_dim"] = head_dim;
  j["options"] = {{"center", options.center},
                  {"scaling", S(KvCalibScalingName(options.scaling))},
                  {"outlier_rms_ratio", options.outlier_rms_ratio}};
  j["sample_vectors"] = sample_vectors;
  j["sample_queries"] = sample_queries;
  auto arr = [](const std::vector<float>& t) {
    nlohmann::ordered_json a = nlohmann::ordered_json::array();
    for (float v : t) a.push_back(static_cast<double>(v));  // a double prints the f32 exactly
    return a;
  };
  j["mean"] = arr(mean);
  j["scale"] = arr(scale);
  j["channel_sd"] = arr(channel_sd);
  j["query_second_moment"] = arr(query_second_moment);
  j["outlier_channels"] = outlier_channels;
  j["digest"] = digest;
  return j.dump(indent);
}

absl::StatusOr<KvCalibration> KvCalibration::FromJson(std::string_view text) {
  using namespace kv_internal;
  FQ_ASSIGN_OR_RETURN(nlohmann::json j, ParseJsonObject(text, kCtx));
  {
    const auto keys = {"schema_version", "role", "layers", "kv_heads", "head_dim", "options",
                       "sample_vectors", "sample_queries", "mean", "scale", "channel_sd",
                       "query_second_moment", "outlier_channels", "digest"};
    FQ_RETURN_IF_ERROR(CheckKeys(j, kCtx, keys, keys));
  }
  KvCalibration c;
  FQ_ASSIGN_OR_RETURN(c.schema_version, GetString(j, kCtx, "schema_version"));
  FQ_ASSIGN_OR_RETURN(std::string role, GetString(j, kCtx, "role"));
  FQ_ASSIGN_OR_RETURN(c.role, ParseKvRole(role));
  FQ_ASSIGN_OR_RETURN(c.layers, GetU32(j, kCtx, "layers"));
  FQ_ASSIGN_OR_RETURN(c.kv_heads, GetU32(j, kCtx, "kv_heads"));
  FQ_ASSIGN_OR_RETURN(c.head_dim, GetU32(j, kCtx, "head_dim"));
  {
    const nlohmann::json& o = j.at("options");
    if (!o.is_object()) return absl::InvalidArgumentError("kv_calibration.options must be an object");
    constexpr std::string_view kO = "kv_calibration.options";
    const auto okeys = {"center", "scaling", "outlier_rms_ratio"};
    FQ_RETURN_IF_ERROR(CheckKeys(o, kO, okeys, okeys));
    FQ_ASSIGN_OR_RETURN(c.options.center, GetBool(o, kO, "center"));
    FQ_ASSIGN_OR_RETURN(std::string sc, GetString(o, kO, "scaling"));
    FQ_ASSIGN_OR_RETURN(c.options.scaling, ParseKvCalibScaling(sc));
    FQ_ASSIGN_OR_RETURN(std::optional<double> r, GetOptDouble(o, kO, "outlier_rms_ratio"));
    if (!r) return absl::InvalidArgumentError("kv_calibration.options.outlier_rms_ratio is required");
    c.options.outlier_rms_ratio = *r;
  }
  FQ_ASSIGN_OR_RETURN(c.sample_vectors, GetU64(j, kCtx, "sample_vectors", std::numeric_limits<uint64_t>::max()));
  FQ_ASSIGN_OR_RETURN(c.sample_queries, GetU64(j, kCtx, "sample_queries", std::numeric_limits<uint64_t>::max()));
  // Bound the tables before reading them (a hostile file must not allocate without limit).
  const uint64_t n = uint64_t{c.layers} * c.kv_heads * c.head_dim;
  if (n > kMaxKvCalibrationChannels) {
    return absl::ResourceExhaustedError(absl::StrCat("kv_calibration: layers * kv_heads * head_dim must be <= ",
                                                     kMaxKvCalibrationChannels));
  }
  auto table = [&](const char* f, std::vector<float>* out) -> absl::Status {
    const nlohmann::json& a = j.at(f);
    if (!a.is_array() || a.size() > n) {
      return absl::InvalidArgumentError(absl::StrCat("kv_calibration.", f, " must be an array of at most ", n,
                                                     " numbers"));
    }
    out->reserve(a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      if (!a[i].is_number()) return absl::InvalidArgumentError(absl::StrCat("kv_calibration.", f, "[", i, "] must be a number"));
      const double dv = a[i].get<double>();
      const float fv = static_cast<float>(dv);
      if (static_cast<double>(fv) != dv) {
        return absl::InvalidArgumentError(absl::StrCat("kv_calibration.", f, "[", i, "] is not an f32 value"));
      }
      out->push_back(fv);
    }
    return absl::OkStatus();
  };
  FQ_RETURN_IF_ERROR(table("mean", &c.mean));
  FQ_RETURN_IF_ERROR(table("scale", &c.scale));
  FQ_RETURN_IF_ERROR(table("channel_sd", &c.channel_sd));
  FQ_RETURN_IF_ERROR(table("query_second_moment", &c.query_second_moment));
  {
    const nlohmann::json& a = j.at("outlier_channels");
    if (!a.is_array() || a.size() > n) {
      return absl::InvalidArgumentError("kv_calibration.outlier_channels must be an array of channel indices");
    }
    for (size_t i = 0; i < a.size(); ++i) {
      if (!a[i].is_number_unsigned() || a[i].get<uint64_t>() >= n) {
        return absl::InvalidArgumentError(absl::StrCat("kv_calibration.outlier_channels[", i, "] must be an index < ", n));
      }
      c.outlier_channels.push_back(static_cast<uint32_t>(a[i].get<uint64_t>()));
    }
  }
  FQ_ASSIGN_OR_RETURN(c.digest, GetString(j, kCtx, "digest"));
  FQ_RETURN_IF_ERROR(c.Validate());
  const std::string want = c.ComputeDigest();
  if (c.digest != want) {
    return absl::InvalidArgumentError(absl::StrCat("kv_calibration.digest \"", c.digest,
                                                   "\" does not match the content (", want, ")"));
  }
  return c;
}

void KvCalibration::Forward(uint32_t layer, uint32_t kv_head, const float* x, float* y) const {
  const size_t base = (size_t{layer} * kv_heads + kv_head) * head_dim;
  for (uint32_t c = 0; c < head_dim; ++c) y[c] = (x[c] - mean[base + c]) * scale[base + c];
}

void KvCalibration::Inverse(uint32_t layer, uint32_t kv_head, const float* y, float* x) const {
  const size_t base = (size_t{layer} * kv_heads + kv_head) * head_dim;
  for (uint32_t c = 0; c < head_dim; ++c) x[c] = y[c] / scale[base + c] + mean[base + c];
}

absl::Status KvCalibration::CheckShape(const KvTensorShape& s) const {
  if (s.role != role || s.layers != layers || s.kv_heads != kv_heads || s.head_dim != head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "calibration ", digest, " is for ", S(KvRoleName(role)), " layers ", layers, " kv_heads ", kv_heads,
        " head_dim ", head_dim, "; the shape is ", S(KvRoleName(s.role)), " layers ", s.layers, " kv_heads ",
        s.kv_heads, " head_dim ", s.head_dim));
  }
  return absl::OkStatus();
}

absl::StatusOr<KvCalibration> ComputeKvCalibration(const KvTensorShape& shape, absl::Span<const float> values,
                                                   absl::Span<const float> queries,
                                                   const KvCalibrationOptions& options) {
  FQ_RETURN_IF_ERROR(shape.Validate());
  const uint32_t D = shape.head_dim, L = shape.layers, H = shape.kv_heads;
  if (uint64_t{L} * H * D > kMaxKvCalibrationChannels) {
    return absl::ResourceExhaustedError(absl::StrCat("calibration: layers * kv_heads * head_dim must be <= ",
                                                     kMaxKvCalibrationChannels));
  }
  if (values.size() != shape.element_count()) {
    return absl::InvalidArgumentError(absl::StrCat("calibration: values must have ", shape.element_count(),
                                                   " f32 elements (the shape); got ", values.size()));
  }
  const uint64_t qunit = uint64_t{shape.batch} * L * shape.query_heads * D;
  if (!queries.empty()) {
    if (shape.role != KvRole::kKey) return absl::InvalidArgumentError("calibration: queries only for key shapes");
    if (queries.size() % qunit != 0) {
      return absl::InvalidArgumentError(absl::StrCat("calibration: queries must be [batch, layers, query_heads, n, ",
                                                     "head_dim] f32 (a multiple of ", qunit, " values); got ",
                                                     queries.size()));
    }
  }
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) return absl::InvalidArgumentError(absl::StrCat("calibration: values[", i, "] is not finite"));
  }
  for (size_t i = 0; i < queries.size(); ++i) {
    if (!std::isfinite(queries[i])) return absl::InvalidArgumentError(absl::StrCat("calibration: queries[", i, "] is not finite"));
  }
  KvCalibration c;
  c.role = shape.role;
  c.layers = L;
  c.kv_heads = H;
  c.head_dim = D;
  c.options = options;
  const size_t n = size_t{L} * H * D;
  c.mean.assign(n, 0.0f);
  c.scale.assign(n, 1.0f);
  c.channel_sd.assign(n, 0.0f);
  const uint64_t per_group = uint64_t{shape.batch} * shape.tokens;
  c.sample_vectors = per_group;
  std::vector<double> qm(n, 0.0);
  const uint64_t nq = queries.empty() ? 0 : queries.size() / qunit;
  const uint32_t group = shape.query_heads / H;
  c.sample_queries = nq * shape.batch * group;
  if (nq > 0) {
    // E[q_c²] over every query of the heads that read kv head h (batch order, then heads, tokens).
    for (uint32_t b = 0; b < shape.batch; ++b) {
      for (uint32_t l = 0; l < L; ++l) {
        for (uint32_t g = 0; g < shape.query_heads; ++g) {
          const uint32_t h = g / group;
          const float* q = queries.data() + ((uint64_t{b} * L + l) * shape.query_heads + g) * nq * D;
          double* acc = &qm[(size_t{l} * H + h) * D];
          for (uint64_t t = 0; t < nq; ++t) {
            for (uint32_t i = 0; i < D; ++i) acc[i] += double{q[t * D + i]} * double{q[t * D + i]};
          }
        }
      }
    }
    c.query_second_moment.resize(n);
    const double cnt = static_cast<double>(c.sample_queries);
    for (size_t i = 0; i < n; ++i) c.query_second_moment[i] = static_cast<float>(qm[i] / cnt);
  }
  std::vector<double> sum(D), sq(D);
  for (uint32_t l = 0; l < L; ++l) {
    for (uint32_t h = 0; h < H; ++h) {
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(sq.begin(), sq.end(), 0.0);
      for (uint32_t b = 0; b < shape.batch; ++b) {
        const float* x = values.data() + shape.VectorOffset(b, l, h, 0);
        for (uint32_t t = 0; t < shape.tokens; ++t) {
          for (uint32_t i = 0; i < D; ++i) {
            const double v = x[size_t{t} * D + i];
            sum[i] += v;
            sq[i] += v * v;
          }
        }
      }
      const double cnt = static_cast<double>(per_group);
      const size_t base = (size_t{l} * H + h) * D;
      std::vector<double> var(D), rms(D), t(D);
      for (uint32_t i = 0; i < D; ++i) {
        const double mu = sum[i] / cnt;
        rms[i] = std::sqrt(sq[i] / cnt);
        var[i] = std::max(sq[i] / cnt - mu * mu, 0.0);
        if (options.center) c.mean[base + i] = static_cast<float>(mu);
        c.channel_sd[base + i] = static_cast<float>(std::sqrt(var[i]));
      }
      // Second moment the quantizer actually sees: centred variance, or the raw one uncentred.
      for (uint32_t i = 0; i < D; ++i) {
        const double s2 = std::max(options.center ? var[i] : rms[i] * rms[i], kFloor);
        const double w = nq > 0 ? std::max(qm[base + i] / static_cast<double>(c.sample_queries), kFloor) : 1.0;
        switch (options.scaling) {
          case KvCalibScaling::kNone: t[i] = 1; break;
          case KvCalibScaling::kQueryWhiten: t[i] = std::sqrt(std::sqrt(w) / std::sqrt(s2)); break;
          case KvCalibScaling::kWhiten: t[i] = 1 / std::sqrt(s2); break;
          case KvCalibScaling::kQuery: t[i] = std::sqrt(w); break;
        }
      }
      double tt = 0;
      for (uint32_t i = 0; i < D; ++i) tt += t[i] * t[i];
      const double norm = std::sqrt(tt / D);
      for (uint32_t i = 0; i < D; ++i) c.scale[base + i] = static_cast<float>(t[i] / norm);
      std::vector<double> sorted = rms;
      std::sort(sorted.begin(), sorted.end());
      const double median = sorted[(D - 1) / 2];
      for (uint32_t i = 0; i < D; ++i) {
        if (rms[i] > options.outlier_rms_ratio * median) c.outlier_channels.push_back(static_cast<uint32_t>(base + i));
      }
    }
  }
  FQ_RETURN_IF_ERROR(c.Validate());
  c.digest = c.ComputeDigest();
  return c;
}

}  // namespace fibquant
