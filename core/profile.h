// FibQuant profile: every parameter that determines a codebook, its validation, rate bookkeeping,
// canonical encoding and digest (docs/format/profile.md), and JSON forms for people and admin tools.
//
// A Profile is a plain value. Same profile -> same codebook -> same digest on every machine.
// Ownership: the profile module (core/profile.cc, tests/profile_test.cc); other modules consume it.
// Thread safety: a plain value with no shared state; const methods are safe to call concurrently.
#ifndef FIBQUANT_CORE_PROFILE_H_
#define FIBQUANT_CORE_PROFILE_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include <nlohmann/json_fwd.hpp>

namespace fibquant {

inline constexpr std::string_view kProfileSchema = "fq_profile_v1";
inline constexpr std::string_view kCodebookVersion = "fq-fibquant-paper-core-cpp-v1";
// Haar rotation: Gaussian matrix from kRngAlgorithm, Householder QR, Mezzadri sign correction.
inline constexpr std::string_view kRotationHaarQr = "fq-haar-householder-qr-sign-corrected-v1";
// Structured rotation: three rounds of random signs + normalised fast Walsh-Hadamard transform,
// O(d log d). A power-of-two dimension uses one transform per round; any other dimension two
// overlapping power-of-two windows per round (docs/format/rotation.md).
inline constexpr std::string_view kRotationHadamard = "fq-randomized-hadamard-3round-v1";

// Resource limits (validation step 3 and the part limits of step 2).
inline constexpr uint32_t kMaxAmbientDim = 4096;  // d*d rotation matrix values <= 16,777,216
inline constexpr uint32_t kMaxBlockDim = 256;
// The rotation acts on the vector zero-padded to a multiple of block_dim (rotation_dim()), so it may
// be up to block_dim - 1 longer than ambient_dim.
inline constexpr uint32_t kMaxRotationDim = kMaxAmbientDim + kMaxBlockDim - 1;
inline constexpr uint32_t kMaxCodebookSize = 1u << 20;
inline constexpr uint32_t kMaxTrainingSamples = 10'000'000;
inline constexpr uint64_t kMaxCodebookValues = 67'108'864;  // N * k
inline constexpr uint32_t kMaxLloydRestarts = 1024;
inline constexpr uint32_t kMaxLloydIterations = 100'000;

enum class NormFormat : uint8_t { kFp16 = 0 };                     // "fp16"
enum class SourceMode : uint8_t { kCanonicalSphericalBeta = 0 };   // "canonical_spherical_beta"
enum class RadiusMethod : uint8_t { kK2ClosedForm = 0, kBetaQuantile = 1 };  // "k2_closed_form", "beta_quantile"
enum class DirectionMethod : uint8_t {
  kFibonacciSpiral = 0,   // "fibonacci_spiral" (k = 2)
  kFibonacciSphere = 1,   // "fibonacci_sphere" (k = 3)
  kRobertsKronecker = 2,  // "roberts_kronecker" (k >= 4)
  kScalarQuantile = 3,    // "scalar_quantile" (k = 1: the TurboQuant-style scalar baseline)
};
enum class EmptyCellPolicy : uint8_t { kSplitHighestDistortion = 0, kFailClosed = 1 };

struct Profile {
  std::string schema_version = std::string(kProfileSchema);
  uint32_t ambient_dim = 0;     ///< d: vector length
  uint32_t block_dim = 0;       ///< k: coordinates per block (1 = scalar baseline)
  uint32_t codebook_size = 0;   ///< N: codewords in the shared block codebook
  double paper_rate_bits_per_coord = 0;  ///< log2(N)/k
  uint8_t wire_index_bits = 0;           ///< ceil(log2 N)
  double wire_bits_per_coord = 0;        ///< wire_index_bits/k
  NormFormat norm_format = NormFormat::kFp16;
  uint64_t rotation_seed = 0;
  std::string rotation_algorithm = std::string(kRotationHaarQr);
  uint64_t codebook_seed = 0;   ///< default rotation_seed + 0x9E3779B97F4A7C15 (wrapping)
  std::string codebook_version = std::string(kCodebookVersion);
  SourceMode source_mode = SourceMode::kCanonicalSphericalBeta;
  RadiusMethod radius_method = RadiusMethod::kBetaQuantile;
  DirectionMethod direction_method = DirectionMethod::kRobertsKronecker;
  uint32_t lloyd_restarts = 4;
  uint32_t lloyd_iterations = 25;
  uint32_t training_samples = 0;  ///< default min(max(30*N, 256), 10,000,000)
  EmptyCellPolicy empty_cell_policy = EmptyCellPolicy::kSplitHighestDistortion;

  // The paper's defaults for (d, k, N, seed): methods derived from k, rates computed, 4 restarts x
  // 25 iterations, 30*N training samples; validated. `rotation_algorithm` selects the rotation.
  [[nodiscard]] static absl::StatusOr<Profile> PaperDefault(
      uint32_t ambient_dim, uint32_t block_dim, uint32_t codebook_size, uint64_t seed,
      std::string_view rotation_algorithm = kRotationHaarQr);

  // Checks every rule in the documented order; the first failure is returned with the most specific
  // code (InvalidArgument for a malformed field, ResourceExhausted for a resource limit) and a message
  // naming the field and the limit.
  absl::Status Validate() const;

  // D = ceil(ambient_dim / block_dim) * block_dim: the unit vector is zero-padded from d to D
  // coordinates before the rotation, so any block_dim < ambient_dim works (docs/format/code.md). The
  // rotation, the Beta radius model and the training samples are all D-dimensional; D == d whenever
  // block_dim divides ambient_dim, which keeps every such profile's codebook and digest unchanged.
  uint32_t rotation_dim() const {
    return block_dim == 0 ? 0 : (ambient_dim + block_dim - 1) / block_dim * block_dim;
  }
  uint32_t block_count() const { return block_dim == 0 ? 0 : rotation_dim() / block_dim; }
  // Bytes of one encoded vector: 2 (fp16 norm) + ceil(block_count * wire_index_bits / 8).
  size_t code_bytes() const;

  // Canonical bytes (domain "fq_profile_v1") and "sha256:" digest. Valid profiles only.
  [[nodiscard]] absl::StatusOr<std::string> CanonicalBytes() const;
  [[nodiscard]] absl::StatusOr<std::string> Digest() const;

  // JSON for people: every field, enums as snake_case strings, u64 seeds as JSON integers.
  std::string ToJson(int indent = 2) const;
  // Parses JSON produced by ToJson (all fields required, unknown, duplicate or wrong-typed fields
  // rejected with InvalidArgument naming the field) and validates.
  [[nodiscard]] static absl::StatusOr<Profile> FromJson(std::string_view json);
  // The same as a JSON value, so other objects (the KV layer) can embed a profile in their own JSON.
  // Keys are the C++ field names (nlohmann::json orders them alphabetically; ToJson keeps declaration
  // order).
  nlohmann::json ToJsonValue() const;
  [[nodiscard]] static absl::StatusOr<Profile> FromJsonValue(const nlohmann::json& value);
  // Lenient constructor for people and admin tools: {"ambient_dim", "block_dim", "codebook_size",
  // "seed"} (all required) plus optional overrides "rotation_algorithm" (the full version string, or
  // "haar_qr" / "hadamard"), "lloyd_restarts", "lloyd_iterations", "training_samples",
  // "empty_cell_policy"; everything else comes from PaperDefault. Unknown fields are rejected
  // (a typo must not silently fall back to a default). Validated.
  [[nodiscard]] static absl::StatusOr<Profile> FromSpecJson(std::string_view json);

  friend bool operator==(const Profile&, const Profile&) = default;
};

// ceil(log2 N) for N >= 2; InvalidArgument otherwise.
[[nodiscard]] absl::StatusOr<uint8_t> WireIndexBits(uint32_t codebook_size);

std::string_view NormFormatName(NormFormat v);
std::string_view SourceModeName(SourceMode v);
std::string_view RadiusMethodName(RadiusMethod v);
std::string_view DirectionMethodName(DirectionMethod v);
std::string_view EmptyCellPolicyName(EmptyCellPolicy v);

// Inverses of the name functions: InvalidArgument for an unknown name.
[[nodiscard]] absl::StatusOr<NormFormat> ParseNormFormat(std::string_view name);
[[nodiscard]] absl::StatusOr<SourceMode> ParseSourceMode(std::string_view name);
[[nodiscard]] absl::StatusOr<RadiusMethod> ParseRadiusMethod(std::string_view name);
[[nodiscard]] absl::StatusOr<DirectionMethod> ParseDirectionMethod(std::string_view name);
[[nodiscard]] absl::StatusOr<EmptyCellPolicy> ParseEmptyCellPolicy(std::string_view name);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_PROFILE_H_
