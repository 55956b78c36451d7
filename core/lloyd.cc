#include "core/lloyd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "core/parallel.h"

namespace fibquant {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
#ifdef FQ_LLOYD_STATS
}  // namespace
std::atomic<uint64_t> g_full{0}, g_dist{0}, g_pass{0};
namespace {
#endif
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

// The same additions as SqDist, abandoned once the partial sum exceeds `limit`: under
// round-to-nearest, adding a non-negative term never decreases the sum, so the full distance would
// exceed `limit` too. When the loop completes the value is bit-identical to SqDist.
template <int K>
inline double SqDistBounded(const double* x, const double* c, uint32_t k_runtime, double limit) {
  const uint32_t k = K > 0 ? static_cast<uint32_t>(K) : k_runtime;
  double s = 0.0;
  for (uint32_t i = 0; i < k; ++i) {
    const double t = x[i] - c[i];
    s += t * t;
    if (s > limit) return s;
  }
  return s;
}

double Norm(const double* x, uint32_t k) {
  double s = 0.0;
  for (uint32_t i = 0; i < k; ++i) s += x[i] * x[i];
  return std::sqrt(s);
}

// Codewords sorted by Euclidean norm. The search visits codewords in order of |norm - |x||
// and prunes with the reverse triangle inequality ||x - c|| >= | ||x|| - ||c|| |, evaluated with a
// margin that covers every floating-point error, so pruning never changes the result.
struct SearchIndex {
  uint32_t n = 0;
  uint32_t k = 0;
  double max_norm = 0;
  std::vector<double> norms;     // ascending
  std::vector<uint32_t> perm;    // original index of each sorted slot
  std::vector<double> sorted_c;  // codewords in sorted order

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
    sorted_c.resize(static_cast<size_t>(n) * k);
    max_norm = 0;
    for (uint32_t j = 0; j < n; ++j) {
      norms[j] = raw[perm[j]];
      max_norm = std::max(max_norm, norms[j]);
      std::copy_n(c + static_cast<size_t>(perm[j]) * k, k, &sorted_c[static_cast<size_t>(j) * k]);
    }
  }
};

struct SearchResult {
  uint32_t index = kNoIndex;
  double best = kInf;    // exact squared distance of `index`
  double second = kInf;  // smallest squared distance over all other codewords (a lower bound for
                         // pruned ones is never below it)
};

// Exact nearest (and second-nearest distance) of x; equal to the brute-force scan.
template <int K>
SearchResult FullSearch(const SearchIndex& ix, const double* x, double nx) {
  const uint32_t k = ix.k;
  const uint32_t n = ix.n;
  SearchResult r;
  size_t hi = static_cast<size_t>(std::lower_bound(ix.norms.begin(), ix.norms.end(), nx) -
                                  ix.norms.begin());
  size_t lo = hi;  // next lower slot is lo - 1
  // Bounds every rounding error in the two computed norms (relative error < k * 2^-52 each).
  const double tol = 1e-10 * (nx + ix.max_norm);
  bool lo_open = lo > 0;
  bool hi_open = hi < n;
  while (lo_open || hi_open) {
    size_t j;
    double gap;
    bool from_hi;
    if (hi_open && (!lo_open || ix.norms[hi] - nx <= nx - ix.norms[lo - 1])) {
      j = hi;
      gap = ix.norms[hi] - nx;
      from_hi = true;
    } else {
      j = lo - 1;
      gap = nx - ix.norms[lo - 1];
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
      hi_open = ++hi < n;
    } else {
      lo_open = --lo > 0;
    }
#ifdef FQ_LLOYD_STATS
    g_dist.fetch_add(1, std::memory_order_relaxed);
#endif
    const double d = SqDistBounded<K>(x, &ix.sorted_c[j * k], k, r.second);
    if (d > r.second) continue;
    const uint32_t idx = ix.perm[j];
    if (d < r.best || (d == r.best && idx < r.index)) {
      r.second = r.best;
      r.best = d;
      r.index = idx;
    } else if (d < r.second) {
      r.second = d;
    }
  }
  return r;
}

// Assigns samples to their exact nearest codeword across a sequence of codebooks (one Lloyd
// restart after another), skipping the search for samples whose assignment provably cannot have
// changed (Hamerly's bound on the distance to every other codeword, and Elkan's half distance to
// the nearest other codeword). The proofs hold in real arithmetic with a gap of `margin_`, which
// exceeds the accumulated floating-point error by orders of magnitude, so a skipped sample gets the
// same index the brute-force scan would, and its distance is always recomputed with SqDist.
class Assigner {
 public:
  Assigner(const double* samples, size_t m, uint32_t k, int threads)
      : samples_(samples), m_(m), k_(k), threads_(threads), norms_(m), lower_(m) {
    sample_scale_ = 0;
    for (size_t i = 0; i < m; ++i) {
      norms_[i] = Norm(samples + i * k, k);
      sample_scale_ = std::max(sample_scale_, norms_[i]);
    }
  }

  void Assign(const std::vector<double>& c, std::vector<uint32_t>& index,
              std::vector<double>& distance) {
    switch (k_) {
      case 1: return AssignK<1>(c, index, distance);
      case 2: return AssignK<2>(c, index, distance);
      case 3: return AssignK<3>(c, index, distance);
      case 4: return AssignK<4>(c, index, distance);
      case 8: return AssignK<8>(c, index, distance);
      default: return AssignK<0>(c, index, distance);
    }
  }

 private:
  template <int K>
  void AssignK(const std::vector<double>& c, std::vector<uint32_t>& index,
               std::vector<double>& distance) {
    const uint32_t k = k_;
    const uint32_t n = static_cast<uint32_t>(c.size() / k);
    index.resize(m_);
    distance.resize(m_);
    SearchIndex ix;
    ix.Build(c.data(), n, k);
    double scale = std::max(sample_scale_, ix.max_norm);

    // Codeword moves since the previous call.
    const bool bounded = have_prev_ && prev_.size() == c.size();
    std::vector<double> move;
    double move_max = 0, move_second = 0;
    uint32_t move_argmax = kNoIndex;
    if (bounded) {
      move.resize(n);
      for (uint32_t j = 0; j < n; ++j) {
        const size_t o = static_cast<size_t>(j) * k;
        move[j] = std::sqrt(SqDist<0>(&c[o], &prev_[o], k));
        scale = std::max(scale, Norm(&prev_[o], k));
        if (move[j] > move_max) {
          move_second = move_max;
          move_max = move[j];
          move_argmax = j;
        } else if (move[j] > move_second) {
          move_second = move[j];
        }
      }
    }
    const double margin = 1e-7 * scale;

    // Half the distance from each codeword to its nearest other codeword.
    std::vector<double> half_sep(n);
    const size_t cell_chunks = (n + kCellChunk - 1) / kCellChunk;
    ParallelFor(cell_chunks, threads_, [&](size_t chunk) {
      const uint32_t end = static_cast<uint32_t>(std::min<size_t>(n, (chunk + 1) * kCellChunk));
      for (uint32_t j = static_cast<uint32_t>(chunk * kCellChunk); j < end; ++j) {
        const double* cj = &c[static_cast<size_t>(j) * k];
        half_sep[j] = 0.5 * std::sqrt(FullSearch<K>(ix, cj, Norm(cj, k)).second);
      }
    });

    const size_t chunks = (m_ + kLloydChunk - 1) / kLloydChunk;
    ParallelFor(chunks, threads_, [&](size_t chunk) {
      const size_t end = std::min(m_, (chunk + 1) * kLloydChunk);
      for (size_t i = chunk * kLloydChunk; i < end; ++i) {
        const double* x = samples_ + i * k;
        if (bounded) {
          const uint32_t a = index[i];
          const double l = lower_[i] - (a == move_argmax ? move_second : move_max);
          const double da = SqDist<K>(x, &c[static_cast<size_t>(a) * k], k);
          const double u = std::sqrt(da);
          if (u + margin < std::max(l, half_sep[a])) {
            distance[i] = da;
            lower_[i] = l;
            continue;
          }
        }
        const SearchResult r = FullSearch<K>(ix, x, norms_[i]);
#ifdef FQ_LLOYD_STATS
        g_full.fetch_add(1, std::memory_order_relaxed);
#endif
        index[i] = r.index;
        distance[i] = r.best;
        lower_[i] = std::sqrt(r.second);
      }
    });
    prev_ = c;
    have_prev_ = true;
#ifdef FQ_LLOYD_STATS
    g_pass.fetch_add(m_, std::memory_order_relaxed);
#endif
  }

  const double* samples_;
  size_t m_;
  uint32_t k_;
  int threads_;
  std::vector<double> norms_;
  std::vector<double> lower_;  // lower bound on the distance to every non-assigned codeword
  double sample_scale_ = 0;
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
  Assigner as(samples, m, k, threads);
  std::vector<uint32_t> idx;
  std::vector<double> dist;
  as.Assign(std::vector<double>(codewords, codewords + static_cast<size_t>(n) * k), idx, dist);
  std::copy(idx.begin(), idx.end(), index);
  std::copy(dist.begin(), dist.end(), distance);
}

double MeanDistortion(const std::vector<double>& samples, const std::vector<double>& codewords,
                      uint32_t k, int threads) {
  const size_t m = samples.size() / k;
  if (m == 0 || codewords.size() < k) return std::numeric_limits<double>::quiet_NaN();
  Assigner as(samples.data(), m, k, threads);
  std::vector<uint32_t> idx;
  std::vector<double> dist;
  as.Assign(codewords, idx, dist);
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

  Assigner assigner(samples.data(), m, k, params.threads);
  std::vector<uint32_t> index;
  std::vector<double> distance;
  CellStats st;

  LloydResult out;
  LloydReport& rep = out.report;
  rep.restarts = params.restarts;
  rep.iterations = params.iterations;
  rep.training_samples = static_cast<uint32_t>(m);

  assigner.Assign(initial, index, distance);
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
      assigner.Assign(c, index, distance);
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
    assigner.Assign(c, index, distance);
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
