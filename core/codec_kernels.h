// Nearest-codeword search and element conversion kernels for the vector codec (internal to the
// codec module; tests and benchmarks include it, nothing else should).
//
// Two searches over the same codebook:
//  - NearestReference: exact in f64 (codewords widened f32->f64, distance sum_j (y_j - c_j)^2
//    left to right), lowest index on ties. This is the specification.
//  - SearchTable::Nearest: exact in f32 for the score s(c) = ||c||^2 + sum_j (-2 y_j) c_j (computed
//    left to right as separate multiplies and adds, never fused, so the scalar and AVX2 kernels give
//    bit-identical scores and therefore identical indices on every x86-64 CPU), minimum score with
//    lowest index on ties. Codewords are stored sorted by norm in groups of 8 (SoA); with pruning
//    on, groups are visited outward from the one holding ||y||, and a direction stops once the
//    norm bound (|y| - |c|)^2 exceeds the best distance by a margin that covers every f32 rounding
//    error of the score, so pruning never changes the result.
// Without pruning, the AVX2 kernel puts 16 *blocks* across the lanes of two registers and walks
// the codewords in index order, one broadcast codeword at a time: no per-block horizontal
// reduction, and a strict < keeps the lowest index. (Tried and measured slower on the reference
// machine, so not kept: a neighbour-graph search — coarse start, descent over 8-nearest-neighbour
// groups, triangle-inequality check within 2 sqrt(best distance) — which visits 4x fewer
// codewords at k=4 N=256 but pays more in per-block reductions and branches than it saves.)
// Tables built without norm pruning also get, where measured to pay, the k = 2 grid or the
// clustered search (k = 3, 4, N >= 1024) described at their fields below; their structures are
// built in codec_search_build.cc, their kernels live in codec_kernels.cc.
// On CPUs with AVX-512F and AVX-512 VNNI (Avx512Active), the brute force runs 32 blocks in two
// 512-bit registers with the same f32 operations, and k = 4 tables (any N, before the clustered
// search) take a two-stage search: an int16 screening (VPDPWSSD) that decides a block when its
// best approximate score beats every other codeword's by more than twice a rigorous bound on the
// approximation error, and the exact f32 kernel for the blocks it cannot decide (1-5 % on real
// data). For N >= kScreenShellMinN the blocks are sorted by norm and only codewords whose norm can
// hold the winner are scored (a shell test derived from the same bound). Exact by construction;
// the derivation is at SearchKernels::Avx512Screen4Impl.
// Owner: codec module. Thread safety: a SearchTable is immutable after Build; the functions are
// reentrant. The ISA override is a process-wide test hook (atomic).
#ifndef FIBQUANT_CORE_CODEC_KERNELS_H_
#define FIBQUANT_CORE_CODEC_KERNELS_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fibquant::codec_internal {

enum class Isa : uint8_t { kScalar = 0, kAvx2 = 1 };

// The best ISA this CPU supports, unless a test forced the scalar kernels.
Isa ActiveIsa();
// Test hook: force the scalar kernels for every later call (process-wide) when `force` is true.
void ForceScalarForTesting(bool force);
// Test/benchmark hook (process-wide): when true, tables never take the AVX-512 kernels below even
// on a CPU that has them, so the AVX2 kernels can be compared with them.
void DisableAvx512ForTesting(bool disable);
// Whether the AVX-512 kernels are in use (CPU support and the hook above).
bool Avx512Active();

// Margin that covers every rounding error of the f32 score s(c) = ||c||^2 + sum_j m_j c_j:
// |err| <= (k+1) 2^-24 (||c||^2 + 2|y||c|) <= (k+1) 2^-24 (|y| + |c|)^2; we allow 16 times that.
inline double PruneSlack(uint32_t k, double ny, double max_norm) {
  const double r = ny + max_norm;
  return static_cast<double>(k + 4) * 0x1p-20 * r * r;
}

// Exact f64 nearest codeword to y (k values) among n codewords (n*k f32, row-major).
uint32_t NearestReference(const float* codewords, uint32_t n, uint32_t k, const double* y);
// Squared distance in f64 between y and codeword `index` (the reference metric).
double DistanceF64(const float* codewords, uint32_t k, uint32_t index, const double* y);

class SearchTable {
 public:
  // Smallest codebook that gets the clustered search (3 <= k <= 4; see below). Measured: below it the
  // blocks-across-lanes brute force wins.
  static constexpr uint32_t kClusterMinN = 1024;
  // Codebook sizes that get the k = 2 grid (see below).
  static constexpr uint32_t kGridMinN = 64;
  static constexpr uint32_t kGridMaxN = 4096;
  // Smallest codebook whose int16 screening (k = 4) sorts blocks by norm and applies the shell test.
  static constexpr uint32_t kScreenShellMinN = 1024;
  // codewords: n*k f32, row-major. `prune` enables the norm-bound pruning (worth it for larger n).
  static SearchTable Build(const float* codewords, uint32_t n, uint32_t k, bool prune);
  // Whether pruning is expected to beat the brute-force AVX2 kernel for this codebook: runs the
  // pruned search on midpoints of codeword pairs (a deterministic sample of at most 512) and
  // compares the groups it visits with a cost model measured on these kernels (a pruned block
  // costs about 50 + 8 * visited groups of the blocks-across-lanes brute force). Deterministic.
  static bool PruningPays(const float* codewords, uint32_t n, uint32_t k);

  // Nearest codeword index for each of `count` blocks stored contiguously in y (count*k floats).
  void Nearest(const float* y, size_t count, uint32_t* out, Isa isa) const;

  uint32_t size() const { return n_; }
  uint32_t dim() const { return k_; }
  bool prune() const { return prune_; }
  bool clustered() const { return (clusters_ > 0 || grid_ > 0) && use_clusters_; }
  // Benchmark/test hook: run the blocks-across-lanes brute force instead of the clustered search
  // or the k = 2 grid.
  void DisableClustersForTesting() { use_clusters_ = false; }
  // Benchmark/test hook: run the plain f32 brute force instead of the int16 screening (k = 4).
  void DisableScreeningForTesting() { use_screen_ = false; }
  bool screening() const { return screen_sc_ > 0 && use_screen_; }
  // Blocks the last call on this thread resolved by the exact fallback of the screening (a
  // diagnostic: how often the screening bound was too loose to decide).
  static uint64_t ScreenFallbacksOnThisThread();
  // Groups of 8 codewords visited by the last call on this thread (a diagnostic for tests and
  // benchmarks: how much the pruning saves).
  static uint64_t GroupsVisitedOnThisThread();
  static void ResetGroupsVisitedOnThisThread();
  uint32_t group_count() const { return groups_; }

 private:
  uint32_t n_ = 0;
  uint32_t k_ = 0;
  uint32_t groups_ = 0;
  bool prune_ = false;
  // Clustered search (AVX2, tables built without norm pruning, 3 <= k <= 4, n >= kClusterMinN):
  // the codewords
  // split into clusters of 8 by recursive median cuts along the widest coordinate, each with its
  // centre and a radius rounded up. Blocks are keyed by their nearest centre, sorted by key, and
  // searched 16 at a time (blocks across lanes): their own clusters first, then every cluster
  // unless, for all 16 blocks, ||y - centre|| > radius + sqrt(T) where T bounds the winner's
  // squared distance (best f32 score + ||y||^2 + twice the pruning slack). Exact by the triangle
  // inequality; (score, index) minimum as every kernel.
  uint32_t clusters_ = 0;
  bool use_clusters_ = true;
  std::vector<float> cl_cw_;    // clusters * 8 * k, row-major members (padding: zeros)
  std::vector<float> cl_n2_;    // clusters * 8 (padding: +inf)
  std::vector<int32_t> cl_idx_; // clusters * 8 (padding: INT32_MAX)
  std::vector<float> cl_mu_;    // clusters * k
  std::vector<float> cl_mu_n2_; // clusters
  std::vector<float> cl_rho_;   // clusters, rounded up
  // k = 2 grid (AVX2, tables built without norm pruning, kGridMinN <= n <= kGridMaxN): a G x G
  // grid over [-R, R]^2 (R = 1.5 max ||c||); each cell lists, in groups of 8 (SoA, padding +inf),
  // every codeword whose distance to the cell (grown by a tiny margin) is at most
  // U + 4 * slack, U = min over codewords of the distance to the cell's farthest point. The nearest
  // codeword of any point in the cell is within U, and the f32 winner within U + 2 * slack, so it is
  // listed. A block outside the grid takes the full scan.
  uint32_t grid_ = 0;
  float grid_r_ = 0;
  std::vector<uint32_t> grid_start_;  // G*G + 1: first group of each cell
  std::vector<float> grid_soa_;       // groups * 2 * 8
  std::vector<float> grid_n2_;        // groups * 8
  std::vector<int32_t> grid_idx_;     // groups * 8
  // Super-clusters: clusters [8s, 8s + 8) with their centre and radius (over their codewords).
  // Blocks are keyed by the nearest super-centre; the tests go super-cluster first.
  uint32_t supers_ = 0;
  std::vector<float> sup_mu_;     // supers * k
  std::vector<float> sup_mu_n2_;  // supers
  std::vector<float> sup_rho_;    // supers, rounded up
  // Row-major copy (n*k) and ||c||^2 per codeword (f32, as norm2_) for the blocks-across-lanes
  // kernel, which broadcasts one codeword at a time.
  std::vector<float> cw_;
  std::vector<float> cw_n2_;
  std::vector<float> soa_;         // groups * k * 8: [g][j][lane]
  std::vector<float> norm2_;       // groups * 8: ||c||^2 in f32 (+inf in padding lanes)
  std::vector<int32_t> index_;     // groups * 8: original index (INT32_MAX in padding lanes)
  std::vector<double> group_lo_;   // per group: smallest ||c|| (f64 of the f32 codeword)
  std::vector<double> group_hi_;   // per group: largest ||c||
  double max_norm_ = 0;
  // Start group by norm bucket: start_lut_[floor(|y| * lut_scale_)] (clamped) is the first group
  // whose largest norm reaches the bucket's lower edge. Any start is correct (the traversal goes
  // both ways); a table lookup avoids a branchy binary search per block.
  std::vector<uint32_t> start_lut_;
  double lut_scale_ = 0;

  // Int16 screening (brute-force tables, k = 4, AVX-512 VNNI; see codec_kernels.cc): codewords
  // quantised to int16 at the power-of-two scale screen_sc_ (|Cq|_2 < 2^15), coordinate pairs
  // packed in one int32 (low half the even coordinate). screen_sc_ = 0: not built.
  double screen_sc_ = 0;
  bool use_screen_ = true;
  double max_n2_ = 0;                // largest cw_n2_
  std::vector<int32_t> screen_cq_;   // n * 2: (Cq0, Cq1), (Cq2, Cq3)
  // Shell test (n >= kScreenShellMinN): the same codewords sorted by norm (stable), with their
  // f32 ||c||^2, f64 norm and index; blocks are sorted by norm, a window of screen_window_
  // codewords around each run's norm is scored first, then every codeword whose norm can hold
  // the winner (see codec_kernels.cc). 0: all codewords in index order.
  uint32_t screen_window_ = 0;
  std::vector<int32_t> screen_sorted_cq_;
  std::vector<float> screen_sorted_n2_;
  std::vector<double> screen_sorted_norm_;
  std::vector<int32_t> screen_sorted_idx_;
  std::vector<float> screen_sorted_cw_;  // n * k, row-major

  static void BuildClusters(SearchTable* t);
  static void BuildScreen(SearchTable* t);
  static void BuildGrid(SearchTable* t);
  friend struct SearchKernels;
  friend struct SearchKernels512;
};

// Sum of squares of each of `count` vectors of d f32 values, in f64, each summed left to right
// from element 0 (the codec's norm rule): out[v] is bit-identical to the plain loop for every
// kernel (the products of two f32 are exact in f64, and each vector keeps its own sequential
// chain; the AVX2 kernel only runs four vectors' chains side by side). A non-finite element
// makes out[v] non-finite.
void SumSquaresF64(const float* x, size_t count, uint32_t d, double* out, Isa isa);

// Element conversions for the fast path. Same results as half.h's scalar conversions; f16 uses
// F16C when available. The *Saturating stores clamp to the largest finite value of the type
// first (f16: 65504, bf16: 0x7F7F = 3.3895314e38) so a large reconstruction never becomes inf.
void LoadF16(const uint8_t* in, size_t n, float* out, Isa isa);
void StoreF16Saturating(const float* in, size_t n, uint8_t* out, Isa isa);
void StoreBf16Saturating(const float* in, size_t n, uint8_t* out);

}  // namespace fibquant::codec_internal

#endif  // FIBQUANT_CORE_CODEC_KERNELS_H_
