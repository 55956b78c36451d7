#include "core/profile.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/digest.h"
#include "core/portable_math.h"
#include "core/status_macros.h"

namespace fibquant {
namespace {

constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ull;
constexpr double kRateTolerance = 1e-12;
// ln 2 rounded to nearest binary64 (0x3FE62E42FEFA39EF).
constexpr double kLn2 = 0x1.62e42fefa39efp-1;

std::string S(std::string_view sv) { return std::string(sv); }

// log2(N) from +, /, frexp/ldexp and PortableLog only: glibc's log2 has per-CPU ifunc variants and
// paper_rate_bits_per_coord is digested, so its bits must not depend on the machine. The integer part
// is exact; powers of two give exact results.
double DeterministicLog2(uint32_t n) {
  const int e = static_cast<int>(std::bit_width(n)) - 1;
  const double m = std::ldexp(static_cast<double>(n), -e);  // exact, in [1, 2)
  return static_cast<double>(e) + PortableLog(m) / kLn2;
}

absl::Status ValidateParts(const Profile& p) {
  if (p.ambient_dim == 0) {
    return absl::InvalidArgumentError("profile.ambient_dim must be >= 1; got 0");
  }
  if (p.block_dim == 0 || p.block_dim >= p.ambient_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "profile.block_dim must be in [1, ambient_dim - 1] (block_dim == ambient_dim whole-vector "
        "mode is not supported); got block_dim ",
        p.block_dim, " with ambient_dim ", p.ambient_dim));
  }
  if (p.ambient_dim > kMaxAmbientDim) {
    return absl::ResourceExhaustedError(absl::StrCat("profile.ambient_dim exceeds the limit ",
                                                     kMaxAmbientDim, "; got ", p.ambient_dim));
  }
  if (p.block_dim > kMaxBlockDim) {
    return absl::ResourceExhaustedError(absl::StrCat("profile.block_dim exceeds the limit ",
                                                     kMaxBlockDim, "; got ", p.block_dim));
  }
  if (p.codebook_size < 2 || p.codebook_size > kMaxCodebookSize) {
    return absl::InvalidArgumentError(absl::StrCat("profile.codebook_size must be in [2, ",
                                                   kMaxCodebookSize, "]; got ", p.codebook_size));
  }
  return absl::OkStatus();
}

absl::Status ValidateResources(const Profile& p) {
  const uint64_t values = static_cast<uint64_t>(p.codebook_size) * p.block_dim;
  if (values > kMaxCodebookValues) {
    return absl::ResourceExhaustedError(
        absl::StrCat("profile.codebook_size * profile.block_dim exceeds the limit ",
                     kMaxCodebookValues, " codebook values; got ", values));
  }
  // Both factors are u32 today, so the product fits; the check keeps the rule explicit should either
  // field ever widen.
  const uint64_t samples = p.training_samples;
  if (p.block_dim != 0 && samples > std::numeric_limits<uint64_t>::max() / p.block_dim) {
    return absl::ResourceExhaustedError(
        "profile.training_samples * profile.block_dim overflows u64");
  }
  return absl::OkStatus();
}

absl::Status ValidateFormats(const Profile& p) {
  if (p.norm_format != NormFormat::kFp16) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile.norm_format must be \"fp16\"; got enum value ",
                     static_cast<int>(p.norm_format)));
  }
  if (p.source_mode != SourceMode::kCanonicalSphericalBeta) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile.source_mode must be \"canonical_spherical_beta\"; got enum value ",
                     static_cast<int>(p.source_mode)));
  }
  if (p.rotation_algorithm != kRotationHaarQr && p.rotation_algorithm != kRotationHadamard) {
    return absl::InvalidArgumentError(absl::StrCat(
        "profile.rotation_algorithm must be \"", S(kRotationHaarQr), "\" or \"",
        S(kRotationHadamard), "\"; got \"", p.rotation_algorithm, "\""));
  }
  if (p.codebook_version != kCodebookVersion) {
    return absl::InvalidArgumentError(absl::StrCat("profile.codebook_version must be \"",
                                                   S(kCodebookVersion), "\"; got \"",
                                                   p.codebook_version, "\""));
  }
  if (p.empty_cell_policy != EmptyCellPolicy::kSplitHighestDistortion &&
      p.empty_cell_policy != EmptyCellPolicy::kFailClosed) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile.empty_cell_policy must be \"split_highest_distortion\" or "
                     "\"fail_closed\"; got enum value ",
                     static_cast<int>(p.empty_cell_policy)));
  }
  return absl::OkStatus();
}

absl::Status ValidateRates(const Profile& p) {
  FQ_ASSIGN_OR_RETURN(const uint8_t bits, WireIndexBits(p.codebook_size));
  if (p.wire_index_bits != bits) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile.wire_index_bits must be ceil(log2(codebook_size)) = ",
                     static_cast<int>(bits), "; got ", static_cast<int>(p.wire_index_bits)));
  }
  const double k = static_cast<double>(p.block_dim);
  const double paper = DeterministicLog2(p.codebook_size) / k;
  if (!std::isfinite(p.paper_rate_bits_per_coord) ||
      !(std::fabs(p.paper_rate_bits_per_coord - paper) <= kRateTolerance)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "profile.paper_rate_bits_per_coord must equal log2(codebook_size)/block_dim = ", paper,
        " within ", kRateTolerance, "; got ", p.paper_rate_bits_per_coord));
  }
  const double wire = static_cast<double>(bits) / k;
  if (!std::isfinite(p.wire_bits_per_coord) ||
      !(std::fabs(p.wire_bits_per_coord - wire) <= kRateTolerance)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "profile.wire_bits_per_coord must equal wire_index_bits/block_dim = ", wire, " within ",
        kRateTolerance, "; got ", p.wire_bits_per_coord));
  }
  return absl::OkStatus();
}

// The only legal (radius, direction) pair for each block dimension.
std::pair<RadiusMethod, DirectionMethod> MethodsFor(uint32_t k) {
  if (k == 1) return {RadiusMethod::kBetaQuantile, DirectionMethod::kScalarQuantile};
  if (k == 2) return {RadiusMethod::kK2ClosedForm, DirectionMethod::kFibonacciSpiral};
  if (k == 3) return {RadiusMethod::kBetaQuantile, DirectionMethod::kFibonacciSphere};
  return {RadiusMethod::kBetaQuantile, DirectionMethod::kRobertsKronecker};
}

absl::Status ValidateMethods(const Profile& p) {
  const auto [radius, direction] = MethodsFor(p.block_dim);
  if (p.radius_method != radius || p.direction_method != direction) {
    return absl::InvalidArgumentError(absl::StrCat(
        "profile.radius_method/direction_method must be (\"", S(RadiusMethodName(radius)), "\", \"",
        S(DirectionMethodName(direction)), "\") for block_dim ", p.block_dim, "; got (\"",
        S(RadiusMethodName(p.radius_method)), "\", \"", S(DirectionMethodName(p.direction_method)),
        "\")"));
  }
  return absl::OkStatus();
}

absl::Status ValidateTraining(const Profile& p) {
  if (p.lloyd_restarts < 1) {
    return absl::InvalidArgumentError("profile.lloyd_restarts must be >= 1; got 0");
  }
  if (p.lloyd_restarts > kMaxLloydRestarts) {
    return absl::ResourceExhaustedError(absl::StrCat("profile.lloyd_restarts exceeds the limit ",
                                                     kMaxLloydRestarts, "; got ",
                                                     p.lloyd_restarts));
  }
  if (p.lloyd_iterations < 1) {
    return absl::InvalidArgumentError("profile.lloyd_iterations must be >= 1; got 0");
  }
  if (p.lloyd_iterations > kMaxLloydIterations) {
    return absl::ResourceExhaustedError(absl::StrCat("profile.lloyd_iterations exceeds the limit ",
                                                     kMaxLloydIterations, "; got ",
                                                     p.lloyd_iterations));
  }
  if (p.training_samples < p.codebook_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("profile.training_samples must be >= codebook_size (", p.codebook_size,
                     "); got ", p.training_samples));
  }
  if (p.training_samples > kMaxTrainingSamples) {
    return absl::ResourceExhaustedError(absl::StrCat("profile.training_samples exceeds the limit ",
                                                     kMaxTrainingSamples, "; got ",
                                                     p.training_samples));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<uint8_t> WireIndexBits(uint32_t codebook_size) {
  if (codebook_size < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("codebook_size must be >= 2 to have index bits; got ", codebook_size));
  }
  return static_cast<uint8_t>(std::bit_width(codebook_size - 1));
}

std::string_view NormFormatName(NormFormat v) {
  switch (v) {
    case NormFormat::kFp16:
      return "fp16";
  }
  return "invalid";
}

std::string_view SourceModeName(SourceMode v) {
  switch (v) {
    case SourceMode::kCanonicalSphericalBeta:
      return "canonical_spherical_beta";
  }
  return "invalid";
}

std::string_view RadiusMethodName(RadiusMethod v) {
  switch (v) {
    case RadiusMethod::kK2ClosedForm:
      return "k2_closed_form";
    case RadiusMethod::kBetaQuantile:
      return "beta_quantile";
  }
  return "invalid";
}

std::string_view DirectionMethodName(DirectionMethod v) {
  switch (v) {
    case DirectionMethod::kFibonacciSpiral:
      return "fibonacci_spiral";
    case DirectionMethod::kFibonacciSphere:
      return "fibonacci_sphere";
    case DirectionMethod::kRobertsKronecker:
      return "roberts_kronecker";
    case DirectionMethod::kScalarQuantile:
      return "scalar_quantile";
  }
  return "invalid";
}

std::string_view EmptyCellPolicyName(EmptyCellPolicy v) {
  switch (v) {
    case EmptyCellPolicy::kSplitHighestDistortion:
      return "split_highest_distortion";
    case EmptyCellPolicy::kFailClosed:
      return "fail_closed";
  }
  return "invalid";
}

absl::StatusOr<Profile> Profile::PaperDefault(uint32_t ambient_dim, uint32_t block_dim,
                                              uint32_t codebook_size, uint64_t seed,
                                              std::string_view rotation_algorithm) {
  Profile p;
  p.ambient_dim = ambient_dim;
  p.block_dim = block_dim;
  p.codebook_size = codebook_size;
  p.rotation_seed = seed;
  p.rotation_algorithm = std::string(rotation_algorithm);
  // The parts must be sane before any rate is derived from them (k = 0 would divide by zero).
  FQ_RETURN_IF_ERROR(ValidateParts(p));
  FQ_ASSIGN_OR_RETURN(p.wire_index_bits, WireIndexBits(codebook_size));
  const double k = static_cast<double>(block_dim);
  p.paper_rate_bits_per_coord = DeterministicLog2(codebook_size) / k;
  p.wire_bits_per_coord = static_cast<double>(p.wire_index_bits) / k;
  p.codebook_seed = seed + kGoldenGamma;  // unsigned: wraps modulo 2^64
  const auto [radius, direction] = MethodsFor(block_dim);
  p.radius_method = radius;
  p.direction_method = direction;
  p.lloyd_restarts = 4;
  p.lloyd_iterations = 25;
  const uint64_t samples = std::min<uint64_t>(
      std::max<uint64_t>(30ull * codebook_size, 256ull), kMaxTrainingSamples);
  p.training_samples = static_cast<uint32_t>(samples);
  p.empty_cell_policy = EmptyCellPolicy::kSplitHighestDistortion;
  FQ_RETURN_IF_ERROR(p.Validate());
  return p;
}

absl::Status Profile::Validate() const {
  if (schema_version != kProfileSchema) {
    return absl::InvalidArgumentError(absl::StrCat("profile.schema_version must be \"",
                                                   S(kProfileSchema), "\"; got \"",
                                                   schema_version, "\""));
  }
  FQ_RETURN_IF_ERROR(ValidateParts(*this));
  FQ_RETURN_IF_ERROR(ValidateResources(*this));
  FQ_RETURN_IF_ERROR(ValidateFormats(*this));
  FQ_RETURN_IF_ERROR(ValidateRates(*this));
  FQ_RETURN_IF_ERROR(ValidateMethods(*this));
  FQ_RETURN_IF_ERROR(ValidateTraining(*this));
  return absl::OkStatus();
}

size_t Profile::code_bytes() const {
  const uint64_t bits = static_cast<uint64_t>(block_count()) * wire_index_bits;
  return static_cast<size_t>(2 + (bits + 7) / 8);
}

absl::StatusOr<std::string> Profile::CanonicalBytes() const {
  FQ_RETURN_IF_ERROR(Validate());
  CanonicalWriter w(kProfileSchema);
  w.Str(schema_version);
  w.U32(ambient_dim);
  w.U32(block_dim);
  w.U32(codebook_size);
  w.F64(paper_rate_bits_per_coord);
  w.U8(wire_index_bits);
  w.F64(wire_bits_per_coord);
  w.Str(NormFormatName(norm_format));
  w.U64(rotation_seed);
  w.Str(rotation_algorithm);
  w.U64(codebook_seed);
  w.Str(codebook_version);
  w.Str(SourceModeName(source_mode));
  w.Str(RadiusMethodName(radius_method));
  w.Str(DirectionMethodName(direction_method));
  w.U32(lloyd_restarts);
  w.U32(lloyd_iterations);
  w.U32(training_samples);
  w.Str(EmptyCellPolicyName(empty_cell_policy));
  return w.bytes();
}

absl::StatusOr<std::string> Profile::Digest() const {
  FQ_ASSIGN_OR_RETURN(const std::string bytes, CanonicalBytes());
  return Sha256Digest(bytes);
}

// ---------------------------------------------------------------------------------------------
// Name parsing.

absl::StatusOr<NormFormat> ParseNormFormat(std::string_view name) {
  if (name == NormFormatName(NormFormat::kFp16)) return NormFormat::kFp16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown norm_format \"", S(name), "\"; expected \"fp16\""));
}

absl::StatusOr<SourceMode> ParseSourceMode(std::string_view name) {
  if (name == SourceModeName(SourceMode::kCanonicalSphericalBeta)) {
    return SourceMode::kCanonicalSphericalBeta;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown source_mode \"", S(name), "\"; expected \"canonical_spherical_beta\""));
}

absl::StatusOr<RadiusMethod> ParseRadiusMethod(std::string_view name) {
  for (RadiusMethod v : {RadiusMethod::kK2ClosedForm, RadiusMethod::kBetaQuantile}) {
    if (name == RadiusMethodName(v)) return v;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown radius_method \"", S(name), "\"; expected \"k2_closed_form\" or \"beta_quantile\""));
}

absl::StatusOr<DirectionMethod> ParseDirectionMethod(std::string_view name) {
  for (DirectionMethod v : {DirectionMethod::kFibonacciSpiral, DirectionMethod::kFibonacciSphere,
                            DirectionMethod::kRobertsKronecker, DirectionMethod::kScalarQuantile}) {
    if (name == DirectionMethodName(v)) return v;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown direction_method \"", S(name),
      "\"; expected \"fibonacci_spiral\", \"fibonacci_sphere\", \"roberts_kronecker\" or "
      "\"scalar_quantile\""));
}

absl::StatusOr<EmptyCellPolicy> ParseEmptyCellPolicy(std::string_view name) {
  for (EmptyCellPolicy v : {EmptyCellPolicy::kSplitHighestDistortion, EmptyCellPolicy::kFailClosed}) {
    if (name == EmptyCellPolicyName(v)) return v;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown empty_cell_policy \"", S(name),
                   "\"; expected \"split_highest_distortion\" or \"fail_closed\""));
}

// ---------------------------------------------------------------------------------------------
// JSON.

namespace {

// Field names in declaration order (also the canonical-encoding order).
constexpr const char* kFieldNames[] = {
    "schema_version",    "ambient_dim",        "block_dim",        "codebook_size",
    "paper_rate_bits_per_coord", "wire_index_bits", "wire_bits_per_coord", "norm_format",
    "rotation_seed",     "rotation_algorithm", "codebook_seed",    "codebook_version",
    "source_mode",       "radius_method",      "direction_method", "lloyd_restarts",
    "lloyd_iterations",  "training_samples",   "empty_cell_policy"};

template <typename Json>
Json ProfileToJson(const Profile& p) {
  Json j = Json::object();
  j["schema_version"] = p.schema_version;
  j["ambient_dim"] = p.ambient_dim;
  j["block_dim"] = p.block_dim;
  j["codebook_size"] = p.codebook_size;
  j["paper_rate_bits_per_coord"] = p.paper_rate_bits_per_coord;
  j["wire_index_bits"] = p.wire_index_bits;
  j["wire_bits_per_coord"] = p.wire_bits_per_coord;
  j["norm_format"] = std::string(NormFormatName(p.norm_format));
  j["rotation_seed"] = p.rotation_seed;  // stored as number_unsigned: exact for all of u64
  j["rotation_algorithm"] = p.rotation_algorithm;
  j["codebook_seed"] = p.codebook_seed;
  j["codebook_version"] = p.codebook_version;
  j["source_mode"] = std::string(SourceModeName(p.source_mode));
  j["radius_method"] = std::string(RadiusMethodName(p.radius_method));
  j["direction_method"] = std::string(DirectionMethodName(p.direction_method));
  j["lloyd_restarts"] = p.lloyd_restarts;
  j["lloyd_iterations"] = p.lloyd_iterations;
  j["training_samples"] = p.training_samples;
  j["empty_cell_policy"] = std::string(EmptyCellPolicyName(p.empty_cell_policy));
  return j;
}

absl::Status FieldError(std::string_view context, std::string_view field, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat(S(context), " field \"", S(field), "\": ", S(what)));
}

// Integers only (a JSON float such as 3.0 or 1e3 is a wrong type, so a value can never have passed
// through a double); negative and too-large values are rejected.
absl::StatusOr<uint64_t> GetUnsigned(const nlohmann::json& obj, std::string_view context,
                                     const char* field, uint64_t max) {
  const nlohmann::json& v = obj.at(field);
  if (!v.is_number_integer()) {
    return FieldError(context, field,
                      absl::StrCat("expected an unsigned integer, got ", v.type_name()));
  }
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > max) {
      return FieldError(context, field, absl::StrCat("value ", u, " exceeds the maximum ", max));
    }
    return u;
  }
  const int64_t i = v.get<int64_t>();
  if (i < 0) {
    return FieldError(context, field, absl::StrCat("expected an unsigned integer, got ", i));
  }
  if (static_cast<uint64_t>(i) > max) {
    return FieldError(context, field, absl::StrCat("value ", i, " exceeds the maximum ", max));
  }
  return static_cast<uint64_t>(i);
}

absl::StatusOr<uint32_t> GetU32(const nlohmann::json& obj, std::string_view context,
                                const char* field) {
  FQ_ASSIGN_OR_RETURN(const uint64_t v,
                      GetUnsigned(obj, context, field, std::numeric_limits<uint32_t>::max()));
  return static_cast<uint32_t>(v);
}

absl::StatusOr<std::string> GetString(const nlohmann::json& obj, std::string_view context,
                                      const char* field) {
  const nlohmann::json& v = obj.at(field);
  if (!v.is_string()) {
    return FieldError(context, field, absl::StrCat("expected a string, got ", v.type_name()));
  }
  return v.get<std::string>();
}

absl::StatusOr<double> GetDouble(const nlohmann::json& obj, std::string_view context,
                                 const char* field) {
  const nlohmann::json& v = obj.at(field);
  if (!v.is_number()) {
    return FieldError(context, field, absl::StrCat("expected a number, got ", v.type_name()));
  }
  return v.get<double>();
}

template <typename T>
absl::StatusOr<T> GetEnum(const nlohmann::json& obj, std::string_view context, const char* field,
                          absl::StatusOr<T> (*parse)(std::string_view)) {
  FQ_ASSIGN_OR_RETURN(const std::string name, GetString(obj, context, field));
  absl::StatusOr<T> v = parse(name);
  if (!v.ok()) return FieldError(context, field, std::string(v.status().message()));
  return v;
}

// Every key of `obj` must be in `allowed`; every key in `required` must be present.
absl::Status CheckKeys(const nlohmann::json& obj, std::string_view context,
                       const std::vector<std::string_view>& allowed,
                       const std::vector<std::string_view>& required) {
  if (!obj.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(S(context), " must be a JSON object, got ", obj.type_name()));
  }
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    bool known = false;
    for (std::string_view a : allowed) known = known || it.key() == a;
    if (!known) return FieldError(context, it.key(), "unknown field");
  }
  for (std::string_view r : required) {
    if (!obj.contains(std::string(r))) return FieldError(context, r, "missing required field");
  }
  return absl::OkStatus();
}

// Parses text strictly: syntax errors and duplicate keys (which nlohmann would otherwise resolve
// silently, last one wins) are InvalidArgument.
absl::StatusOr<nlohmann::json> ParseStrict(std::string_view text, std::string_view context) {
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  auto callback = [&](int /*depth*/, nlohmann::json::parse_event_t event,
                      nlohmann::json& parsed) -> bool {
    switch (event) {
      case nlohmann::json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case nlohmann::json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case nlohmann::json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second &&
            duplicate.empty()) {
          duplicate = parsed.get<std::string>();
        }
        break;
      default:
        break;
    }
    return true;
  };
  nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), callback,
                                           /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(S(context), " is not valid JSON"));
  }
  if (!duplicate.empty()) return FieldError(context, duplicate, "duplicate field");
  return j;
}

}  // namespace

nlohmann::json Profile::ToJsonValue() const { return ProfileToJson<nlohmann::json>(*this); }

std::string Profile::ToJson(int indent) const {
  // ordered_json keeps declaration order, which is easier for people to read against the format doc.
  return ProfileToJson<nlohmann::ordered_json>(*this).dump(indent);
}

absl::StatusOr<Profile> Profile::FromJsonValue(const nlohmann::json& value) {
  constexpr std::string_view kCtx = "profile JSON";
  const std::vector<std::string_view> fields(std::begin(kFieldNames), std::end(kFieldNames));
  FQ_RETURN_IF_ERROR(CheckKeys(value, kCtx, fields, fields));
  Profile p;
  FQ_ASSIGN_OR_RETURN(p.schema_version, GetString(value, kCtx, "schema_version"));
  FQ_ASSIGN_OR_RETURN(p.ambient_dim, GetU32(value, kCtx, "ambient_dim"));
  FQ_ASSIGN_OR_RETURN(p.block_dim, GetU32(value, kCtx, "block_dim"));
  FQ_ASSIGN_OR_RETURN(p.codebook_size, GetU32(value, kCtx, "codebook_size"));
  FQ_ASSIGN_OR_RETURN(p.paper_rate_bits_per_coord,
                      GetDouble(value, kCtx, "paper_rate_bits_per_coord"));
  FQ_ASSIGN_OR_RETURN(const uint64_t bits, GetUnsigned(value, kCtx, "wire_index_bits", 255));
  p.wire_index_bits = static_cast<uint8_t>(bits);
  FQ_ASSIGN_OR_RETURN(p.wire_bits_per_coord, GetDouble(value, kCtx, "wire_bits_per_coord"));
  FQ_ASSIGN_OR_RETURN(p.norm_format, GetEnum(value, kCtx, "norm_format", &ParseNormFormat));
  FQ_ASSIGN_OR_RETURN(p.rotation_seed, GetUnsigned(value, kCtx, "rotation_seed",
                                                   std::numeric_limits<uint64_t>::max()));
  FQ_ASSIGN_OR_RETURN(p.rotation_algorithm, GetString(value, kCtx, "rotation_algorithm"));
  FQ_ASSIGN_OR_RETURN(p.codebook_seed, GetUnsigned(value, kCtx, "codebook_seed",
                                                   std::numeric_limits<uint64_t>::max()));
  FQ_ASSIGN_OR_RETURN(p.codebook_version, GetString(value, kCtx, "codebook_version"));
  FQ_ASSIGN_OR_RETURN(p.source_mode, GetEnum(value, kCtx, "source_mode", &ParseSourceMode));
  FQ_ASSIGN_OR_RETURN(p.radius_method, GetEnum(value, kCtx, "radius_method", &ParseRadiusMethod));
  FQ_ASSIGN_OR_RETURN(p.direction_method,
                      GetEnum(value, kCtx, "direction_method", &ParseDirectionMethod));
  FQ_ASSIGN_OR_RETURN(p.lloyd_restarts, GetU32(value, kCtx, "lloyd_restarts"));
  FQ_ASSIGN_OR_RETURN(p.lloyd_iterations, GetU32(value, kCtx, "lloyd_iterations"));
  FQ_ASSIGN_OR_RETURN(p.training_samples, GetU32(value, kCtx, "training_samples"));
  FQ_ASSIGN_OR_RETURN(p.empty_cell_policy,
                      GetEnum(value, kCtx, "empty_cell_policy", &ParseEmptyCellPolicy));
  FQ_RETURN_IF_ERROR(p.Validate());
  return p;
}

absl::StatusOr<Profile> Profile::FromJson(std::string_view json) {
  FQ_ASSIGN_OR_RETURN(const nlohmann::json value, ParseStrict(json, "profile JSON"));
  return FromJsonValue(value);
}

absl::StatusOr<Profile> Profile::FromSpecJson(std::string_view json) {
  constexpr std::string_view kCtx = "profile spec JSON";
  FQ_ASSIGN_OR_RETURN(const nlohmann::json value, ParseStrict(json, kCtx));
  FQ_RETURN_IF_ERROR(CheckKeys(
      value, kCtx,
      {"ambient_dim", "block_dim", "codebook_size", "seed", "rotation_algorithm", "lloyd_restarts",
       "lloyd_iterations", "training_samples", "empty_cell_policy"},
      {"ambient_dim", "block_dim", "codebook_size", "seed"}));
  FQ_ASSIGN_OR_RETURN(const uint32_t d, GetU32(value, kCtx, "ambient_dim"));
  FQ_ASSIGN_OR_RETURN(const uint32_t k, GetU32(value, kCtx, "block_dim"));
  FQ_ASSIGN_OR_RETURN(const uint32_t n, GetU32(value, kCtx, "codebook_size"));
  FQ_ASSIGN_OR_RETURN(const uint64_t seed,
                      GetUnsigned(value, kCtx, "seed", std::numeric_limits<uint64_t>::max()));
  std::string rotation(kRotationHaarQr);
  if (value.contains("rotation_algorithm")) {
    FQ_ASSIGN_OR_RETURN(rotation, GetString(value, kCtx, "rotation_algorithm"));
    if (rotation == "haar_qr") rotation = std::string(kRotationHaarQr);
    if (rotation == "hadamard") rotation = std::string(kRotationHadamard);
  }
  FQ_ASSIGN_OR_RETURN(Profile p, PaperDefault(d, k, n, seed, rotation));
  if (value.contains("lloyd_restarts")) {
    FQ_ASSIGN_OR_RETURN(p.lloyd_restarts, GetU32(value, kCtx, "lloyd_restarts"));
  }
  if (value.contains("lloyd_iterations")) {
    FQ_ASSIGN_OR_RETURN(p.lloyd_iterations, GetU32(value, kCtx, "lloyd_iterations"));
  }
  if (value.contains("training_samples")) {
    FQ_ASSIGN_OR_RETURN(p.training_samples, GetU32(value, kCtx, "training_samples"));
  }
  if (value.contains("empty_cell_policy")) {
    FQ_ASSIGN_OR_RETURN(p.empty_cell_policy,
                        GetEnum(value, kCtx, "empty_cell_policy", &ParseEmptyCellPolicy));
  }
  FQ_RETURN_IF_ERROR(p.Validate());
  return p;
}

}  // namespace fibquant
