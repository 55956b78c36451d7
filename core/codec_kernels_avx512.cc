// The AVX-512 search kernels (see codec_kernels.h and codec_kernels_avx512.h): the f32
// blocks-across-lanes brute force with 32 blocks per step, and the exact two-stage int16
// screening for k = 4 with its shell test. Compiled for baseline x86-64 with per-function target
// attributes; called only when Avx512Active().
#include "core/codec_kernels_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "core/codec_kernels.h"

namespace fibquant::codec_internal {

struct SearchKernels512 {
  // Avx2Lanes with 32 blocks in two 512-bit registers (AVX-512F): the same f32 operations per
  // score (separate multiplies and adds; the build never contracts), the same strict < per lane.
  // kLex: codewords in any order, ties broken by the lower id (the (score, index) minimum).
  template <uint32_t K, bool kLex = false>
  __attribute__((target("avx512f"))) static void Avx512Lanes(const float* cw, const float* n2,
                                                            const int32_t* ids, uint32_t m,
                                                            uint32_t kk, const float* y,
                                                            size_t count, uint32_t* out) {
    const uint32_t k = K != 0 ? K : kk;
    const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    alignas(64) float tmp[2][16];
    alignas(64) int32_t tid[2][16];
    __m512 mv[2][K != 0 ? K : 256];
    for (size_t b0 = 0; b0 < count; b0 += 32) {
      const size_t nb = std::min<size_t>(32, count - b0);
      for (uint32_t j = 0; j < k; ++j) {
        for (size_t l = 0; l < 32; ++l) {
          tmp[l / 16][l % 16] = l < nb ? -2.0f * y[(b0 + l) * k + j] : 0.0f;
        }
        mv[0][j] = _mm512_load_ps(tmp[0]);
        mv[1][j] = _mm512_load_ps(tmp[1]);
      }
      __m512 best0 = inf, best1 = inf;
      __m512i bi0 = _mm512_set1_epi32(kLex ? std::numeric_limits<int32_t>::max() : 0), bi1 = bi0;
      const float* c = cw;
      for (uint32_t i = 0; i < m; ++i, c += k) {
        const __m512 base = _mm512_set1_ps(n2[i]);
        __m512 s0 = base, s1 = base;
        for (uint32_t j = 0; j < k; ++j) {
          const __m512 cj = _mm512_set1_ps(c[j]);
          s0 = _mm512_add_ps(s0, _mm512_mul_ps(mv[0][j], cj));
          s1 = _mm512_add_ps(s1, _mm512_mul_ps(mv[1][j], cj));
        }
        const __m512i id = _mm512_set1_epi32(ids[i]);
        __mmask16 lt0 = _mm512_cmp_ps_mask(s0, best0, _CMP_LT_OQ);
        __mmask16 lt1 = _mm512_cmp_ps_mask(s1, best1, _CMP_LT_OQ);
        if constexpr (kLex) {
          lt0 |= _mm512_mask_cmpgt_epi32_mask(_mm512_cmp_ps_mask(s0, best0, _CMP_EQ_OQ), bi0, id);
          lt1 |= _mm512_mask_cmpgt_epi32_mask(_mm512_cmp_ps_mask(s1, best1, _CMP_EQ_OQ), bi1, id);
        }
        best0 = _mm512_mask_mov_ps(best0, lt0, s0);
        best1 = _mm512_mask_mov_ps(best1, lt1, s1);
        bi0 = _mm512_mask_mov_epi32(bi0, lt0, id);
        bi1 = _mm512_mask_mov_epi32(bi1, lt1, id);
      }
      _mm512_store_si512(tid[0], bi0);
      _mm512_store_si512(tid[1], bi1);
      for (size_t l = 0; l < nb; ++l) out[b0 + l] = static_cast<uint32_t>(tid[l / 16][l % 16]);
    }
  }


  // ---- int16 screening, then exact f32 for the undecided blocks (k = 4, AVX-512 VNNI) ---------
  //
  // Stage 1 computes, for every block and codeword, an integer approximation of the specified f32
  // score S(c) = fl(n2f(c) + m.c), m = -2y (see the header), with VPDPWSSD (16 int16 MACs per
  // instruction), and keeps per block the smallest approximate score A1, its codeword a (first
  // index reaching it) and the second smallest A2 over the other codewords. If A2 - A1 > 2B, with
  // B a rigorous bound on |A(c) - S(c)| for every c, then for every c != a
  //   S(c) >= A(c) - B >= A2 - B > A1 + B >= S(a),
  // so a is the strict minimum of S: exactly what the brute force returns. Every other block goes
  // to the exact f32 brute force (stage 2). Exact by construction; only the speed depends on how
  // often stage 2 runs.
  //
  // The bound, in integer units (scores scaled by ss = sy * sc, both powers of two so every
  // scaling below is exact):
  //   Cq_j = round(sc c_j) = sc c_j + dc_j, |dc_j| <= 1/2      (built once, |Cq|_2 < 2^15)
  //   Yq_j = round(sy m_j) = sy m_j + dy_j, |dy_j| <= 1/2      (per call, sy from the largest |m|)
  //   N2q  = round(ss n2f)  = ss n2f + dn,  |dn|   <= 1/2
  //   A    = N2q + sum_j Yq_j Cq_j          (exact int32: |sum| <= |Yq|_2 |Cq|_2 < 2^30, N2q <= 2^29)
  //   A - ss E = dn + sum_j (sy m_j dc_j + sc c_j dy_j + dy_j dc_j),   E = n2f + m.c (real)
  //   |A - ss E| <= 1/2 + (sy/2) |m|_1 + sc |c|_2 |dy|_2 + (1/2) |dy|_1
  //              <= 1/2 + (sy/2) |m|_1 + sc max|c| |dy|_2 + k/4     (dy known per block)
  //   |S - E| <= PruneSlack(k, |y|, max|c|) (every f32 rounding of S; see the header)
  // so B_int = that sum + ss * PruneSlack, computed in f64 with a relative margin of 2^-30 and one
  // unit added (covers the f64 roundings of the bound itself). The test compares A2 - A1 (int64)
  // with 2 B_int.
  // Four blocks of k = 4 from block b, one per 128-bit lane; past `floats` values, zeros.
  __attribute__((target("avx512f"))) static inline __m512 Load4Blocks(const float* y, size_t floats,
                                                                     size_t b) {
    const size_t left = floats - b * 4;
    const __mmask16 mk =
        left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    return _mm512_maskz_loadu_ps(mk, y + b * 4);
  }
  // The sum of the four values of each 128-bit lane, in every value of the lane.
  __attribute__((target("avx512f"))) static inline __m512 LaneSum4(__m512 v) {
    v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_add_ps(v, _mm512_shuffle_ps(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  }

  // (GCC 12's _mm512_min/max_epi32 read _mm512_undefined_epi32(), a -Wmaybe-uninitialized false
  // positive.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
  // The screening over blocks in norm order (tables with screen_window_ > 0): sorts the blocks
  // by their f32 norm (bucket sort), runs the screening with the shell test on the sorted copy and
  // scatters the indices back. Without a window, the screening over all codewords in place.
  __attribute__((target("avx512f,avx512vnni"))) static void Avx512Screen4(const SearchTable& t,
                                                                          const float* y,
                                                                          size_t count,
                                                                          uint32_t* out) {
    if (t.screen_window_ == 0) return Avx512Screen4Impl(t, y, count, out, nullptr);
    constexpr size_t kBuckets = 1024;
    thread_local std::vector<float> y2_tl, ys_tl, y2s_tl;
    thread_local std::vector<uint32_t> key_tl, order_tl, start_tl, res_tl;
    std::vector<float>& y2 = y2_tl;
    std::vector<float>& ys = ys_tl;
    std::vector<float>& y2s = y2s_tl;
    std::vector<uint32_t>& key = key_tl;
    std::vector<uint32_t>& order = order_tl;
    std::vector<uint32_t>& start = start_tl;
    std::vector<uint32_t>& res = res_tl;
    y2.resize(count + 4);
    const size_t floats = count * 4;
    float y2max = 0;
    for (size_t b = 0; b < count; b += 4) {
      const __m512 v = Load4Blocks(y, floats, b);
      const __m512 s2 = LaneSum4(_mm512_mul_ps(v, v));
      _mm_storeu_ps(y2.data() + b, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, s2)));
    }
    for (size_t b = 0; b < count; ++b) {
      if (y2[b] > y2max && y2[b] <= std::numeric_limits<float>::max()) y2max = y2[b];
    }
    const float scale = y2max > 0 ? static_cast<float>(kBuckets) / std::sqrt(y2max) : 0.0f;
    key.resize(count);
    start.assign(kBuckets + 1, 0);
    for (size_t b = 0; b < count; ++b) {
      const float f = std::sqrt(y2[b]) * scale;  // NaN and inf land in the last bucket
      const uint32_t kb = f >= 0 && f < static_cast<float>(kBuckets) ? static_cast<uint32_t>(f)
                                                                     : static_cast<uint32_t>(kBuckets - 1);
      key[b] = kb;
      ++start[kb + 1];
    }
    for (size_t q = 0; q < kBuckets; ++q) start[q + 1] += start[q];
    order.resize(count);
    for (size_t b = 0; b < count; ++b) order[start[key[b]]++] = static_cast<uint32_t>(b);
    ys.resize(floats);
    y2s.resize(count);
    for (size_t i = 0; i < count; ++i) {
      std::memcpy(ys.data() + 4 * i, y + 4 * static_cast<size_t>(order[i]), 4 * sizeof(float));
      y2s[i] = y2[order[i]];
    }
    res.resize(count);
    Avx512Screen4Impl(t, ys.data(), count, res.data(), y2s.data());
    for (size_t i = 0; i < count; ++i) out[order[i]] = res[i];
  }

  // y2v: null (all codewords) or the f32 sums of squares of the blocks, which are in norm order
  // (the shell test).
  __attribute__((target("avx512f,avx512vnni"))) static void Avx512Screen4Impl(const SearchTable& t,
                                                                              const float* y,
                                                                              size_t count,
                                                                              uint32_t* out,
                                                                              const float* y2v) {
    constexpr uint32_t k = 4;
    const uint32_t n = t.n_;
    const bool sorted = y2v != nullptr;
    uint64_t visited_total = 0;
    thread_local std::vector<int32_t> yq_tl, n2q_tl, s1v_tl, s2v_tl, biv_tl;
    thread_local std::vector<float> l1_tl, sub_y_tl;
    thread_local std::vector<uint32_t> undecided_tl, sub_out_tl;
    std::vector<int32_t>& yq = yq_tl;
    std::vector<int32_t>& n2q = n2q_tl;
    std::vector<int32_t>& s1v = s1v_tl;
    std::vector<int32_t>& s2v = s2v_tl;
    std::vector<int32_t>& biv = biv_tl;
    std::vector<float>& l1v = l1_tl;
    thread_local std::vector<float> dy_tl;
    std::vector<float>& dyv = dy_tl;  // per block |dy|_2^2 (f32)
    std::vector<float>& sub_y = sub_y_tl;
    std::vector<uint32_t>& undecided = undecided_tl;
    std::vector<uint32_t>& sub_out = sub_out_tl;
    const size_t padded = (count + 31) / 32 * 32;
    yq.resize(2 * padded);
    l1v.resize(padded);
    dyv.resize(padded);
    const size_t floats = count * k;
    // Largest |y|^2 in f32 (every f32 rounding and underflow covered below); a non-finite or
    // overflowing block sends the whole call to the f32 brute force.
    __m512 ymax2 = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (size_t b = 0; b < count; b += 4) {
      const __m512 v = Load4Blocks(y, floats, b);
      const __m512 s2 = LaneSum4(_mm512_mul_ps(v, v));
      bad |= _mm512_cmp_ps_mask(s2, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ);
      ymax2 = _mm512_max_ps(ymax2, s2);
    }
    if (bad != 0) {
      return Avx512Lanes<4>(t.cw_.data(), t.cw_n2_.data(), IotaIds(n), n, k, y, count, out);
    }
    // |m| = 2|y| <= 2 sqrt((max f32 sum + 2^-140)(1 + 2^-20)): the sum of four f32 squares is
    // within 4 * 2^-24 relative plus 4 * 2^-150 absolute (underflow) of the exact one.
    const double max_m =
        2.0 * std::sqrt((static_cast<double>(_mm512_reduce_max_ps(ymax2)) + 0x1p-140) * (1 + 0x1p-20));
    double lim = 0x1p29 / (t.screen_sc_ * t.max_n2_);
    lim = std::min(lim, (0x1p15 - 2) / max_m);
    // sy in [1, 2^100]: y_j * (-2 sy) is then exact in f32 (a power-of-two scaling up that stays
    // below 2^15) and never overflows.
    if (!(lim >= 1.0)) {
      return Avx512Lanes<4>(t.cw_.data(), t.cw_n2_.data(), IotaIds(n), n, k, y, count, out);
    }
    const double sy = std::ldexp(1.0, std::min(std::ilogb(lim), 100));
    const double ss = sy * t.screen_sc_;
    const __m512 neg2sy = _mm512_set1_ps(static_cast<float>(-2.0 * sy));
    for (size_t b = 0; b < count; b += 4) {
      const __m512 ms = _mm512_mul_ps(Load4Blocks(y, floats, b), neg2sy);  // sy * m_j, exact
      const __m512i q = _mm512_cvt_roundps_epi32(ms, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(yq.data() + 2 * b), _mm512_cvtepi32_epi16(q));
      const __m512 l1 = LaneSum4(_mm512_abs_ps(ms));  // sy |m|_1, within 3 * 2^-24 relative
      _mm_storeu_ps(l1v.data() + b, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, l1)));
      // dy = Yq - sy m, exact in f32 (|dy| <= 1/2 and Yq within a factor 2 of sy m, or Yq = 0);
      // |dy|_2^2 summed in f32 (within 4 * 2^-24 relative, underflow harmless: it only rounds
      // down squares below 2^-126, covered by the 2^-100 added below).
      const __m512 dy = _mm512_sub_ps(_mm512_cvtepi32_ps(q), ms);
      const __m512 dy2 = LaneSum4(_mm512_mul_ps(dy, dy));
      _mm_storeu_ps(dyv.data() + b, _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, dy2)));
    }
    std::fill(yq.begin() + 2 * ((count + 3) / 4 * 4), yq.end(), 0);
    n2q.resize(n);
    const float* n2src = sorted ? t.screen_sorted_n2_.data() : t.cw_n2_.data();
    for (uint32_t i = 0; i < n; ++i) {
      n2q[i] = static_cast<int32_t>(std::nearbyint(static_cast<double>(n2src[i]) * ss));
    }
    s1v.resize(padded);
    s2v.resize(padded);
    biv.resize(padded);
    // 1/2 + k/4 and sc max|c| |dy|_2 (per block; |dy|_2 <= sqrt(k)/2 always).
    const double fixed = 0.5 + 1.0;
    const double dy_c = t.screen_sc_ * t.max_norm_;
    const double slack_c = static_cast<double>(k + 4) * 0x1p-20 * ss;
    const double half_inv_sy = 0.5 / sy;
    // B_int of block b (see above); the decision below computes the same bound eight at a time.
    auto block_bound = [&](size_t b) {
      const double l1 = static_cast<double>(l1v[b]) * (1 + 0x1p-20);
      const double r = l1 * half_inv_sy + t.max_norm_;
      const double dy = std::sqrt((static_cast<double>(dyv[b]) + 0x1p-100) * (1 + 0x1p-20));
      return (fixed + dy_c * dy + 0.5 * l1 + r * r * slack_c) * (1 + 0x1p-30) + 1;
    };
    const int32_t* cq = sorted ? t.screen_sorted_cq_.data() : t.screen_cq_.data();
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i imax = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
    const __m512i one = _mm512_set1_epi32(1);
    const double* cnorm = t.screen_sorted_norm_.data();
    thread_local std::vector<std::pair<uint32_t, uint32_t>> runs_tl;
    std::vector<std::pair<uint32_t, uint32_t>>& runs = runs_tl;
    if (sorted) runs.resize(padded / 32);
    // Per block, for the shell test: ylo <= |y| <= yhi from the f32 sum of squares (within
    // 4 * 2^-24 relative and 2^-140 absolute), and c0 = 3 B_int / ss + yhi^2 + 2^-23 max|c|^2.
    // Padding lanes: ylo = +inf, yhi = -inf, so they never widen the shell.
    thread_local std::vector<double> sh_c0_tl, sh_ylo_tl, sh_yhi_tl;
    std::vector<double>& sh_c0 = sh_c0_tl;
    std::vector<double>& sh_ylo = sh_ylo_tl;
    std::vector<double>& sh_yhi = sh_yhi_tl;
    const double inv_ss = 1.0 / ss;
    if (sorted) {
      sh_c0.assign(padded, 0.0);
      sh_ylo.assign(padded, std::numeric_limits<double>::infinity());
      sh_yhi.assign(padded, -std::numeric_limits<double>::infinity());
      const double c_term = 0x1p-23 * t.max_n2_ * (1 + 0x1p-20);
      for (size_t b = 0; b < count; ++b) {
        const double y2 = static_cast<double>(y2v[b]);
        const double yhi2 = (y2 + 0x1p-140) * (1 + 0x1p-20);
        sh_ylo[b] = std::sqrt(std::max(0.0, y2 * (1 - 0x1p-20) - 0x1p-140));
        sh_yhi[b] = std::sqrt(yhi2) * (1 + 0x1p-40);
        sh_c0[b] = 3 * block_bound(b) * inv_ss + yhi2 + c_term;
      }
    }
    for (size_t b0 = 0; b0 < padded; b0 += 32) {
      __m512i a[2], bb[2];
      for (int h = 0; h < 2; ++h) {
        const __m512i lo = _mm512_loadu_si512(yq.data() + 2 * (b0 + 16 * h));
        const __m512i hi = _mm512_loadu_si512(yq.data() + 2 * (b0 + 16 * h) + 16);
        a[h] = _mm512_permutex2var_epi32(lo, even, hi);   // (Yq0, Yq1) of 16 blocks
        bb[h] = _mm512_permutex2var_epi32(lo, odd, hi);   // (Yq2, Yq3)
      }
      __m512i s1[2] = {imax, imax}, s2[2] = {imax, imax}, bi[2];
      bi[0] = bi[1] = _mm512_setzero_si512();
      // Codewords [p0, p1) (positions in cq / n2q; the index of the brute force, the norm rank
      // when sorted).
      auto eval = [&](uint32_t p0, uint32_t p1) __attribute__((target("avx512f,avx512vnni"))) {
        __m512i id = _mm512_set1_epi32(static_cast<int32_t>(p0));
        for (uint32_t i = p0; i < p1; ++i, id = _mm512_add_epi32(id, one)) {
          const __m512i nq = _mm512_set1_epi32(n2q[i]);
          const __m512i c01 = _mm512_set1_epi32(cq[2 * i]);
          const __m512i c23 = _mm512_set1_epi32(cq[2 * i + 1]);
          for (int h = 0; h < 2; ++h) {
            const __m512i sc = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(nq, a[h], c01), bb[h], c23);
            const __mmask16 lt = _mm512_cmplt_epi32_mask(sc, s1[h]);
            s2[h] = _mm512_min_epi32(s2[h], _mm512_max_epi32(s1[h], sc));
            s1[h] = _mm512_min_epi32(s1[h], sc);
            bi[h] = _mm512_mask_mov_epi32(bi[h], lt, id);
          }
        }
      };
      if (!sorted) {
        eval(0, n);
      } else {
        // Blocks are in norm order: a window of codewords around the run's median norm gives
        // every lane an A1; then only codewords whose norm can pass the shell test below are
        // scored. A skipped c has, with E(c) >= (|c| - |y|)^2 - |y|^2 - 2^-23 |c|^2 (n2f is
        // |c|^2 rounded to f32) and A(c) >= ss E(c) - B_int,
        //   A(c) > A1 + 2 B_int   whenever   (|c| - |y|)^2 > T = (A1 + 3 B_int) / ss + |y|^2 + 2^-23 max|c|^2,
        // so it can be neither the winner nor within 2 B_int of it; A1 only falls later, which keeps
        // the skip valid. |y| is known within [ylo, yhi] from its f32 sum of squares.
        const size_t nb = std::min<size_t>(32, count - std::min(count, b0));
        const size_t mid = b0 + (nb > 0 ? nb / 2 : 0);
        const double ymid = std::sqrt(static_cast<double>(y2v[std::min(mid, count - 1)]));
        const uint32_t pc = static_cast<uint32_t>(
            std::lower_bound(cnorm, cnorm + n, ymid) - cnorm);
        const uint32_t w = t.screen_window_;
        const uint32_t w0 = pc > w / 2 ? std::min(pc - w / 2, n - std::min(n, w)) : 0;
        const uint32_t w1 = std::min(n, w0 + w);
        eval(w0, w1);
        // [p0, p1): the codewords whose norm can pass the shell test for some lane with the
        // current A1 (it only shrinks as A1 falls).
        auto shell = [&](uint32_t* p0, uint32_t* p1) __attribute__((target("avx512f"))) {
          alignas(64) int32_t cur[32];
          _mm512_store_si512(cur, s1[0]);
          _mm512_store_si512(cur + 16, s1[1]);
          __m512d lo = _mm512_set1_pd(std::numeric_limits<double>::infinity());
          __m512d hi = _mm512_set1_pd(-std::numeric_limits<double>::infinity());
          for (int q = 0; q < 4; ++q) {
            const size_t b = b0 + 8 * q;
            const __m512d a1 = _mm512_mul_pd(
                _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(cur + 8 * q))),
                _mm512_set1_pd(inv_ss));  // A1 / ss, exact (ss is a power of two)
            const __m512d c0 = _mm512_loadu_pd(sh_c0.data() + b);
            // T = A1/ss + c0, grown by 2^-30 relative and 2^-40 of its terms' magnitude (the f64
            // roundings; T is a difference of nearly equal terms).
            __m512d tt = _mm512_add_pd(a1, c0);
            tt = _mm512_add_pd(_mm512_mul_pd(tt, _mm512_set1_pd(1 + 0x1p-30)),
                               _mm512_mul_pd(_mm512_add_pd(_mm512_abs_pd(a1), _mm512_abs_pd(c0)),
                                             _mm512_set1_pd(0x1p-40)));
            const __m512d r = _mm512_mul_pd(_mm512_sqrt_pd(_mm512_max_pd(tt, _mm512_setzero_pd())),
                                            _mm512_set1_pd(1 + 0x1p-30));
            lo = _mm512_min_pd(lo, _mm512_sub_pd(_mm512_loadu_pd(sh_ylo.data() + b), r));
            hi = _mm512_max_pd(hi, _mm512_add_pd(_mm512_loadu_pd(sh_yhi.data() + b), r));
          }
          const double lo_s = _mm512_reduce_min_pd(lo), hi_s = _mm512_reduce_max_pd(hi);
          // Norms grown by a relative 2^-40 (their own f64 rounding).
          *p0 = static_cast<uint32_t>(std::lower_bound(cnorm, cnorm + n, lo_s * (1 - 0x1p-40)) - cnorm);
          *p1 = static_cast<uint32_t>(std::upper_bound(cnorm, cnorm + n, hi_s * (1 + 0x1p-40)) - cnorm);
        };
        // Grow the scored interval [e0, e1) a chunk at a time on each side that the shell still
        // needs, re-deriving the shell after every step.
        uint32_t e0 = w0, e1 = w1, p0 = 0, p1 = 0;
        shell(&p0, &p1);
        while (p0 < e0 || p1 > e1) {
          if (p0 < e0) {
            const uint32_t a0 = std::max(p0, e0 > w ? e0 - w : 0u);
            eval(a0, e0);
            e0 = a0;
          }
          if (p1 > e1) {
            const uint32_t a1 = std::min(p1, e1 + w);
            eval(e1, a1);
            e1 = a1;
          }
          shell(&p0, &p1);
        }
        visited_total += e1 - e0;
        runs[b0 / 32] = {e0, e1};
      }
      for (int h = 0; h < 2; ++h) {
        _mm512_storeu_si512(s1v.data() + b0 + 16 * h, s1[h]);
        _mm512_storeu_si512(s2v.data() + b0 + 16 * h, s2[h]);
        _mm512_storeu_si512(biv.data() + b0 + 16 * h, bi[h]);
      }
    }
    if (sorted) {  // norm ranks -> codeword indices
      for (size_t b = 0; b < count; ++b) biv[b] = t.screen_sorted_idx_[biv[b]];
      GroupsVisitedCounter() += (visited_total + 7) / 8 * 32;  // groups of 8 codewords, per block
    } else {
      GroupsVisitedCounter() += count * t.groups_;
    }
    // Decided iff s2 - s1 > 2 B_int, B_int = (3/2 + sc max|c| |dy|_2 + sy|m|_1 / 2
    // + ss PruneSlack(4, |y|, max|c|))
    // (1 + 2^-30) + 1 with sy|m|_1 taken as the f32 sum times (1 + 2^-20) and |y| <= |m|_1 / 2.
    // PruneSlack is written out, (k + 4) 2^-20 (|y| + max|c|)^2, so eight blocks go at once (f64).
    undecided.clear();
    size_t b = 0;
    for (; b + 8 <= count; b += 8) {
      const __m512d l1 = _mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(l1v.data() + b)),
                                       _mm512_set1_pd(1 + 0x1p-20));
      const __m512d r = _mm512_add_pd(_mm512_mul_pd(l1, _mm512_set1_pd(half_inv_sy)),
                                      _mm512_set1_pd(t.max_norm_));
      const __m512d dy = _mm512_sqrt_pd(_mm512_mul_pd(
          _mm512_add_pd(_mm512_cvtps_pd(_mm256_loadu_ps(dyv.data() + b)), _mm512_set1_pd(0x1p-100)),
          _mm512_set1_pd(1 + 0x1p-20)));
      __m512d bound = _mm512_add_pd(_mm512_set1_pd(fixed), _mm512_mul_pd(l1, _mm512_set1_pd(0.5)));
      bound = _mm512_add_pd(bound, _mm512_mul_pd(dy, _mm512_set1_pd(dy_c)));
      bound = _mm512_add_pd(bound, _mm512_mul_pd(_mm512_mul_pd(r, r), _mm512_set1_pd(slack_c)));
      bound = _mm512_add_pd(_mm512_mul_pd(bound, _mm512_set1_pd(1 + 0x1p-30)), _mm512_set1_pd(1.0));
      const __m512d gap = _mm512_sub_pd(
          _mm512_cvtepi32_pd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s2v.data() + b))),
          _mm512_cvtepi32_pd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s1v.data() + b))));
      uint32_t open = static_cast<uint32_t>(
          _mm512_cmp_pd_mask(gap, _mm512_add_pd(bound, bound), _CMP_NGT_UQ));
      std::memcpy(out + b, biv.data() + b, 8 * sizeof(uint32_t));  // undecided ones: overwritten
      while (open != 0) {
        undecided.push_back(static_cast<uint32_t>(b + __builtin_ctz(open)));
        open &= open - 1;
      }
    }
    for (; b < count; ++b) {
      const double bound = block_bound(b);
      const double gap = static_cast<double>(s2v[b]) - static_cast<double>(s1v[b]);
      if (gap > 2 * bound) {
        out[b] = static_cast<uint32_t>(biv[b]);
      } else {
        undecided.push_back(static_cast<uint32_t>(b));
      }
    }
    ScreenFallbackCounter() += undecided.size();
    if (undecided.empty()) return;
    sub_y.resize(undecided.size() * k);
    sub_out.resize(undecided.size());
    for (size_t u = 0; u < undecided.size(); ++u) {
      std::memcpy(sub_y.data() + u * k, y + static_cast<size_t>(undecided[u]) * k, k * sizeof(float));
    }
    if (!sorted) {
      Avx512Lanes<4>(t.cw_.data(), t.cw_n2_.data(), IotaIds(n), n, k, sub_y.data(),
                     undecided.size(), sub_out.data());
    } else {
      // Only the codewords the runs scored (32 undecided blocks at a time, in norm order: the
      // hull of their runs' intervals): every other codeword c of a block's run has
      // A(c) > A1 + 2 B_int, hence S(c) > A1 + B_int >= S(a) (a the screened best), so it is not
      // the f32 minimum, and a superset of candidates keeps the minimum. The codewords are in
      // norm order: (score, index) ties are broken explicitly.
      for (size_t u0 = 0; u0 < undecided.size(); u0 += 32) {
        const size_t u1 = std::min(undecided.size(), u0 + 32);
        uint32_t e0 = n, e1 = 0;
        for (size_t u = u0; u < u1; ++u) {
          e0 = std::min(e0, runs[undecided[u] / 32].first);
          e1 = std::max(e1, runs[undecided[u] / 32].second);
        }
        Avx512Lanes<4, true>(t.screen_sorted_cw_.data() + static_cast<size_t>(e0) * k,
                             t.screen_sorted_n2_.data() + e0, t.screen_sorted_idx_.data() + e0,
                             e1 - e0, k, sub_y.data() + u0 * k, u1 - u0, sub_out.data() + u0);
      }
    }
    for (size_t u = 0; u < undecided.size(); ++u) out[undecided[u]] = sub_out[u];
  }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

  static void LaneBrute(const SearchTable& t, const float* y, size_t count, uint32_t* out) {
    const float* cw = t.cw_.data();
    const float* n2 = t.cw_n2_.data();
    const int32_t* ids = IotaIds(t.n_);
    switch (t.k_) {
      case 1: return Avx512Lanes<1>(cw, n2, ids, t.n_, 1, y, count, out);
      case 2: return Avx512Lanes<2>(cw, n2, ids, t.n_, 2, y, count, out);
      case 4: return Avx512Lanes<4>(cw, n2, ids, t.n_, 4, y, count, out);
      case 8: return Avx512Lanes<8>(cw, n2, ids, t.n_, 8, y, count, out);
      default: return Avx512Lanes<0>(cw, n2, ids, t.n_, t.k_, y, count, out);
    }
  }
};

void Avx512LaneBrute(const SearchTable& t, const float* y, size_t count, uint32_t* out) {
  SearchKernels512::LaneBrute(t, y, count, out);
}

void Avx512Screen4(const SearchTable& t, const float* y, size_t count, uint32_t* out) {
  SearchKernels512::Avx512Screen4(t, y, count, out);
}

}  // namespace fibquant::codec_internal
