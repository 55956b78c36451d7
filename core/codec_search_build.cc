// Build-time structures of the pruned searches (see codec_kernels.h): the clusters and
// super-clusters of the clustered search and the cell lists of the grid. Deterministic (stable
// sorts, ties by index); f64 geometry with margins that cover the f32 scoring, so the kernels in
// codec_kernels.cc return the same (score, index) minimum as the brute force.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "core/codec_kernels.h"

namespace fibquant::codec_internal {
namespace {

// The bounding ball of the codewords `ids` (a cluster or a super-cluster): centre `mu` (k values,
// the f64 mean summed in the order of `ids`, rounded to f32), its squared norm (f64 sum of the f32
// centre, rounded to f32) and a radius rounded up (f64 distances, grown by 1e-6 and one f32 ulp) so
// the f32 tests of the clustered search never exclude a member.
void Ball(const float* cw, uint32_t k, const std::vector<uint32_t>& ids, float* mu, float* mu_n2,
          float* rho) {
  double sum[256] = {};
  for (uint32_t id : ids) {
    for (uint32_t j = 0; j < k; ++j) sum[j] += cw[static_cast<size_t>(id) * k + j];
  }
  double mu2 = 0;
  for (uint32_t j = 0; j < k; ++j) {
    mu[j] = static_cast<float>(sum[j] / static_cast<double>(ids.size()));
    mu2 += static_cast<double>(mu[j]) * mu[j];
  }
  *mu_n2 = static_cast<float>(mu2);
  double r = 0;
  for (uint32_t id : ids) {
    double d2 = 0;
    for (uint32_t j = 0; j < k; ++j) {
      const double d = static_cast<double>(cw[static_cast<size_t>(id) * k + j]) - mu[j];
      d2 += d * d;
    }
    r = std::max(r, std::sqrt(d2));
  }
  *rho = std::nextafter(static_cast<float>(r * (1 + 1e-6)), std::numeric_limits<float>::infinity());
}

}  // namespace

void SearchTable::BuildClusters(SearchTable* t) {
  const uint32_t n = t->n_, k = t->k_;
  const float* cw = t->cw_.data();
  std::vector<std::vector<uint32_t>> leaves;
  // Median cuts along the widest coordinate (lowest j on ties), cut points at multiples of 8 so
  // every cluster but the last is full. Deterministic: stable sorts, ties by index.
  std::vector<std::pair<uint32_t, uint32_t>> stack;  // [begin, end) into ids
  std::vector<uint32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0u);
  stack.emplace_back(0, n);
  while (!stack.empty()) {
    auto [b, e] = stack.back();
    stack.pop_back();
    if (e - b <= 8) {
      leaves.emplace_back(ids.begin() + b, ids.begin() + e);
      continue;
    }
    uint32_t dim = 0;
    double widest = -1;
    for (uint32_t j = 0; j < k; ++j) {
      double lo = std::numeric_limits<double>::infinity(), hi = -lo;
      for (uint32_t i = b; i < e; ++i) {
        lo = std::min<double>(lo, cw[static_cast<size_t>(ids[i]) * k + j]);
        hi = std::max<double>(hi, cw[static_cast<size_t>(ids[i]) * k + j]);
      }
      if (hi - lo > widest) {
        widest = hi - lo;
        dim = j;
      }
    }
    std::stable_sort(ids.begin() + b, ids.begin() + e, [&](uint32_t x, uint32_t y) {
      return cw[static_cast<size_t>(x) * k + dim] < cw[static_cast<size_t>(y) * k + dim];
    });
    const uint32_t mid = b + std::max<uint32_t>(8, ((e - b) / 2 + 7) / 8 * 8);
    if (mid >= e) {
      leaves.emplace_back(ids.begin() + b, ids.begin() + e);
      continue;
    }
    stack.emplace_back(mid, e);  // popped second: left half first
    stack.emplace_back(b, mid);
  }
  const uint32_t c = static_cast<uint32_t>(leaves.size());
  t->clusters_ = c;
  t->cl_cw_.assign(static_cast<size_t>(c) * 8 * k, 0.0f);
  t->cl_n2_.assign(static_cast<size_t>(c) * 8, std::numeric_limits<float>::infinity());
  t->cl_idx_.assign(static_cast<size_t>(c) * 8, std::numeric_limits<int32_t>::max());
  t->cl_mu_.assign(static_cast<size_t>(c) * k, 0.0f);
  t->cl_mu_n2_.assign(c, 0.0f);
  t->cl_rho_.assign(c, 0.0f);
  for (uint32_t g = 0; g < c; ++g) {
    const auto& leaf = leaves[g];
    for (uint32_t i = 0; i < leaf.size(); ++i) {
      const uint32_t id = leaf[i];
      for (uint32_t j = 0; j < k; ++j) {
        t->cl_cw_[(static_cast<size_t>(g) * 8 + i) * k + j] = cw[static_cast<size_t>(id) * k + j];
      }
      t->cl_n2_[static_cast<size_t>(g) * 8 + i] = t->cw_n2_[id];
      t->cl_idx_[static_cast<size_t>(g) * 8 + i] = static_cast<int32_t>(id);
    }
    Ball(cw, k, leaf, t->cl_mu_.data() + static_cast<size_t>(g) * k, &t->cl_mu_n2_[g], &t->cl_rho_[g]);
  }
  const uint32_t ns = (c + 7) / 8;
  t->supers_ = ns;
  t->sup_mu_.assign(static_cast<size_t>(ns) * k, 0.0f);
  t->sup_mu_n2_.assign(ns, 0.0f);
  t->sup_rho_.assign(ns, 0.0f);
  for (uint32_t sp = 0; sp < ns; ++sp) {
    std::vector<uint32_t> members;
    for (uint32_t g = 8 * sp; g < std::min(c, 8 * sp + 8); ++g) {
      members.insert(members.end(), leaves[g].begin(), leaves[g].end());
    }
    Ball(cw, k, members, t->sup_mu_.data() + static_cast<size_t>(sp) * k, &t->sup_mu_n2_[sp],
         &t->sup_rho_[sp]);
  }
}

void SearchTable::BuildScreen(SearchTable* t) {
  const uint32_t n = t->n_, k = t->k_;
  // The largest power of two with sc max|c| <= 2^15 - 2, so |Cq|_2 <= sc |c|_2 + 1 < 2^15 (the
  // margin covers the rounding of max_norm_).
  const double lim = (0x1p15 - 2) / (t->max_norm_ * (1 + 0x1p-40));
  if (!(lim > 0) || !std::isfinite(lim)) return;
  const double sc = std::ldexp(1.0, std::ilogb(lim));
  t->screen_sc_ = sc;
  t->max_n2_ = 0;
  t->screen_cq_.assign(static_cast<size_t>(n) * 2, 0);
  for (uint32_t i = 0; i < n; ++i) {
    t->max_n2_ = std::max(t->max_n2_, static_cast<double>(t->cw_n2_[i]));
    uint32_t q[4];
    for (uint32_t j = 0; j < k; ++j) {
      const double v = std::nearbyint(static_cast<double>(t->cw_[static_cast<size_t>(i) * k + j]) * sc);
      q[j] = static_cast<uint16_t>(static_cast<int16_t>(v));
    }
    t->screen_cq_[2 * static_cast<size_t>(i)] = static_cast<int32_t>(q[0] | (q[1] << 16));
    t->screen_cq_[2 * static_cast<size_t>(i) + 1] = static_cast<int32_t>(q[2] | (q[3] << 16));
  }
  if (n < kScreenShellMinN) return;
  std::vector<double> norm(n);
  for (uint32_t i = 0; i < n; ++i) {
    double s = 0;
    for (uint32_t j = 0; j < k; ++j) {
      const double c = t->cw_[static_cast<size_t>(i) * k + j];
      s += c * c;
    }
    norm[i] = std::sqrt(s);
  }
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return norm[a] < norm[b]; });
  // Measured at N = 4096 (codec_bench Search/avx2/k4/N4096/brute, two alternating runs on a
  // loaded machine): windows of N/4, N/8, N/16 score 192, 178, 171 groups of 8 per block at
  // 9.8/7.3M, 10.0/7.5M, 9.2/7.3M blocks/s.
  t->screen_window_ = std::max<uint32_t>(64, n / 8);
  t->screen_sorted_cq_.resize(2 * static_cast<size_t>(n));
  t->screen_sorted_n2_.resize(n);
  t->screen_sorted_norm_.resize(n);
  t->screen_sorted_idx_.assign(order.begin(), order.end());
  t->screen_sorted_cw_.resize(static_cast<size_t>(n) * k);
  for (uint32_t p = 0; p < n; ++p) {
    const uint32_t i = order[p];
    t->screen_sorted_cq_[2 * static_cast<size_t>(p)] = t->screen_cq_[2 * static_cast<size_t>(i)];
    t->screen_sorted_cq_[2 * static_cast<size_t>(p) + 1] = t->screen_cq_[2 * static_cast<size_t>(i) + 1];
    t->screen_sorted_n2_[p] = t->cw_n2_[i];
    t->screen_sorted_norm_[p] = norm[i];
    for (uint32_t j = 0; j < k; ++j) {
      t->screen_sorted_cw_[static_cast<size_t>(p) * k + j] = t->cw_[static_cast<size_t>(i) * k + j];
    }
  }
}

void SearchTable::BuildGrid(SearchTable* t) {
  const uint32_t n = t->n_, k = t->k_;
  const float* cw = t->cw_.data();
  // Cells per axis: about 16 cells per codeword (k = 2 only; the code is written for any k <= 4).
  const uint32_t g =
      k == 2 ? std::clamp<uint32_t>(4 * static_cast<uint32_t>(std::ceil(std::sqrt(n))), 16, 128) : 12;
  uint32_t cells = 1;
  for (uint32_t j = 0; j < k; ++j) cells *= g;
  const double r = static_cast<double>(static_cast<float>((k == 2 ? 1.5 : 1.0) * t->max_norm_));
  const double cell = 2 * r / g;
  const double grow = 1e-6 * r;  // a block rounded into the neighbouring cell is still covered
  // Winner slack for any y in the grid (|y| <= r sqrt k): 4 * PruneSlack covers two f32 scores.
  const double margin = 4 * PruneSlack(k, r * std::sqrt(static_cast<double>(k)), t->max_norm_) +
                        1e-12 * r * r;
  t->grid_ = g;
  t->grid_r_ = static_cast<float>(r);
  t->grid_start_.assign(static_cast<size_t>(cells) + 1, 0);
  std::vector<uint32_t> cand;
  std::vector<double> lo(n);
  double x0[4], x1[4];
  for (uint32_t c = 0; c < cells; ++c) {
    uint32_t rest = c;
    for (uint32_t j = 0; j < k; ++j) {  // cell c = sum_j index_j g^j
      const uint32_t ij = rest % g;
      rest /= g;
      x0[j] = -r + ij * cell - grow;
      x1[j] = -r + (ij + 1) * cell + grow;
    }
    double u = std::numeric_limits<double>::infinity();
    for (uint32_t i = 0; i < n; ++i) {
      double far = 0, near = 0;
      for (uint32_t j = 0; j < k; ++j) {
        const double a = cw[static_cast<size_t>(i) * k + j];
        const double f = std::max(std::abs(a - x0[j]), std::abs(a - x1[j]));
        const double e = a < x0[j] ? x0[j] - a : (a > x1[j] ? a - x1[j] : 0.0);
        far += f * f;
        near += e * e;
      }
      u = std::min(u, far);
      lo[i] = near;
    }
    cand.clear();
    for (uint32_t i = 0; i < n; ++i) {
      if (lo[i] <= u + margin) cand.push_back(i);
    }
    const uint32_t groups = static_cast<uint32_t>((cand.size() + 7) / 8);
    t->grid_start_[c + 1] = t->grid_start_[c] + groups;
    const size_t first = t->grid_n2_.size() / 8;
    t->grid_soa_.resize((first + groups) * k * 8, 0.0f);
    t->grid_n2_.resize((first + groups) * 8, std::numeric_limits<float>::infinity());
    t->grid_idx_.resize((first + groups) * 8, std::numeric_limits<int32_t>::max());
    for (size_t q = 0; q < cand.size(); ++q) {
      const size_t grp = first + q / 8, lane = q % 8;
      const uint32_t i = cand[q];
      for (uint32_t j = 0; j < k; ++j) {
        t->grid_soa_[(grp * k + j) * 8 + lane] = cw[static_cast<size_t>(i) * k + j];
      }
      t->grid_n2_[grp * 8 + lane] = t->cw_n2_[i];
      t->grid_idx_[grp * 8 + lane] = static_cast<int32_t>(i);
    }
  }
}

}  // namespace fibquant::codec_internal
