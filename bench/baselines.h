// Vector codecs compared in the benchmarks and the fidelity report, behind one interface:
// FibQuant (core Quantizer, fast path; k = 1 is the scalar rotation + Lloyd-Max baseline),
// per-vector absmax int8/int4 (fp16 scale), fp16 and bf16 storage, and (when built with Faiss)
// Faiss ProductQuantizer and ScalarQuantizer. Owner: the benchmark engineer. Not part of the core.
//
// Every codec encodes n vectors of dim() elements of `dtype` into n * code_bytes() bytes and
// decodes them back; code_bytes() counts everything stored per vector (FibQuant: fp16 norm +
// indices; absmax: fp16 scale + levels; Faiss: its code only, the trained tables are per layer like
// FibQuant's codebook). Data-calibrated codecs must be Train()ed first. Thread safety: Encode and
// Decode are const but use per-thread scratch; run one codec per thread for timing.
#ifndef FIBQUANT_BENCH_BASELINES_H_
#define FIBQUANT_BENCH_BASELINES_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/codec.h"
#include "core/half.h"

namespace fibquant::bench {

class VectorCodec {
 public:
  virtual ~VectorCodec() = default;
  virtual std::string name() const = 0;     // e.g. "fibquant k=4 N=256 haar"
  virtual std::string family() const = 0;   // plot series, e.g. "fibquant-k4"
  virtual uint32_t dim() const = 0;
  virtual size_t code_bytes() const = 0;
  virtual bool data_calibrated() const { return false; }
  virtual absl::Status Train(const float* /*x*/, size_t /*n*/) { return absl::OkStatus(); }
  virtual absl::Status Encode(DType dtype, const uint8_t* in, size_t n, uint8_t* codes) const = 0;
  virtual absl::Status Decode(const uint8_t* codes, size_t n, DType dtype, uint8_t* out) const = 0;
  // Index (payload) bits per coordinate, without per-vector side information.
  virtual double index_bits_per_coord() const = 0;
};

// Codebook build options for the FibQuant codecs.
struct FibOptions {
  std::string rotation = "haar";  // "haar" or "hadamard"
  uint64_t seed = 20260512;
  uint32_t training_samples = 0;  // 0: paper default max(30 N, 256)
  uint32_t restarts = 0;          // 0: paper default 4
  std::string cache_dir;          // if set, codebooks are stored/loaded as JSON here
  int threads = 0;
};

// FibQuant (k >= 2) or the scalar baseline (k = 1) through core::Quantizer, fast path.
// *build_seconds (if non-null) gets the codebook build time (0 when loaded from the cache).
absl::StatusOr<std::unique_ptr<VectorCodec>> MakeFibQuant(uint32_t d, uint32_t k, uint32_t n,
                                                          const FibOptions& opt,
                                                          double* build_seconds = nullptr);
std::unique_ptr<VectorCodec> MakeAbsmaxInt(uint32_t d, int bits);  // bits 8 or 4
std::unique_ptr<VectorCodec> MakeFloat16(uint32_t d, DType storage);  // kF16 or kBF16

bool HaveFaiss();
// Faiss ProductQuantizer(d, m, nbits) and ScalarQuantizer ("4bit", "6bit", "8bit", "4bit_uniform",
// "8bit_uniform"); Unimplemented without Faiss. Faiss uses one OpenMP thread per call here unless
// threads > 1.
absl::StatusOr<std::unique_ptr<VectorCodec>> MakeFaissPq(uint32_t d, uint32_t m, uint32_t nbits);
absl::StatusOr<std::unique_ptr<VectorCodec>> MakeFaissSq(uint32_t d, const std::string& type);
void SetFaissThreads(int threads);

}  // namespace fibquant::bench

#endif  // FIBQUANT_BENCH_BASELINES_H_
