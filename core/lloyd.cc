#include "core/lloyd.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "core/parallel.h"

namespace fibquant {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr uint32_t kNoIndex = std::numeric_limits<uint32_t>::max();
// Cells per ParallelFor chunk in the per-cell statistics (fixed; results do not depend on it).
constexpr size_t kCellChunk = 256;

// The one definition of the distance: sum over i = 0..k-1, left to right, of (x_i - c_i)^2 in f64.
template <int K>
inline double SqDist(const double* x, const double* c, uint32_t k_runtime) {
  const uint32_t k = K > 0 ? static_cast<uint32_t>(K) : k_runtime;
  double s = 0.0;
  for (uint32_t i = 0; i < k; ++i) {
    const double t = x[i] - c[i];
    s += t * t;
  }
  return s;
}

double Norm(const double* x, uint32_t k) {
  double s = 0.0;
  for (uint32_t i = 0; i < k; ++i) s += x[i] * x[i];
  return std::sqrt(s);
}

// Lanes per codeword block of the search index.
constexpr uint32_t kLanes = 8;

// Squared distances from x to the kLanes codewords of one block stored dimension-major
// (blk[j * kLanes + lane]). Every lane performs exactly SqDist's operations (subtract, square,
// add, for j = 0..k-1, starting from 0.0) — vectorising across codewords needs no reassociation,
// and -ffp-contract=off forbids fusing — so each result is bit-identical to SqDist.
template <int K>
__attribute__((target("avx2"))) void BlockDistAvx2(const double* x, const double* blk,
                                                   uint32_t k_runtime, double* out) {
  const uint32_t k = K > 0 ? static_cast<uint32_t>(K) : k_runtime;
  __m256d acc0 = _mm256_setzero_pd();
  __m256d acc1 = _mm256_setzero_pd();
  for (uint32_t j = 0; j < k; ++j) {
    const __m256d xv = _mm256_set1_pd(x[j]);
    const double* row = blk + static_cast<size_t>(j) * kLanes;
    const __m256d t0 = _mm256_sub_pd(xv, _mm256_loadu_pd(row));
    const __m256d t1 = _mm256_sub_pd(xv, _mm256_loadu_pd(row + 4));
    acc0 = _mm256_add_pd(acc0, _mm256_mul_pd(t0, t0));
    acc1 = _mm256_add_pd(acc1, _mm256_mul_pd(t1, t1));
  }
  _mm256_storeu_pd(out, acc0);
  _mm256_storeu_pd(out + 4, acc1);
}

// Baseline x86-64 (SSE2) version of the same lane-wise operations.
template <int K>
void BlockDistBase(const double* x, const double* blk, uint32_t k_runtime, double* out) {
  const uint32_t k = K > 0 ? static_cast<uint32_t>(K) : k_runtime;
  __m128d acc[4] = {_mm_setzero_pd(), _mm_setzero_pd(), _mm_setzero_pd(), _mm_setzero_pd()};
  for (uint32_t j = 0; j < k; ++j) {
    const __m128d xv = _mm_set1_pd(x[j]);
    const double* row = blk + static_cast<size_t>(j) * kLanes;
    for (int q = 0; q < 4; ++q) {
      const __m128d t = _mm_sub_pd(xv, _mm_loadu_pd(row + 2 * q));
      acc[q] = _mm_add_pd(acc[q], _mm_mul_pd(t, t));
    }
  }
  for (int q = 0; q < 4; ++q) _mm_storeu_pd(out + 2 * q, acc[q]);
}

// Minimum of v[0..len), len a positive multiple of kLanes, no NaNs (min is exact: no rounding).
__attribute__((target("avx2"))) double MinAvx2(const double* v, uint32_t len) {
  __m256d m0 = _mm256_loadu_pd(v);
  __m256d m1 = _mm256_loadu_pd(v + 4);
  for (uint32_t q = kLanes; q < len; q += kLanes) {
    m0 = _mm256_min_pd(m0, _mm256_loadu_pd(v + q));
    m1 = _mm256_min_pd(m1, _mm256_loadu_pd(v + q + 4));
  }
  double t[4];
  _mm256_storeu_pd(t, _mm256_min_pd(m0, m1));
  return std::min(std::min(t[0], t[1]), std::min(t[2], t[3]));
}

double MinBase(const double* v, uint32_t len) {
  __m128d m[4] = {_mm_loadu_pd(v), _mm_loadu_pd(v + 2), _mm_loadu_pd(v + 4), _mm_loadu_pd(v + 6)};
  for (uint32_t q = kLanes; q < len; q += kLanes) {
    for (int r = 0; r < 4; ++r) m[r] = _mm_min_pd(m[r], _mm_loadu_pd(v + q + 2 * r));
  }
  double t[2];
  _mm_storeu_pd(t, _mm_min_pd(_mm_min_pd(m[0], m[1]), _mm_min_pd(m[2], m[3])));
  return std::min(t[0], t[1]);
}

bool DetectAvx2() {
  __builtin_cpu_init();  // static initialisers may run before libgcc's own CPU probe
  return __builtin_cpu_supports("avx2");
}
const bool kCpuHasAvx2 = DetectAvx2();
std::atomic<bool> g_use_avx2{kCpuHasAvx2};
std::atomic<bool> g_force_plain{false};

// Yinyang grouping: about kGroupSize codewords per group, at most kMaxGroups groups.
constexpr uint32_t kGroupSize = 64;
constexpr uint32_t kMaxGroups = 256;
// Above this many codewords per group (bounds memory-capped), assignment uses the plain search.
constexpr uint32_t kMaxPlainGroupSize = 1024;

// Codewords sorted by Euclidean norm, in blocks of kLanes. The search visits blocks in order of
// their norm gap to ||x|| and prunes with the reverse triangle inequality
// ||x - c|| >= | ||x|| - ||c|| |, evaluated with a margin that covers every floating-point error,
// so pruning never changes the result.
struct SearchIndex {
  uint32_t n = 0;
  uint32_t k = 0;
  uint32_t blocks = 0;
  double max_norm = 0;
  std::vector<double> norms;     // ascending, per sorted slot
  std::vector<uint32_t> perm;    // original index of each sorted slot
  std::vector<double> soa;       // blocks x k x kLanes
  std::vector<double> block_lo, block_hi;  // norm range of each block

  void Build(const double* c, uint32_t n_in, uint32_t k_in) {
    n = n_in;
    k = k_in;
    std::vector<double> raw(n);
    for (uint32_t i = 0; i < n; ++i) raw[i] = Norm(c + static_cast<size_t>(i) * k, k);
    perm.resize(n);
    std::iota(perm.begin(), perm.end(), 0u);
    std::sort(perm.begin(), perm.end(), [&](uint32_t a, uint32_t b) {
      return raw[a] < raw[b] || (raw[a] == raw[b] && a < b);
    });
    norms.resize(n);
    max_norm = 0;
    for (uint32_t j = 0; j < n; ++j) {
      norms[j] = raw[perm[j]];
      max_norm = std::max(max_norm, norms[j]);
    }
    blocks = (n + kLanes - 1) / kLanes;
    soa.assign(static_cast<size_t>(blocks) * k * kLanes, 0.0);
    block_lo.resize(blocks);
    block_hi.resize(blocks);
    for (uint32_t b = 0; b < blocks; ++b) {
      const uint32_t first = b * kLanes;
      const uint32_t last = std::min(n, first + kLanes) - 1;
      block_lo[b] = norms[first];
      block_hi[b] = norms[last];
      for (uint32_t l = 0; l < kLanes; ++l) {
        const uint32_t slot = std::min(first + l, last);  // padding lanes repeat the last codeword
        const double* cw = c + static_cast<size_t>(perm[slot]) * k;
        for (uint32_t j = 0; j < k; ++j) {
          soa[(static_cast<size_t>(b) * k + j) * kLanes + l] = cw[j];
        }
      }
    }
  }
};

struct SearchResult {
  uint32_t index = kNoIndex;
  double best = kInf;    // exact squared distance of `index`
  double second = kInf;  // smallest squared distance over all other codewords (codewords pruned
                         // away are provably no closer)
};

// Exact nearest (and second-nearest distance) of x; equal to the brute-force scan.
template <int K>
SearchResult FullSearch(const SearchIndex& ix, const double* x, double nx) {
  const uint32_t k = ix.k;
  SearchResult r;
  // First block whose norm range reaches nx.
  const uint32_t start = static_cast<uint32_t>(
      std::lower_bound(ix.block_hi.begin(), ix.block_hi.end(), nx) - ix.block_hi.begin());
  uint32_t hi = start;  // next block upward
  uint32_t lo = start;  // next block downward is lo - 1
  // Bounds every rounding error in the computed norms (relative error < k * 2^-52 each).
  const double tol = 1e-10 * (nx + ix.max_norm);
  bool lo_open = lo > 0;
  bool hi_open = hi < ix.blocks;
  double dist[kLanes];
  while (lo_open || hi_open) {
    uint32_t b;
    double gap;
    bool from_hi;
    const double gap_hi = hi_open ? std::max(0.0, ix.block_lo[hi] - nx) : kInf;
    const double gap_lo = lo_open ? std::max(0.0, nx - ix.block_hi[lo - 1]) : kInf;
    if (gap_hi <= gap_lo) {
      b = hi;
      gap = gap_hi;
      from_hi = true;
    } else {
      b = lo - 1;
      gap = gap_lo;
      from_hi = false;
    }
    const double g = gap - tol;
    // (1 - 1e-10) covers the relative rounding error of the computed squared distance.
    if (g > 0 && g * g * (1.0 - 1e-10) > r.second) {
      if (from_hi) {
        hi_open = false;
      } else {
        lo_open = false;
      }
      continue;
    }
    if (from_hi) {
      hi_open = ++hi < ix.blocks;
    } else {
      lo_open = --lo > 0;
    }
    const double* blk = &ix.soa[static_cast<size_t>(b) * k * kLanes];
    if (g_use_avx2.load(std::memory_order_relaxed)) {
      BlockDistAvx2<K>(x, blk, k, dist);
    } else {
      BlockDistBase<K>(x, blk, k, dist);
    }
    const uint32_t first = b * kLanes;
    const uint32_t lanes = std::min(kLanes, ix.n - first);
    for (uint32_t l = 0; l < lanes; ++l) {
      const double d = dist[l];
      const uint32_t idx = ix.perm[first + l];
      if (d < r.best || (d == r.best && idx < r.index)) {
        r.second = r.best;
        r.best = d;
        r.index = idx;
      } else if (d < r.second) {
        r.second = d;
      }
    }
  }
  return r;
}

// Exact nearest codeword of every sample with the norm-sorted search (no state between calls).
template <int K>
void SearchAll(const double* samples, size_t m, const std::vector<double>& c, uint32_t k,
               int threads, uint32_t* index, double* distance) {
  SearchIndex ix;
  ix.Build(c.data(), static_cast<uint32_t>(c.size() / k), k);
  const size_t chunks = (m + kLloydChunk - 1) / kLloydChunk;
  ParallelFor(chunks, threads, [&](size_t chunk) {
    const size_t end = std::min(m, (chunk + 1) * kLloydChunk);
    for (size_t i = chunk * kLloydChunk; i < end; ++i) {
      const double* x = samples + i * k;
      const SearchResult r = FullSearch<K>(ix, x, Norm(x, k));
      index[i] = r.index;
      distance[i] = r.best;
    }
  });
}

void SearchAllDispatch(const double* samples, size_t m, const std::vector<double>& c, uint32_t k,
                       int threads, uint32_t* index, double* distance) {
  switch (k) {
    case 1: return SearchAll<1>(samples, m, c, k, threads, index, distance);
    case 2: return SearchAll<2>(samples, m, c, k, threads, index, distance);
    case 4: return SearchAll<4>(samples, m, c, k, threads, index, distance);
    case 8: return SearchAll<8>(samples, m, c, k, threads, index, distance);
    default: return SearchAll<0>(samples, m, c, k, threads, index, distance);
  }
}

// Largest float not above v (bounds stored as floats must stay lower bounds).
inline float FloatDown(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) {  // step one ulp towards -infinity
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if (f > 0.0f) {
      --bits;
    } else if (f < 0.0f) {
      ++bits;
    } else {
      bits = 0x80000001u;  // -smallest subnormal
    }
    std::memcpy(&f, &bits, 4);
  }
  return f;
}

// Assigns samples to their exact nearest codeword across the passes of Lloyd restarts, skipping
// work that provably cannot change the answer (Yinyang k-means bounds: the codewords are split
// into G groups; each sample keeps, per group, a lower bound on its distance to every
// non-assigned member, decreased each pass by the group's largest codeword move). A group is
// evaluated only if its bound does not exceed the distance to the current assignment by
// `margin`; the proofs hold in real arithmetic with that gap, which exceeds the accumulated
// floating-point error by orders of magnitude, so every index equals the brute-force scan's and
// every distance is computed with SqDist's exact operations. Grouping is a heuristic and cannot
// affect results.
class Assigner {
 public:
  Assigner(const double* samples, size_t m, uint32_t k, uint32_t n, int threads)
      : samples_(samples), m_(m), k_(k), n_(n), threads_(threads) {
    sample_scale_ = 0;
    for (size_t i = 0; i < m; ++i) sample_scale_ = std::max(sample_scale_, Norm(samples + i * k, k));
    // G groups of about kGroupSize codewords; per-sample bounds capped at 2^25 floats (128 MB).
    groups_ = std::max<uint32_t>(1, std::min<uint32_t>(kMaxGroups, n / kGroupSize));
    while (groups_ > 1 && static_cast<uint64_t>(groups_) * m > (uint64_t{1} << 25)) groups_ /= 2;
    // Groups too large to prune well (bounds memory-capped for a huge N * M): the stateless
    // norm-sorted search instead (for small k it narrows to a few codewords per sample).
    plain_ = (n + groups_ - 1) / groups_ > kMaxPlainGroupSize ||
             g_force_plain.load(std::memory_order_relaxed);
    if (!plain_) lower_.resize(static_cast<size_t>(groups_) * m);
  }

  // `regroup`: the codewords changed arbitrarily (a new restart): re-cluster and search fully.
  void Assign(const std::vector<double>& c, bool regroup, std::vector<uint32_t>& index,
              std::vector<double>& distance) {
    if (plain_) {
      index.resize(m_);
      distance.resize(m_);
      SearchAllDispatch(samples_, m_, c, k_, threads_, index.data(), distance.data());
      return;
    }
    switch (k_) {
      case 1: return AssignK<1>(c, regroup, index, distance);
      case 2: return AssignK<2>(c, regroup, index, distance);
      case 3: return AssignK<3>(c, regroup, index, distance);
      case 4: return AssignK<4>(c, regroup, index, distance);
      case 8: return AssignK<8>(c, regroup, index, distance);
      default: return AssignK<0>(c, regroup, index, distance);
    }
  }

 private:
  // A few k-means steps on the codewords themselves; any grouping is correct, compact ones prune.
  void Regroup(const std::vector<double>& c) {
    const uint32_t k = k_, n = n_, g = groups_;
    std::vector<double> centers(static_cast<size_t>(g) * k);
    for (uint32_t j = 0; j < g; ++j) {
      const size_t src = static_cast<size_t>(j) * n / g;
      std::copy_n(&c[src * k], k, &centers[static_cast<size_t>(j) * k]);
    }
    group_of_.assign(n, 0);
    for (int it = 0; it < 6; ++it) {
      for (uint32_t t = 0; t < n; ++t) {
        group_of_[t] = NearestCodewordBruteForce(&c[static_cast<size_t>(t) * k], centers.data(), g, k).index;
      }
      std::vector<double> sum(centers.size(), 0.0);
      std::vector<uint32_t> cnt(g, 0);
      for (uint32_t t = 0; t < n; ++t) {
        ++cnt[group_of_[t]];
        for (uint32_t j = 0; j < k; ++j) sum[group_of_[t] * k + j] += c[static_cast<size_t>(t) * k + j];
      }
      for (uint32_t j = 0; j < g; ++j) {
        if (cnt[j] == 0) continue;
        for (uint32_t q = 0; q < k; ++q) centers[j * k + q] = sum[j * k + q] / cnt[j];
      }
    }
    // Blocks of kLanes per group.
    block_start_.assign(g + 1, 0);
    std::vector<uint32_t> sizes(g, 0);
    for (uint32_t t = 0; t < n; ++t) ++sizes[group_of_[t]];
    for (uint32_t j = 0; j < g; ++j) block_start_[j + 1] = block_start_[j] + (sizes[j] + kLanes - 1) / kLanes;
    slot_.assign(static_cast<size_t>(block_start_[g]) * kLanes, kNoIndex);
    group_size_ = sizes;
    max_group_blocks_ = 0;
    for (uint32_t j = 0; j < g; ++j) {
      max_group_blocks_ = std::max(max_group_blocks_, block_start_[j + 1] - block_start_[j]);
    }
    std::vector<uint32_t> fill(g, 0);
    for (uint32_t t = 0; t < n; ++t) {
      const uint32_t j = group_of_[t];
      slot_[static_cast<size_t>(block_start_[j]) * kLanes + fill[j]++] = t;
    }
  }

  void FillBlocks(const std::vector<double>& c) {
    const uint32_t k = k_;
    const size_t blocks = block_start_.back();
    soa_.assign(blocks * k * kLanes, 0.0);
    for (size_t b = 0; b < blocks; ++b) {
      for (uint32_t l = 0; l < kLanes; ++l) {
        uint32_t t = slot_[b * kLanes + l];
        if (t == kNoIndex) t = slot_[b * kLanes];  // padding repeats the block's first codeword
        for (uint32_t j = 0; j < k; ++j) soa_[(b * k + j) * kLanes + l] = c[static_cast<size_t>(t) * k + j];
      }
    }
  }

  template <int K>
  void AssignK(const std::vector<double>& c, bool regroup, std::vector<uint32_t>& index,
               std::vector<double>& distance) {
    const uint32_t k = k_, n = n_, g = groups_;
    index.resize(m_);
    distance.resize(m_);
    const bool bounded = have_prev_ && !regroup;
    if (!bounded) Regroup(c);
    FillBlocks(c);
    double scale = sample_scale_;
    for (uint32_t t = 0; t < n; ++t) scale = std::max(scale, Norm(&c[static_cast<size_t>(t) * k], k));
    std::vector<double> group_move(g, 0.0);
    if (bounded) {
      for (uint32_t t = 0; t < n; ++t) {
        const size_t o = static_cast<size_t>(t) * k;
        scale = std::max(scale, Norm(&prev_[o], k));
        const double mv = std::sqrt(SqDist<0>(&c[o], &prev_[o], k));
        group_move[group_of_[t]] = std::max(group_move[group_of_[t]], mv);
      }
    }
    const double margin = 1e-7 * scale;

    const size_t chunks = (m_ + kLloydChunk - 1) / kLloydChunk;
    ParallelFor(chunks, threads_, [&](size_t chunk) {
      const size_t end = std::min(m_, (chunk + 1) * kLloydChunk);
      std::vector<double> low(g);
      std::vector<uint8_t> eval(g);
      std::vector<double> gmin(g), gsecond(g);
      std::vector<uint32_t> gmin_idx(g);
      std::vector<double> buf(static_cast<size_t>(max_group_blocks_) * kLanes);
      for (size_t i = chunk * kLloydChunk; i < end; ++i) {
        const double* x = samples_ + i * k;
        float* lower = &lower_[i * g];
        uint32_t best_idx = kNoIndex;
        double best = kInf;
        double u = kInf;
        uint32_t a = kNoIndex;
        bool any = true;
        if (bounded) {
          a = index[i];
          best = SqDist<K>(x, &c[static_cast<size_t>(a) * k], k);
          best_idx = a;
          u = std::sqrt(best);
          any = false;
          for (uint32_t j = 0; j < g; ++j) {
            low[j] = static_cast<double>(lower[j]) - group_move[j];
            eval[j] = u + margin >= low[j];
            any |= eval[j] != 0;
          }
          if (!any) {
            distance[i] = best;
            for (uint32_t j = 0; j < g; ++j) lower[j] = FloatDown(low[j]);
            continue;
          }
        } else {
          std::fill(eval.begin(), eval.end(), 1);
        }
        for (uint32_t j = 0; j < g; ++j) {
          if (!eval[j]) continue;
          // All member distances of the group, then branch-free minima. Members are stored in
          // ascending codeword order, so the first position of the minimum is the lowest index.
          const uint32_t b0 = block_start_[j], b1 = block_start_[j + 1];
          const bool avx2 = g_use_avx2.load(std::memory_order_relaxed);
          for (uint32_t b = b0; b < b1; ++b) {
            const double* blk = &soa_[static_cast<size_t>(b) * k * kLanes];
            double* out = &buf[static_cast<size_t>(b - b0) * kLanes];
            if (avx2) {
              BlockDistAvx2<K>(x, blk, k, out);
            } else {
              BlockDistBase<K>(x, blk, k, out);
            }
          }
          const uint32_t len = (b1 - b0) * kLanes;
          for (uint32_t q = group_size_[j]; q < len; ++q) buf[q] = kInf;
          const double m1 = avx2 ? MinAvx2(buf.data(), len) : MinBase(buf.data(), len);
          uint32_t p1 = 0;
          while (buf[p1] != m1) ++p1;
          buf[p1] = kInf;
          const double m2 = avx2 ? MinAvx2(buf.data(), len) : MinBase(buf.data(), len);
          const uint32_t m1_idx = slot_[static_cast<size_t>(b0) * kLanes + p1];
          gmin[j] = m1;
          gsecond[j] = m2;
          gmin_idx[j] = m1_idx;
          if (m1 < best || (m1 == best && m1_idx < best_idx)) {
            best = m1;
            best_idx = m1_idx;
          }
        }
        index[i] = best_idx;
        distance[i] = best;
        for (uint32_t j = 0; j < g; ++j) {
          double l;
          if (eval[j]) {
            l = std::sqrt(gmin_idx[j] == best_idx ? gsecond[j] : gmin[j]);
          } else {
            l = low[j];
            // The old assignment now counts among this group's non-assigned members.
            if (a != kNoIndex && a != best_idx && group_of_[a] == j) l = std::min(l, u);
          }
          lower[j] = FloatDown(l);
        }
      }
    });
    prev_ = c;
    have_prev_ = true;
  }

  const double* samples_;
  size_t m_;
  uint32_t k_;
  uint32_t n_;
  int threads_;
  uint32_t groups_ = 1;
  bool plain_ = false;
  double sample_scale_ = 0;
  std::vector<float> lower_;  // m x G lower bounds (Euclidean distance)
  std::vector<uint32_t> group_of_;
  std::vector<uint32_t> block_start_;  // G + 1 block offsets
  std::vector<uint32_t> slot_;         // codeword index per block lane (kNoIndex = padding)
  std::vector<uint32_t> group_size_;
  uint32_t max_group_blocks_ = 0;
  std::vector<double> soa_;
  std::vector<double> prev_;
  bool have_prev_ = false;
};

absl::StatusOr<double> MeanOf(const std::vector<double>& distance) {
  double total = 0.0;
  for (double d : distance) total += d;
  const double mse = total / static_cast<double>(distance.size());
  if (!std::isfinite(mse)) return absl::InternalError("Lloyd: training MSE is not finite");
  return mse;
}

// Per-cell statistics of one assignment, accumulated in sample order.
struct CellStats {
  std::vector<uint64_t> count;
  std::vector<double> sum;         // N x k
  std::vector<double> distortion;  // sum of assigned squared distances
  std::vector<size_t> far;         // first sample with the largest distance (valid if count > 0)
};

void ComputeCellStats(const double* samples, size_t m, uint32_t n, uint32_t k,
                      const std::vector<uint32_t>& index, const std::vector<double>& distance,
                      int threads, CellStats* st) {
  st->count.assign(n, 0);
  for (size_t i = 0; i < m; ++i) ++st->count[index[i]];
  std::vector<size_t> start(n + 1, 0);
  for (uint32_t j = 0; j < n; ++j) start[j + 1] = start[j] + st->count[j];
  std::vector<size_t> order(m);
  {
    std::vector<size_t> pos(start.begin(), start.end() - 1);
    for (size_t i = 0; i < m; ++i) order[pos[index[i]]++] = i;  // stable: sample order per cell
  }
  st->sum.assign(static_cast<size_t>(n) * k, 0.0);
  st->distortion.assign(n, 0.0);
  st->far.assign(n, 0);
  const size_t chunks = (n + kCellChunk - 1) / kCellChunk;
  ParallelFor(chunks, threads, [&](size_t chunk) {
    const uint32_t end = static_cast<uint32_t>(std::min<size_t>(n, (chunk + 1) * kCellChunk));
    for (uint32_t j = static_cast<uint32_t>(chunk * kCellChunk); j < end; ++j) {
      double* sum = &st->sum[static_cast<size_t>(j) * k];
      double dist = 0.0;
      double far_d = -1.0;
      size_t far = 0;
      for (size_t p = start[j]; p < start[j + 1]; ++p) {
        const size_t i = order[p];
        const double* x = samples + i * k;
        for (uint32_t t = 0; t < k; ++t) sum[t] += x[t];
        dist += distance[i];
        if (distance[i] > far_d) {
          far_d = distance[i];
          far = i;
        }
      }
      st->distortion[j] = dist;
      st->far[j] = far;
    }
  });
}

}  // namespace

bool SetLloydAvx2ForTesting(bool enabled) {
  const bool before = g_use_avx2.load();
  g_use_avx2.store(enabled && kCpuHasAvx2);
  return before;
}

bool SetLloydPlainSearchForTesting(bool enabled) { return g_force_plain.exchange(enabled); }

Nearest NearestCodewordBruteForce(const double* x, const double* codewords, uint32_t n,
                                  uint32_t k) {
  Nearest best{0, kInf};
  for (uint32_t j = 0; j < n; ++j) {
    const double d = SqDist<0>(x, codewords + static_cast<size_t>(j) * k, k);
    if (d < best.distance) best = {j, d};
  }
  return best;
}

void AssignNearest(const double* samples, size_t m, const double* codewords, uint32_t n,
                   uint32_t k, int threads, uint32_t* index, double* distance) {
  SearchAllDispatch(samples, m, std::vector<double>(codewords, codewords + static_cast<size_t>(n) * k),
                    k, threads, index, distance);
}

double MeanDistortion(const std::vector<double>& samples, const std::vector<double>& codewords,
                      uint32_t k, int threads) {
  const size_t m = samples.size() / k;
  if (m == 0 || codewords.size() < k) return std::numeric_limits<double>::quiet_NaN();
  std::vector<uint32_t> idx(m);
  std::vector<double> dist(m);
  SearchAllDispatch(samples.data(), m, codewords, k, threads, idx.data(), dist.data());
  double total = 0.0;
  for (double d : dist) total += d;
  return total / static_cast<double>(m);
}

absl::StatusOr<LloydResult> RunLloyd(const std::vector<double>& initial,
                                     const std::vector<double>& samples, const LloydParams& params,
                                     const RestartStartFn& restart_start) {
  const uint32_t k = params.block_dim;
  if (k == 0) return absl::InvalidArgumentError("RunLloyd: block_dim must be >= 1");
  if (initial.empty() || initial.size() % k != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RunLloyd: initial codebook has ", initial.size(), " values, not a positive multiple of k=", k));
  }
  if (samples.empty() || samples.size() % k != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RunLloyd: samples have ", samples.size(), " values, not a positive multiple of k=", k));
  }
  const uint32_t n = static_cast<uint32_t>(initial.size() / k);
  const size_t m = samples.size() / k;
  if (m < n) {
    return absl::InvalidArgumentError(
        absl::StrCat("RunLloyd: ", m, " training samples < ", n, " codewords"));
  }
  if (m > std::numeric_limits<uint32_t>::max()) {
    return absl::ResourceExhaustedError("RunLloyd: more than 2^32-1 training samples");
  }
  if (params.restarts == 0 || params.iterations == 0) {
    return absl::InvalidArgumentError("RunLloyd: restarts and iterations must be >= 1");
  }
  if (params.restarts > 1 && !restart_start) {
    return absl::InvalidArgumentError("RunLloyd: restarts > 1 need a restart start function");
  }

  Assigner assigner(samples.data(), m, k, n, params.threads);
  std::vector<uint32_t> index;
  std::vector<double> distance;
  CellStats st;

  LloydResult out;
  LloydReport& rep = out.report;
  rep.restarts = params.restarts;
  rep.iterations = params.iterations;
  rep.training_samples = static_cast<uint32_t>(m);

  assigner.Assign(initial, /*regroup=*/true, index, distance);
  absl::StatusOr<double> init_mse = MeanOf(distance);
  if (!init_mse.ok()) return init_mse.status();
  rep.init_mse = *init_mse;
  rep.best_mse = *init_mse;
  rep.best_restart = 0;
  out.codewords = initial;

  for (uint32_t r = 0; r < params.restarts; ++r) {
    std::vector<double> c;
    if (r == 0) {
      c = initial;
    } else {
      absl::StatusOr<std::vector<double>> s = restart_start(r);
      if (!s.ok()) return s.status();
      if (s->size() != initial.size()) {
        return absl::InternalError(absl::StrCat("RunLloyd: restart ", r, " start has ", s->size(),
                                                " values, expected ", initial.size()));
      }
      c = *std::move(s);
    }
    for (uint32_t it = 0; it < params.iterations; ++it) {
      if (absl::Status c = CheckCancelled(params.cancel, absl::StrCat("Lloyd restart ", r, ", iteration ", it));
          !c.ok()) {
        return c;
      }
      assigner.Assign(c, /*regroup=*/r > 0 && it == 0, index, distance);
      ComputeCellStats(samples.data(), m, n, k, index, distance, params.threads, &st);
      std::vector<uint32_t> empty;
      for (uint32_t j = 0; j < n; ++j) {
        if (st.count[j] == 0) {
          empty.push_back(j);
          continue;
        }
        const double cnt = static_cast<double>(st.count[j]);
        for (uint32_t t = 0; t < k; ++t) {
          c[static_cast<size_t>(j) * k + t] = st.sum[static_cast<size_t>(j) * k + t] / cnt;
        }
      }
      if (empty.empty()) continue;
      if (params.empty_cell_policy == EmptyCellPolicy::kFailClosed) {
        return absl::FailedPreconditionError(absl::StrCat(
            "Lloyd: ", empty.size(), " empty cells in restart ", r, ", iteration ", it,
            " (first: cell ", empty[0], ") and empty_cell_policy is fail_closed"));
      }
      for (uint32_t e : empty) {
        uint32_t donor = kNoIndex;
        for (uint32_t j = 0; j < n; ++j) {
          if (st.count[j] > 1 && (donor == kNoIndex || st.distortion[j] >= st.distortion[donor])) {
            donor = j;
          }
        }
        if (donor == kNoIndex) {
          return absl::FailedPreconditionError(absl::StrCat(
              "Lloyd: cannot repair empty cell ", e, " in restart ", r, ", iteration ", it,
              ": no cell has more than one sample"));
        }
        double* cd = &c[static_cast<size_t>(donor) * k];
        double* ce = &c[static_cast<size_t>(e) * k];
        const double* far = samples.data() + st.far[donor] * k;
        std::vector<double> v(k);
        double v2 = 0.0;
        for (uint32_t t = 0; t < k; ++t) {
          v[t] = far[t] - cd[t];
          v2 += v[t] * v[t];
        }
        const double vn = std::sqrt(v2);
        if (!std::isfinite(vn) || vn <= kMinSplitResidual) {
          return absl::FailedPreconditionError(absl::StrCat(
              "Lloyd: cannot repair empty cell ", e, " from donor ", donor, " in restart ", r,
              ", iteration ", it, ": residual norm ", vn, " is not > 2.22e-16"));
        }
        for (uint32_t t = 0; t < k; ++t) {
          const double old = cd[t];
          const double step = kSplitEpsilon * (v[t] / vn);
          cd[t] = old - step;
          ce[t] = old + step;
        }
        rep.repair_events.push_back(RepairEvent{r, it, e, donor, st.count[donor],
                                                st.distortion[donor], vn});
        st.count[donor] -= 1;
        st.count[e] = 1;
        st.distortion[donor] = 0.0;
        st.distortion[e] = 0.0;
      }
    }
    assigner.Assign(c, /*regroup=*/false, index, distance);
    absl::StatusOr<double> mse = MeanOf(distance);
    if (!mse.ok()) return mse.status();
    if (*mse < rep.best_mse) {
      rep.best_mse = *mse;
      rep.best_restart = r;
      out.codewords = c;
    }
  }
  return out;
}

}  // namespace fibquant
