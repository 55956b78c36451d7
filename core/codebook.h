// A trained FibQuant block codebook: N codewords in the unit ball of R^k, built deterministically
// from a Profile (initial radial-angular codebook, then multi-restart Lloyd-Max), with its digests
// and refinement report (docs/FORMAT.md, "Codebook").
//
// Building is deterministic and bit-identical for any thread count. Thread safety: a Codebook is
// immutable after Build()/FromStored(); safe to share across threads.
#ifndef FIBQUANT_CORE_CODEBOOK_H_
#define FIBQUANT_CORE_CODEBOOK_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/cancel.h"
#include "core/profile.h"

namespace fibquant {

inline constexpr std::string_view kCodebookSchema = "fq_codebook_v1";

struct RepairEvent {
  uint32_t restart = 0;
  uint32_t iteration = 0;
  uint32_t empty_cell = 0;
  uint32_t donor_cell = 0;
  uint64_t donor_count_before = 0;
  double donor_distortion = 0;
  double residual_norm = 0;
  friend bool operator==(const RepairEvent&, const RepairEvent&) = default;
};

struct LloydReport {
  uint32_t restarts = 0;
  uint32_t iterations = 0;
  uint32_t training_samples = 0;
  double init_mse = 0;       ///< training-set MSE of the initial codebook
  double best_mse = 0;       ///< training-set MSE of the kept codebook (f64, before f32 rounding)
  uint32_t best_restart = 0;
  std::vector<RepairEvent> repair_events;
  uint64_t seed = 0;         ///< the profile's codebook_seed
  friend bool operator==(const LloydReport&, const LloydReport&) = default;
};

struct BuildStats {  // not digested: how the build went on this machine
  double seconds = 0;
  int threads = 0;
};

class Codebook {
 public:
  // Validates the profile, builds rotation digest, initial codebook and Lloyd refinement.
  // `threads` = 0 uses every core; the result does not depend on it.
  // `cancel` (optional) is polled between build phases and Lloyd iterations: Cancelled then.
  [[nodiscard]] static absl::StatusOr<Codebook> Build(const Profile& profile, int threads = 0,
                                                      const CancelToken* cancel = nullptr);

  // Re-assembles a stored codebook and verifies it: profile valid, digests recomputed and equal to
  // `expected_digest` (DataLoss on mismatch), every codeword finite and inside the unit ball (+1e-6).
  [[nodiscard]] static absl::StatusOr<Codebook> FromStored(const Profile& profile,
                                                           std::vector<float> codewords,
                                                           LloydReport report,
                                                           std::string_view expected_digest);

  const Profile& profile() const { return profile_; }
  const std::string& profile_digest() const { return profile_digest_; }
  const std::string& rotation_digest() const { return rotation_digest_; }
  const std::string& digest() const { return digest_; }
  // N*k f32 values, row-major (codeword n at [n*k, n*k+k)).
  const std::vector<float>& codewords() const { return codewords_; }
  const LloydReport& report() const { return report_; }
  const BuildStats& build_stats() const { return stats_; }

  // JSON form stored on disk by the service: {"schema", "profile" (Profile::ToJsonValue),
  // "profile_digest", "rotation_digest", "codebook_digest", "codewords" (N*k numbers, exact f32
  // values), "report" {...}} (docs/format/codebook.md). Build stats are not stored.
  std::string ToJson(int indent = 2) const;
  // Parses ToJson output (all fields required, unknown fields rejected: InvalidArgument) and
  // verifies it like FromStored; the stored profile and rotation digests must also match the
  // recomputed ones (DataLoss).
  [[nodiscard]] static absl::StatusOr<Codebook> FromJson(std::string_view json);
  uint32_t size() const { return profile_.codebook_size; }
  uint32_t dim() const { return profile_.block_dim; }

 private:
  Codebook() = default;
  Profile profile_;
  std::string profile_digest_;
  std::string rotation_digest_;
  std::string digest_;
  std::vector<float> codewords_;
  LloydReport report_;
  BuildStats stats_;
  friend class CodebookBuilder;
};

// The initial radial-angular codebook c_t = r_(t+1) * u_t (k = 1: the scalar-baseline levels),
// N*k values row-major, each rounded to f32 (held in doubles). InvalidArgument for an invalid
// profile; Internal if a value is not finite.
[[nodiscard]] absl::StatusOr<std::vector<double>> InitialCodebook(const Profile& profile);

// The profile's M = training_samples spherical-Beta training blocks (M x k row-major), drawn from
// Rng(codebook_seed XOR kTrainingSeedXor).
[[nodiscard]] absl::StatusOr<std::vector<double>> TrainingSamples(const Profile& profile);

// The starting codebook of Lloyd restart r >= 1: Q_r * c for every codeword c of `initial`, with
// Q_r = Rotation::Create(kRotationHaarQr, k, codebook_seed + r * 0x9E3779B9) (wrapping u64), applied
// with Rotation::Apply; for k = 1, (-1)^r * c.
[[nodiscard]] absl::StatusOr<std::vector<double>> RestartStart(const Profile& profile,
                                                               const std::vector<double>& initial,
                                                               uint32_t restart);

// The codebook digest (domain kCodebookSchema) over the documented canonical encoding.
std::string CodebookDigest(std::string_view profile_digest, std::string_view rotation_digest,
                           uint32_t codebook_size, uint32_t block_dim,
                           const std::vector<float>& codewords, const LloydReport& report);

}  // namespace fibquant

#endif  // FIBQUANT_CORE_CODEBOOK_H_
