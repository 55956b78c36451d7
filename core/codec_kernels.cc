// Nearest-codeword search and conversion kernels: see codec_kernels.h for the contract.
//
// Every kernel computes the same f32 score per codeword with the same operations (no FMA) and
// returns the lexicographic (score, index) minimum, so the choice of kernel (scalar, AVX2 brute
// force with blocks across lanes, AVX2 pruned) never changes an index. Pruned traversals are
// written out in each kernel because a target("avx2") function can inline plain helpers but not
// the other way round.
#include "core/codec_kernels.h"
#include "core/codec_kernels_avx512.h"

#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>

#include "core/half.h"
#include "core/rng.h"

namespace fibquant::codec_internal {
namespace {

std::atomic<bool> g_force_scalar{false};
thread_local uint64_t t_groups_visited = 0;

// F16C comes from CPUID leaf 1 (ECX bit 29) rather than __builtin_cpu_supports("f16c"), which
// clang accepts only from version 15. __builtin_cpu_supports("avx2") also requires the OS to save
// the YMM state (OSXSAVE + XGETBV), which the VEX-encoded F16C instructions need as well.
bool CpuHasAvx2F16c() {
  static const bool has = [] {
    __builtin_cpu_init();
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_F16C) != 0;
    return __builtin_cpu_supports("avx2") && f16c;
  }();
  return has;
}

std::atomic<bool> g_disable_avx512{false};
thread_local uint64_t t_screen_fallbacks = 0;

bool CpuHasAvx512Vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return CpuHasAvx2F16c() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512vnni");
  }();
  return has;
}

constexpr float kF16Max = 65504.0f;
constexpr uint16_t kBf16MaxBits = 0x7F7F;

inline double BlockNorm(const float* y, uint32_t k) {
  double s = 0;
  for (uint32_t j = 0; j < k; ++j) s += static_cast<double>(y[j]) * static_cast<double>(y[j]);
  return std::sqrt(s);
}

// Per lane, takes (s, id) where it beats (best, best_idx) lexicographically: lower score, or equal
// score and lower index, so every AVX2 search path breaks ties as the reference does.
__attribute__((target("avx2"))) inline void KeepLexMin(__m256 s, __m256i id, __m256& best,
                                                       __m256i& best_idx) {
  const __m256 lt = _mm256_cmp_ps(s, best, _CMP_LT_OQ);
  const __m256 eq = _mm256_cmp_ps(s, best, _CMP_EQ_OQ);
  const __m256 idx_lt = _mm256_castsi256_ps(_mm256_cmpgt_epi32(best_idx, id));
  const __m256 upd = _mm256_or_ps(lt, _mm256_and_ps(eq, idx_lt));
  best = _mm256_blendv_ps(best, s, upd);
  best_idx = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(best_idx), _mm256_castsi256_ps(id), upd));
}

// Lexicographic (score, index) minimum over 8 lanes.
inline uint32_t PickLane(const float* score, const int32_t* index, uint32_t n) {
  float best = score[0];
  int32_t bi = index[0];
  for (int l = 1; l < 8; ++l) {
    if (score[l] < best || (score[l] == best && index[l] < bi)) {
      best = score[l];
      bi = index[l];
    }
  }
  // Unreachable for finite y; a defensive clamp keeps a corrupt input from producing an index >= n.
  return static_cast<uint32_t>(bi) < n ? static_cast<uint32_t>(bi) : 0;
}

}  // namespace

Isa ActiveIsa() {
  if (g_force_scalar.load(std::memory_order_relaxed)) return Isa::kScalar;
  return CpuHasAvx2F16c() ? Isa::kAvx2 : Isa::kScalar;
}

void ForceScalarForTesting(bool force) { g_force_scalar.store(force, std::memory_order_relaxed); }

void DisableAvx512ForTesting(bool disable) {
  g_disable_avx512.store(disable, std::memory_order_relaxed);
}

bool CpuSupportsAvx512Vnni() { return CpuHasAvx512Vnni(); }

bool Avx512Active() {
  return CpuHasAvx512Vnni() && !g_disable_avx512.load(std::memory_order_relaxed);
}

uint64_t SearchTable::ScreenFallbacksOnThisThread() { return t_screen_fallbacks; }

uint64_t& GroupsVisitedCounter() { return t_groups_visited; }
uint64_t& ScreenFallbackCounter() { return t_screen_fallbacks; }

const int32_t* IotaIds(uint32_t n) {
  thread_local std::vector<int32_t> ids;
  if (ids.size() < n) {
    ids.resize(n);
    std::iota(ids.begin(), ids.end(), 0);
  }
  return ids.data();
}

double DistanceF64(const float* codewords, uint32_t k, uint32_t index, const double* y) {
  const float* c = codewords + static_cast<size_t>(index) * k;
  double d = 0;
  for (uint32_t j = 0; j < k; ++j) {
    const double t = y[j] - static_cast<double>(c[j]);
    d += t * t;
  }
  return d;
}

uint32_t NearestReference(const float* codewords, uint32_t n, uint32_t k, const double* y) {
  uint32_t best = 0;
  double best_d = std::numeric_limits<double>::infinity();
  for (uint32_t i = 0; i < n; ++i) {
    const double d = DistanceF64(codewords, k, i, y);
    if (d < best_d) {  // strict: the lowest index wins a tie
      best_d = d;
      best = i;
    }
  }
  return best;
}

SearchTable SearchTable::Build(const float* codewords, uint32_t n, uint32_t k, bool prune) {
  SearchTable t;
  t.n_ = n;
  t.k_ = k;
  t.prune_ = prune;
  t.groups_ = (n + 7) / 8;
  std::vector<double> norm(n);
  for (uint32_t i = 0; i < n; ++i) norm[i] = BlockNorm(codewords + static_cast<size_t>(i) * k, k);
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  if (prune) {  // brute force keeps index order, which lets its kernel break ties with a plain <
    std::stable_sort(order.begin(), order.end(),
                     [&](uint32_t a, uint32_t b) { return norm[a] < norm[b]; });
  }
  const size_t g8 = static_cast<size_t>(t.groups_) * 8;
  t.soa_.assign(g8 * k, 0.0f);
  t.norm2_.assign(g8, std::numeric_limits<float>::infinity());
  t.index_.assign(g8, std::numeric_limits<int32_t>::max());
  t.group_lo_.assign(t.groups_, 0.0);
  t.group_hi_.assign(t.groups_, 0.0);
  for (uint32_t s = 0; s < n; ++s) {
    const uint32_t i = order[s];
    const uint32_t g = s / 8, lane = s % 8;
    const float* c = codewords + static_cast<size_t>(i) * k;
    float n2 = 0;  // ||c||^2 rounded once from the f64 sum: part of the specified f32 score
    double n2d = 0;
    for (uint32_t j = 0; j < k; ++j) {
      t.soa_[(static_cast<size_t>(g) * k + j) * 8 + lane] = c[j];
      n2d += static_cast<double>(c[j]) * static_cast<double>(c[j]);
    }
    n2 = static_cast<float>(n2d);
    t.norm2_[static_cast<size_t>(g) * 8 + lane] = n2;
    t.index_[static_cast<size_t>(g) * 8 + lane] = static_cast<int32_t>(i);
    if (lane == 0) t.group_lo_[g] = norm[i];
    t.group_hi_[g] = norm[i];
    t.max_norm_ = std::max(t.max_norm_, norm[i]);
  }
  const size_t buckets = static_cast<size_t>(t.groups_) * 4 + 1;
  t.lut_scale_ = t.max_norm_ > 0 ? static_cast<double>(buckets) / t.max_norm_ : 0.0;
  t.start_lut_.resize(buckets);
  for (size_t b = 0; b < buckets; ++b) {
    const double edge = t.lut_scale_ > 0 ? static_cast<double>(b) / t.lut_scale_ : 0.0;
    const size_t g = static_cast<size_t>(
        std::lower_bound(t.group_hi_.begin(), t.group_hi_.end(), edge) - t.group_hi_.begin());
    t.start_lut_[b] = static_cast<uint32_t>(std::min<size_t>(g, t.groups_ - 1));
  }
  t.cw_.assign(codewords, codewords + static_cast<size_t>(n) * k);
  t.cw_n2_.resize(n);
  for (uint32_t i = 0; i < n; ++i) {
    double n2d = 0;
    for (uint32_t j = 0; j < k; ++j) {
      const double c = codewords[static_cast<size_t>(i) * k + j];
      n2d += c * c;
    }
    t.cw_n2_[i] = static_cast<float>(n2d);
  }
  if (!prune && k == 4 && n >= 2 && t.max_norm_ > 0) BuildScreen(&t);
  if (!prune && k >= 3 && k <= 4 && n >= kClusterMinN) BuildClusters(&t);
  // (A 4-d grid was measured too: 12^4 cells over max|c| visit 5 groups per block at k=4 N=256 but
  // its 20 MB of cell lists miss the caches, and it lost to the brute force.)
  if (!prune && k == 2 && n >= kGridMinN && n <= kGridMaxN && t.max_norm_ > 0) BuildGrid(&t);
  return t;
}

bool SearchTable::PruningPays(const float* codewords, uint32_t n, uint32_t k) {
  const uint32_t groups = (n + 7) / 8;
  if (groups < 32) return false;  // the fixed per-block cost alone exceeds a full scan
  const SearchTable t = Build(codewords, n, k, /*prune=*/true);
  // Queries: midpoints of codeword pairs (i, j(i)) with j a fixed pseudo-random partner. A
  // codeword itself would be a degenerate query (distance 0 prunes everything at once).
  const uint32_t stride = std::max<uint32_t>(1, n / 512);
  std::vector<float> queries;
  uint64_t state = 0x243F6A8885A308D3ull;  // fixed: the choice must not vary between runs
  for (uint32_t i = 0; i < n; i += stride) {
    const uint32_t j = static_cast<uint32_t>(SplitMix64(&state) % n);
    for (uint32_t t2 = 0; t2 < k; ++t2) {
      queries.push_back(0.5f * (codewords[static_cast<size_t>(i) * k + t2] +
                                codewords[static_cast<size_t>(j) * k + t2]));
    }
  }
  const size_t count = queries.size() / k;
  std::vector<uint32_t> out(count);
  const uint64_t saved = t_groups_visited;
  t_groups_visited = 0;
  t.Nearest(queries.data(), count, out.data(), Isa::kScalar);
  const double visited = static_cast<double>(t_groups_visited) / static_cast<double>(count);
  t_groups_visited = saved;
  return 50.0 + 8.0 * visited < static_cast<double>(groups);
}

uint64_t SearchTable::GroupsVisitedOnThisThread() { return t_groups_visited; }
void SearchTable::ResetGroupsVisitedOnThisThread() {
  t_groups_visited = 0;
  t_screen_fallbacks = 0;
}

struct SearchKernels {
  static uint32_t StartGroup(const SearchTable& t, double ny) {
    const double pos = ny * t.lut_scale_;
    const size_t last = t.start_lut_.size() - 1;
    const size_t b = pos < static_cast<double>(last) ? static_cast<size_t>(pos) : last;
    return t.start_lut_[b];
  }

  // ---- scalar -------------------------------------------------------------------------------
  static void Scalar(const SearchTable& t, const float* y, size_t count, uint32_t* out) {
    const uint32_t k = t.k_;
    float m[256];
    float best[8];
    int32_t best_idx[8];
    uint64_t visited = 0;
    for (size_t b = 0; b < count; ++b) {
      const float* yb = y + b * k;
      for (uint32_t j = 0; j < k; ++j) m[j] = -2.0f * yb[j];
      std::fill(best, best + 8, std::numeric_limits<float>::infinity());
      std::fill(best_idx, best_idx + 8, std::numeric_limits<int32_t>::max());
      auto visit = [&](uint32_t g) {
        const float* c = t.soa_.data() + static_cast<size_t>(g) * k * 8;
        const float* n2 = t.norm2_.data() + static_cast<size_t>(g) * 8;
        const int32_t* id = t.index_.data() + static_cast<size_t>(g) * 8;
        float s[8];
        for (int l = 0; l < 8; ++l) s[l] = n2[l];
        for (uint32_t j = 0; j < k; ++j) {
          for (int l = 0; l < 8; ++l) s[l] = s[l] + m[j] * c[j * 8 + l];
        }
        for (int l = 0; l < 8; ++l) {
          if (s[l] < best[l] || (s[l] == best[l] && id[l] < best_idx[l])) {
            best[l] = s[l];
            best_idx[l] = id[l];
          }
        }
        ++visited;
        float h = best[0];
        for (int l = 1; l < 8; ++l) h = std::min(h, best[l]);
        return h;
      };
      if (!t.prune_) {
        for (uint32_t g = 0; g < t.groups_; ++g) visit(g);
      } else {
        const double ny = BlockNorm(yb, k);
        const double ny2 = ny * ny;
        const double slack = PruneSlack(k, ny, t.max_norm_);
        const uint32_t g0 = StartGroup(t, ny);
        double limit = static_cast<double>(visit(g0)) + ny2 + slack;
        for (uint32_t g = g0 + 1; g < t.groups_; ++g) {
          const double gap = t.group_lo_[g] - ny;
          if (gap > 0 && gap * gap > limit) break;
          limit = static_cast<double>(visit(g)) + ny2 + slack;
        }
        for (uint32_t g = g0; g-- > 0;) {
          const double gap = ny - t.group_hi_[g];
          if (gap > 0 && gap * gap > limit) break;
          limit = static_cast<double>(visit(g)) + ny2 + slack;
        }
      }
      out[b] = PickLane(best, best_idx, t.n_);
    }
    t_groups_visited += visited;
  }

  // ---- AVX2 ---------------------------------------------------------------------------------
  template <uint32_t K>  // K = 0: block dimension known only at run time
  __attribute__((target("avx2"))) static void Avx2(const SearchTable& t, const float* y,
                                                    size_t count, uint32_t* out) {
    const uint32_t k = K != 0 ? K : t.k_;
    alignas(32) float lane_best[8];
    alignas(32) int32_t lane_idx[8];
    __m256 m[K != 0 ? K : 256];
    uint64_t visited = 0;
    const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    const __m256i imax = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
    for (size_t b = 0; b < count; ++b) {
      const float* yb = y + b * k;
      for (uint32_t j = 0; j < k; ++j) m[j] = _mm256_set1_ps(-2.0f * yb[j]);
      __m256 best = inf;
      __m256i best_idx = imax;
      auto visit = [&](uint32_t g) __attribute__((target("avx2"))) {
        const float* c = t.soa_.data() + static_cast<size_t>(g) * k * 8;
        __m256 s = _mm256_loadu_ps(t.norm2_.data() + static_cast<size_t>(g) * 8);
        for (uint32_t j = 0; j < k; ++j) {
          s = _mm256_add_ps(s, _mm256_mul_ps(m[j], _mm256_loadu_ps(c + j * 8)));
        }
        const __m256i id = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(t.index_.data() + static_cast<size_t>(g) * 8));
        KeepLexMin(s, id, best, best_idx);
        ++visited;
      };
      auto hmin = [&]() __attribute__((target("avx2"))) {
        __m256 h = _mm256_min_ps(best, _mm256_permute2f128_ps(best, best, 1));
        h = _mm256_min_ps(h, _mm256_shuffle_ps(h, h, _MM_SHUFFLE(1, 0, 3, 2)));
        h = _mm256_min_ps(h, _mm256_shuffle_ps(h, h, _MM_SHUFFLE(2, 3, 0, 1)));
        return static_cast<double>(_mm256_cvtss_f32(h));
      };
      if (!t.prune_) {
        for (uint32_t g = 0; g < t.groups_; ++g) visit(g);
      } else {
        const double ny = BlockNorm(yb, k);
        const double ny2 = ny * ny;
        const double slack = PruneSlack(k, ny, t.max_norm_);
        const uint32_t g0 = StartGroup(t, ny);
        visit(g0);
        double limit = hmin() + ny2 + slack;
        for (uint32_t g = g0 + 1; g < t.groups_; ++g) {
          const double gap = t.group_lo_[g] - ny;
          if (gap > 0 && gap * gap > limit) break;
          visit(g);
          limit = hmin() + ny2 + slack;
        }
        for (uint32_t g = g0; g-- > 0;) {
          const double gap = ny - t.group_hi_[g];
          if (gap > 0 && gap * gap > limit) break;
          visit(g);
          limit = hmin() + ny2 + slack;
        }
      }
      _mm256_store_ps(lane_best, best);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lane_idx), best_idx);
      out[b] = PickLane(lane_best, lane_idx, t.n_);
    }
    t_groups_visited += visited;
  }

  static const int32_t* FullIds(uint32_t n) { return IotaIds(n); }

  // Blocks across lanes: 16 blocks (two registers of 8) against m codewords taken in order, each
  // broadcast. Per lane, a strict < over increasing positions keeps the first minimum; callers
  // pass codewords in increasing index order, so that is the lowest index. Scores are the same
  // f32 operations as every other kernel. out_score may be null.
  template <uint32_t K>
  __attribute__((target("avx2"))) static void Avx2Lanes(const float* cw, const float* n2,
                                                        const int32_t* ids, uint32_t m, uint32_t kk,
                                                        const float* y, size_t count, uint32_t* out,
                                                        float* out_score) {
    const uint32_t k = K != 0 ? K : kk;
    const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    alignas(32) float tmp[2][8];
    alignas(32) int32_t tid[2][8];
    __m256 mv[2][K != 0 ? K : 256];
    for (size_t b0 = 0; b0 < count; b0 += 16) {
      const size_t nb = std::min<size_t>(16, count - b0);
      for (uint32_t j = 0; j < k; ++j) {
        for (size_t l = 0; l < 16; ++l) {
          tmp[l / 8][l % 8] = l < nb ? -2.0f * y[(b0 + l) * k + j] : 0.0f;
        }
        mv[0][j] = _mm256_load_ps(tmp[0]);
        mv[1][j] = _mm256_load_ps(tmp[1]);
      }
      __m256 best0 = inf, best1 = inf;
      __m256i bi0 = _mm256_setzero_si256(), bi1 = _mm256_setzero_si256();
      const float* c = cw;
      for (uint32_t i = 0; i < m; ++i, c += k) {
        const __m256 base = _mm256_broadcast_ss(n2 + i);
        __m256 s0 = base, s1 = base;
        for (uint32_t j = 0; j < k; ++j) {
          const __m256 cj = _mm256_broadcast_ss(c + j);
          s0 = _mm256_add_ps(s0, _mm256_mul_ps(mv[0][j], cj));
          s1 = _mm256_add_ps(s1, _mm256_mul_ps(mv[1][j], cj));
        }
        const __m256i id = _mm256_set1_epi32(ids[i]);
        const __m256 lt0 = _mm256_cmp_ps(s0, best0, _CMP_LT_OQ);
        const __m256 lt1 = _mm256_cmp_ps(s1, best1, _CMP_LT_OQ);
        best0 = _mm256_min_ps(s0, best0);  // == blend(best, s, s < best)
        best1 = _mm256_min_ps(s1, best1);
        bi0 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi0),
                                                   _mm256_castsi256_ps(id), lt0));
        bi1 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi1),
                                                   _mm256_castsi256_ps(id), lt1));
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(tid[0]), bi0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tid[1]), bi1);
      for (size_t l = 0; l < nb; ++l) out[b0 + l] = static_cast<uint32_t>(tid[l / 8][l % 8]);
      if (out_score != nullptr) {
        _mm256_store_ps(tmp[0], best0);
        _mm256_store_ps(tmp[1], best1);
        for (size_t l = 0; l < nb; ++l) out_score[b0 + l] = tmp[l / 8][l % 8];
      }
    }
  }


  // The grid (see codec_kernels.h): per block, its cell's candidate groups (codewords across
  // lanes, (score, index) update per lane), then the lexicographic minimum over the lanes.
  template <uint32_t K>
  __attribute__((target("avx2"))) static void Avx2Grid(const SearchTable& t, const float* y,
                                                       size_t count, uint32_t* out) {
    const uint32_t g = t.grid_;
    const float r = t.grid_r_;
    const float scale = static_cast<float>(g) / (2 * r);
    const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    const __m256i imax = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
    uint64_t visited = 0;
    for (size_t b = 0; b < count; ++b) {
      const float* yb = y + K * b;
      size_t c = 0, stride = 1;
      bool inside = true;
      for (uint32_t j = 0; j < K; ++j) {
        const float f = (yb[j] + r) * scale;
        inside = inside && f >= 0 && f < static_cast<float>(g);
        c += (inside ? static_cast<size_t>(f) : 0) * stride;
        stride *= g;
      }
      if (!inside) {
        Avx2Lanes<K>(t.cw_.data(), t.cw_n2_.data(), FullIds(t.n_), t.n_, K, yb, 1, out + b,
                     nullptr);
        visited += t.groups_;
        continue;
      }
      __m256 m[K];
      for (uint32_t j = 0; j < K; ++j) m[j] = _mm256_set1_ps(-2.0f * yb[j]);
      __m256 best = inf;
      __m256i bi = imax;
      for (uint32_t grp = t.grid_start_[c]; grp < t.grid_start_[c + 1]; ++grp) {
        const float* cs = t.grid_soa_.data() + static_cast<size_t>(grp) * K * 8;
        __m256 s = _mm256_loadu_ps(t.grid_n2_.data() + static_cast<size_t>(grp) * 8);
        for (uint32_t j = 0; j < K; ++j) {
          s = _mm256_add_ps(s, _mm256_mul_ps(m[j], _mm256_loadu_ps(cs + j * 8)));
        }
        const __m256i id = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(t.grid_idx_.data() + static_cast<size_t>(grp) * 8));
        KeepLexMin(s, id, best, bi);
        ++visited;
      }
      __m256 h = _mm256_min_ps(best, _mm256_permute2f128_ps(best, best, 1));
      h = _mm256_min_ps(h, _mm256_shuffle_ps(h, h, _MM_SHUFFLE(1, 0, 3, 2)));
      h = _mm256_min_ps(h, _mm256_shuffle_ps(h, h, _MM_SHUFFLE(2, 3, 0, 1)));
      __m256i id = _mm256_castps_si256(_mm256_blendv_ps(
          _mm256_castsi256_ps(imax), _mm256_castsi256_ps(bi), _mm256_cmp_ps(best, h, _CMP_EQ_OQ)));
      id = _mm256_min_epi32(id, _mm256_permute2x128_si256(id, id, 1));
      id = _mm256_min_epi32(id, _mm256_shuffle_epi32(id, _MM_SHUFFLE(1, 0, 3, 2)));
      id = _mm256_min_epi32(id, _mm256_shuffle_epi32(id, _MM_SHUFFLE(2, 3, 0, 1)));
      const int32_t w = _mm256_cvtsi256_si32(id);
      out[b] = static_cast<uint32_t>(w) < t.n_ ? static_cast<uint32_t>(w) : 0;
    }
    t_groups_visited += visited;
  }

  // The clustered search (see codec_kernels.h). Lanes 0-7 and 8-15 are blocks order[r..r+16).
  template <uint32_t K>
  __attribute__((target("avx2"))) static void Avx2Clustered(const SearchTable& t, const float* y,
                                                            size_t count, uint32_t* out) {
    const uint32_t k = K != 0 ? K : t.k_;
    const uint32_t nc = t.clusters_;
    thread_local std::vector<uint32_t> key, order, start, stamp;
    thread_local std::vector<float> ny2v, slackv;
    key.resize(count);
    order.resize(count);
    ny2v.resize(count);
    slackv.resize(count);
    const uint32_t ns = t.supers_;
    start.assign(ns + 1, 0);
    if (stamp.size() < nc + ns) stamp.assign(nc + ns, 0);
    uint32_t run_id = 0;
    std::fill(stamp.begin(), stamp.begin() + nc + ns, 0u);  // [0, nc): clusters, then supers
    // Key: the nearest super-centre (ids 0..ns-1 in order).
    Avx2Lanes<K>(t.sup_mu_.data(), t.sup_mu_n2_.data(), FullIds(ns), ns, k, y, count, key.data(),
                 nullptr);
    for (size_t b = 0; b < count; ++b) {
      const double ny = BlockNorm(y + b * k, k);
      ny2v[b] = static_cast<float>(ny * ny);
      slackv[b] = static_cast<float>(2.0 * PruneSlack(k, ny, t.max_norm_));
      ++start[key[b] + 1];
    }
    for (uint32_t g = 0; g < ns; ++g) start[g + 1] += start[g];
    for (size_t b = 0; b < count; ++b) order[start[key[b]]++] = static_cast<uint32_t>(b);
    const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    const __m256i imax = _mm256_set1_epi32(std::numeric_limits<int32_t>::max());
    const __m256 grow = _mm256_set1_ps(1.001f);
    alignas(32) float tmp[2][8];
    alignas(32) int32_t tid[2][8];
    __m256 mv[2][K != 0 ? K : 4];
    uint64_t visited = 0;
    for (size_t r = 0; r < count; r += 16) {
      const size_t nb = std::min<size_t>(16, count - r);
      ++run_id;
      for (uint32_t j = 0; j < k; ++j) {
        for (size_t l = 0; l < 16; ++l) tmp[l / 8][l % 8] = l < nb ? -2.0f * y[order[r + l] * k + j] : 0.0f;
        mv[0][j] = _mm256_load_ps(tmp[0]);
        mv[1][j] = _mm256_load_ps(tmp[1]);
      }
      __m256 ny2[2], slack[2], valid[2];
      for (size_t l = 0; l < 16; ++l) tmp[l / 8][l % 8] = l < nb ? ny2v[order[r + l]] : 0.0f;
      ny2[0] = _mm256_load_ps(tmp[0]);
      ny2[1] = _mm256_load_ps(tmp[1]);
      for (size_t l = 0; l < 16; ++l) tmp[l / 8][l % 8] = l < nb ? slackv[order[r + l]] : 0.0f;
      slack[0] = _mm256_load_ps(tmp[0]);
      slack[1] = _mm256_load_ps(tmp[1]);
      for (size_t l = 0; l < 16; ++l) tid[l / 8][l % 8] = l < nb ? -1 : 0;
      valid[0] = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tid[0])));
      valid[1] = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(tid[1])));
      __m256 best[2] = {inf, inf};
      __m256i bidx[2] = {imax, imax};
      __m256 rad[2];
      auto eval = [&](uint32_t g) __attribute__((target("avx2"))) {
        stamp[g] = run_id;
        ++visited;
        const float* c = t.cl_cw_.data() + static_cast<size_t>(g) * 8 * k;
        for (uint32_t i = 0; i < 8; ++i, c += k) {
          const size_t slot = static_cast<size_t>(g) * 8 + i;
          const __m256 base = _mm256_broadcast_ss(t.cl_n2_.data() + slot);
          const __m256i id = _mm256_set1_epi32(t.cl_idx_[slot]);
          for (int h = 0; h < 2; ++h) {
            __m256 sc = base;
            for (uint32_t j = 0; j < k; ++j) {
              sc = _mm256_add_ps(sc, _mm256_mul_ps(mv[h][j], _mm256_broadcast_ss(c + j)));
            }
            KeepLexMin(sc, id, best[h], bidx[h]);
          }
        }
      };
      // sqrt(T) per lane, T = max(best + ||y||^2, 0) + slack, grown for the f32 roundings.
      auto radius = [&]() __attribute__((target("avx2"))) {
        for (int h = 0; h < 2; ++h) {
          const __m256 tt = _mm256_add_ps(
              _mm256_max_ps(_mm256_add_ps(best[h], ny2[h]), _mm256_setzero_ps()), slack[h]);
          rad[h] = _mm256_mul_ps(_mm256_sqrt_ps(tt), grow);
        }
      };
      // Whether some block of the run may have its winner within `rho` of `mu`.
      auto may_hold = [&](const float* mu, const float* mu_n2_p, const float* rho_p)
                          __attribute__((target("avx2"))) {
        const __m256 mu_n2 = _mm256_broadcast_ss(mu_n2_p);
        const __m256 rho = _mm256_broadcast_ss(rho_p);
        int need = 0;
        for (int h = 0; h < 2; ++h) {
          __m256 d2 = mu_n2;
          for (uint32_t j = 0; j < k; ++j) {
            d2 = _mm256_add_ps(d2, _mm256_mul_ps(mv[h][j], _mm256_broadcast_ss(mu + j)));
          }
          d2 = _mm256_add_ps(d2, ny2[h]);  // ||y - mu||^2
          const __m256 lim = _mm256_add_ps(rho, rad[h]);
          const __m256 thr = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(lim, lim), grow), slack[h]);
          need |= _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(d2, thr, _CMP_LE_OQ), valid[h]));
        }
        return need != 0;
      };
      // First the clusters of the run's own super-clusters (a good bound), then the rest.
      for (size_t l = 0; l < nb; ++l) {
        const uint32_t sp = key[order[r + l]];
        if (stamp[nc + sp] == run_id) continue;
        stamp[nc + sp] = run_id;
        for (uint32_t g = 8 * sp; g < std::min(nc, 8 * sp + 8); ++g) eval(g);
      }
      radius();
      for (uint32_t sp = 0; sp < ns; ++sp) {
        if (stamp[nc + sp] == run_id) continue;
        if (!may_hold(t.sup_mu_.data() + static_cast<size_t>(sp) * k, t.sup_mu_n2_.data() + sp,
                      t.sup_rho_.data() + sp)) {
          continue;
        }
        for (uint32_t g = 8 * sp; g < std::min(nc, 8 * sp + 8); ++g) {
          if (stamp[g] == run_id) continue;
          if (may_hold(t.cl_mu_.data() + static_cast<size_t>(g) * k, t.cl_mu_n2_.data() + g,
                       t.cl_rho_.data() + g)) {
            eval(g);
            radius();
          }
        }
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(tid[0]), bidx[0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tid[1]), bidx[1]);
      for (size_t l = 0; l < nb; ++l) {
        const int32_t bi = tid[l / 8][l % 8];
        out[order[r + l]] = static_cast<uint32_t>(bi) < t.n_ ? static_cast<uint32_t>(bi) : 0;
      }
    }
    t_groups_visited += visited * 16 + count * ((ns + 7) / 8);
  }

  template <uint32_t K>
  static void Avx2LaneBrute(const SearchTable& t, const float* y, size_t count, uint32_t* out) {
    if (Avx512Active()) {
      Avx512LaneBrute(t, y, count, out);
      t_groups_visited += count * t.groups_;
      return;
    }
    Avx2Lanes<K>(t.cw_.data(), t.cw_n2_.data(), FullIds(t.n_), t.n_, t.k_, y, count, out, nullptr);
    t_groups_visited += count * t.groups_;
  }
};

void SearchTable::Nearest(const float* y, size_t count, uint32_t* out, Isa isa) const {
  if (isa == Isa::kAvx2 && CpuHasAvx2F16c() && grid_ > 0 && use_clusters_) {
    return SearchKernels::Avx2Grid<2>(*this, y, count, out);
  }
  // Measured (codec_bench Search/avx2/k4): the screening beats the f32 brute force and, at
  // N = 4096, the clustered search too (4.3M vs 2.4M blocks/s), so it goes first. Below 32 blocks
  // its per-call setup is not worth it.
  if (isa == Isa::kAvx2 && k_ == 4 && count >= 32 && screening() && Avx512Active()) {
    return Avx512Screen4(*this, y, count, out);
  }
  if (isa == Isa::kAvx2 && CpuHasAvx2F16c() && clusters_ > 0 && use_clusters_) {
    switch (k_) {
      case 4: return SearchKernels::Avx2Clustered<4>(*this, y, count, out);
      default: return SearchKernels::Avx2Clustered<0>(*this, y, count, out);
    }
  }
  if (isa == Isa::kAvx2 && CpuHasAvx2F16c() && !prune_) {
    switch (k_) {
      case 1: return SearchKernels::Avx2LaneBrute<1>(*this, y, count, out);
      case 2: return SearchKernels::Avx2LaneBrute<2>(*this, y, count, out);
      case 4: return SearchKernels::Avx2LaneBrute<4>(*this, y, count, out);
      case 8: return SearchKernels::Avx2LaneBrute<8>(*this, y, count, out);
      default: return SearchKernels::Avx2LaneBrute<0>(*this, y, count, out);
    }
  }
  if (isa == Isa::kAvx2 && CpuHasAvx2F16c()) {
    switch (k_) {
      case 1: return SearchKernels::Avx2<1>(*this, y, count, out);
      case 2: return SearchKernels::Avx2<2>(*this, y, count, out);
      case 4: return SearchKernels::Avx2<4>(*this, y, count, out);
      case 8: return SearchKernels::Avx2<8>(*this, y, count, out);
      default: return SearchKernels::Avx2<0>(*this, y, count, out);
    }
  }
  SearchKernels::Scalar(*this, y, count, out);
}

// ---- sums of squares ---------------------------------------------------------------------------

namespace {

void SumSquaresScalar(const float* x, size_t count, uint32_t d, double* out) {
  for (size_t v = 0; v < count; ++v) {
    const float* xv = x + v * d;
    double s = 0;
    for (uint32_t i = 0; i < d; ++i) s += static_cast<double>(xv[i]) * static_cast<double>(xv[i]);
    out[v] = s;
  }
}

// Four vectors per step, lane l of the f64 accumulator holding vector v0 + l: a 4x4 transpose of
// four consecutive elements of each vector feeds element i of all four chains at once.
__attribute__((target("avx2"))) void SumSquaresAvx2(const float* x, size_t count, uint32_t d,
                                                    double* out) {
  size_t v0 = 0;
  for (; v0 + 4 <= count; v0 += 4) {
    const float* p0 = x + v0 * d;
    const float* p1 = p0 + d;
    const float* p2 = p1 + d;
    const float* p3 = p2 + d;
    __m256d acc = _mm256_setzero_pd();
    uint32_t i = 0;
    for (; i + 4 <= d; i += 4) {
      __m128 r0 = _mm_loadu_ps(p0 + i), r1 = _mm_loadu_ps(p1 + i);
      __m128 r2 = _mm_loadu_ps(p2 + i), r3 = _mm_loadu_ps(p3 + i);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  // r_j = element i + j of the four vectors
      for (__m128 r : {r0, r1, r2, r3}) {
        const __m256d e = _mm256_cvtps_pd(r);
        acc = _mm256_add_pd(acc, _mm256_mul_pd(e, e));
      }
    }
    for (; i < d; ++i) {
      const __m256d e = _mm256_cvtps_pd(_mm_setr_ps(p0[i], p1[i], p2[i], p3[i]));
      acc = _mm256_add_pd(acc, _mm256_mul_pd(e, e));
    }
    _mm256_storeu_pd(out + v0, acc);
  }
  SumSquaresScalar(x + v0 * d, count - v0, d, out + v0);
}

}  // namespace

void SumSquaresF64(const float* x, size_t count, uint32_t d, double* out, Isa isa) {
  if (isa == Isa::kAvx2 && CpuHasAvx2F16c()) return SumSquaresAvx2(x, count, d, out);
  SumSquaresScalar(x, count, d, out);
}

// ---- element conversions ----------------------------------------------------------------------

namespace {

__attribute__((target("avx2,f16c"))) void LoadF16Avx2(const uint8_t* in, size_t n, float* out) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = LoadElement(DType::kF16, in, i);
}

__attribute__((target("avx2,f16c"))) void StoreF16Avx2(const float* in, size_t n, uint8_t* out) {
  const __m256 hi = _mm256_set1_ps(kF16Max);
  const __m256 lo = _mm256_set1_ps(-kF16Max);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    // max/min return the second operand when one is NaN: pass the data second so NaN stays NaN.
    __m256 v = _mm256_loadu_ps(in + i);
    v = _mm256_max_ps(lo, v);
    v = _mm256_min_ps(hi, v);
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), h);
  }
  for (; i < n; ++i) {
    const float v = std::isnan(in[i]) ? in[i] : std::clamp(in[i], -kF16Max, kF16Max);
    StoreElement(DType::kF16, v, out, i);
  }
}

}  // namespace

void LoadF16(const uint8_t* in, size_t n, float* out, Isa isa) {
  if (isa == Isa::kAvx2 && CpuHasAvx2F16c()) return LoadF16Avx2(in, n, out);
  for (size_t i = 0; i < n; ++i) out[i] = LoadElement(DType::kF16, in, i);
}

void StoreF16Saturating(const float* in, size_t n, uint8_t* out, Isa isa) {
  if (isa == Isa::kAvx2 && CpuHasAvx2F16c()) return StoreF16Avx2(in, n, out);
  for (size_t i = 0; i < n; ++i) {
    const float v = std::isnan(in[i]) ? in[i] : std::clamp(in[i], -kF16Max, kF16Max);
    StoreElement(DType::kF16, v, out, i);
  }
}

void StoreBf16Saturating(const float* in, size_t n, uint8_t* out) {
  const float bmax = Bf16ToFloat(kBf16MaxBits);
  for (size_t i = 0; i < n; ++i) {
    const float v = std::isnan(in[i]) ? in[i] : std::clamp(in[i], -bmax, bmax);
    StoreElement(DType::kBF16, v, out, i);
  }
}

}  // namespace fibquant::codec_internal
