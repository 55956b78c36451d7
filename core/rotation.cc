// Seeded rotations: construction (Haar QR, randomized Hadamard), digest, f64 reference paths and the
// portable scalar f32 batch kernels. The exact arithmetic of construction is normative
// (docs/format/rotation.md): every loop order below is part of the rotation digest.
#include "core/rotation.h"

#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/digest.h"
#include "core/profile.h"
#include "core/rng.h"
#include "core/rotation_kernels.h"

namespace fibquant {
namespace {

using rotation_internal::kPanelWidth;

std::atomic<uint8_t> g_kernel{static_cast<uint8_t>(RotationKernel::kAuto)};

bool UseSimd() {
  return g_kernel.load(std::memory_order_relaxed) == static_cast<uint8_t>(RotationKernel::kAuto) &&
         RotationSimdAvailable();
}

// Applies the reflector of step j (v = (v0, col[j+1..d-1]), tau = t) to columns c0..c1-1 of the
// column-major d x d matrix m, rows j..d-1. For each column: s = v0*m[j][c] + sum_{i>j} col[i]*m[i][c]
// (i ascending), f = s*t, m[j][c] -= f*v0, m[i][c] -= f*col[i]. Columns are independent, so four
// are processed together purely for instruction-level parallelism; each column's operations and
// their order are exactly the sequential ones, so the bits do not depend on the grouping. (Splitting
// columns over threads would not change a bit either, but on the shared 2-core machine it did not
// pay for the thread start-ups, so Create stays single-threaded.)
void ReflectColumnRange(double* m, size_t d, size_t j, const double* col, double v0, double t,
                        size_t c0, size_t c1) {
  size_t c = c0;
  for (; c + 4 <= c1; c += 4) {
    double* m0 = m + c * d;
    double* m1 = m0 + d;
    double* m2 = m1 + d;
    double* m3 = m2 + d;
    double s0 = v0 * m0[j], s1 = v0 * m1[j], s2 = v0 * m2[j], s3 = v0 * m3[j];
    for (size_t i = j + 1; i < d; ++i) {
      const double v = col[i];
      s0 += v * m0[i];
      s1 += v * m1[i];
      s2 += v * m2[i];
      s3 += v * m3[i];
    }
    const double f0 = s0 * t, f1 = s1 * t, f2 = s2 * t, f3 = s3 * t;
    m0[j] -= f0 * v0;
    m1[j] -= f1 * v0;
    m2[j] -= f2 * v0;
    m3[j] -= f3 * v0;
    for (size_t i = j + 1; i < d; ++i) {
      const double v = col[i];
      m0[i] -= f0 * v;
      m1[i] -= f1 * v;
      m2[i] -= f2 * v;
      m3[i] -= f3 * v;
    }
  }
  for (; c < c1; ++c) {
    double* mc = m + c * d;
    double s = v0 * mc[j];
    for (size_t i = j + 1; i < d; ++i) s += col[i] * mc[i];
    const double f = s * t;
    mc[j] -= f * v0;
    for (size_t i = j + 1; i < d; ++i) mc[i] -= f * col[i];
  }
}

// Haar rotation, row-major f64. The arithmetic uses only + - * / and sqrt in the documented order,
// under -ffp-contract=off, so the bits are the same on every x86-64 CPU.
std::vector<double> HaarMatrix(uint32_t dim, uint64_t seed) {
  const size_t d = dim;
  // a: column-major working matrix, a[c*d + r] = A[r][c]. Draws fill column 0 first.
  std::vector<double> a(d * d);
  Rng rng(seed);
  for (size_t i = 0; i < d * d; ++i) a[i] = rng.Normal();

  // Householder QR. After step j, a[j+1.., j] still holds v[1..] of the reflector (v[i] = A[j+i][j]
  // for i >= 1 is untouched by the reflection it defines), v0[j] holds v[0].
  std::vector<double> v0(d, 0.0), tau(d, 0.0), rdiag(d, 0.0);
  std::vector<char> reflect(d, 0);
  for (size_t j = 0; j < d; ++j) {
    double* col = &a[j * d];
    const double alpha = col[j];
    double sigma = 0.0;
    for (size_t i = j + 1; i < d; ++i) sigma += col[i] * col[i];
    if (sigma == 0.0) {  // nothing below the diagonal (always so for the last column)
      rdiag[j] = alpha;
      continue;
    }
    const double norm = std::sqrt(alpha * alpha + sigma);
    const double beta = alpha >= 0.0 ? -norm : norm;  // opposite sign to alpha: no cancellation in v0
    const double v0j = alpha - beta;
    const double vtv = v0j * v0j + sigma;
    const double t = 2.0 / vtv;
    v0[j] = v0j;
    tau[j] = t;
    rdiag[j] = beta;
    reflect[j] = 1;
    // Apply H_j = I - tau v vᵀ to columns j+1..d-1, rows j..d-1.
    ReflectColumnRange(a.data(), d, j, col, v0j, t, j + 1, d);
  }

  // Q = H_0 H_1 ... H_{d-1}, accumulated backward from the identity: Q <- H_j Q for j = d-1..0.
  // Before step j, Q differs from I only in rows/columns > j, so only columns j..d-1 change.
  std::vector<double> q(d * d, 0.0);  // column-major
  for (size_t i = 0; i < d; ++i) q[i * d + i] = 1.0;
  for (size_t jj = d; jj-- > 0;) {
    if (!reflect[jj]) continue;
    const double* col = &a[jj * d];
    const double v0j = v0[jj];
    const double t = tau[jj];
    ReflectColumnRange(q.data(), d, jj, col, v0j, t, jj, d);
  }

  // Mezzadri: make R's diagonal non-negative by negating the matching columns of Q, which makes
  // the distribution of Q exactly Haar on O(d).
  for (size_t j = 0; j < d; ++j) {
    if (rdiag[j] < 0.0) {
      for (size_t i = 0; i < d; ++i) q[j * d + i] = -q[j * d + i];
    }
  }

  // Row-major result, reusing a's storage (the reflectors are no longer needed): at d = 4096 each
  // d x d buffer is 128 MiB.
  for (size_t r = 0; r < d; ++r) {
    for (size_t c = 0; c < d; ++c) a[r * d + c] = q[c * d + r];
  }
  return a;
}

// Packs P (given as P[c][j] = get(c, j)) into column panels of kPanelWidth lanes, zero padded.
template <typename Get>
std::vector<float> PackPanels(uint32_t dim, Get get) {
  const size_t d = dim;
  const size_t panels = (d + kPanelWidth - 1) / kPanelWidth;
  std::vector<float> out(panels * d * kPanelWidth, 0.0f);
  for (size_t p = 0; p < panels; ++p) {
    for (size_t c = 0; c < d; ++c) {
      for (size_t l = 0; l < kPanelWidth; ++l) {
        const size_t j = p * kPanelWidth + l;
        if (j < d) out[(p * d + c) * kPanelWidth + l] = static_cast<float>(get(c, j));
      }
    }
  }
  return out;
}

// In-place unnormalised fast Walsh-Hadamard transform (the documented butterfly order).
template <typename T>
void Fwht(T* x, size_t d) {
  for (size_t h = 1; h < d; h *= 2) {
    for (size_t i = 0; i < d; i += 2 * h) {
      for (size_t j = i; j < i + h; ++j) {
        const T a = x[j];
        const T b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
}

double HadamardScale(uint32_t dim) {
  const double d = static_cast<double>(dim);
  return 1.0 / (d * std::sqrt(d));
}

// The largest power of two <= dim: the window length of the two-window Hadamard (== dim for a
// power of two, which then uses the single-window construction).
uint32_t HadamardWindow(uint32_t dim) { return uint32_t{1} << (std::bit_width(dim) - 1); }

// Normalisation of one window transform: 1 / sqrt(P), binary64.
double WindowScale(uint32_t window) { return 1.0 / std::sqrt(static_cast<double>(window)); }

// One normalised window transform of the reference path: FWHT of x[off, off + p), then scale.
void WindowF64(double* x, size_t off, size_t p, double scale) {
  Fwht(x + off, p);
  for (size_t i = off; i < off + p; ++i) x[i] *= scale;
}

}  // namespace

void SetRotationKernelForTesting(RotationKernel kernel) {
  g_kernel.store(static_cast<uint8_t>(kernel), std::memory_order_relaxed);
}

bool RotationSimdAvailable() {
  static const bool available = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return available;
}

absl::StatusOr<Rotation> Rotation::Create(std::string_view algorithm, uint32_t dim, uint64_t seed) {
  const bool haar = algorithm == kRotationHaarQr;
  const bool hadamard = algorithm == kRotationHadamard;
  if (!haar && !hadamard) {
    // Echo at most 64 bytes of the caller's string: it may be arbitrarily long.
    return absl::InvalidArgumentError(absl::StrCat("rotation algorithm \"",
                                                   std::string(algorithm.substr(0, 64)),
                                                   "\" is unknown (expected \"",
                                                   std::string(kRotationHaarQr), "\" or \"",
                                                   std::string(kRotationHadamard), "\")"));
  }
  if (dim == 0) return absl::InvalidArgumentError("rotation dim must be >= 1, got 0");
  if (dim > kMaxRotationDim) {
    return absl::ResourceExhaustedError(absl::StrCat("rotation dim ", dim,
                                                     " exceeds kMaxRotationDim ", kMaxRotationDim));
  }

  Rotation r;
  r.algorithm_ = std::string(algorithm);
  r.dim_ = dim;
  r.seed_ = seed;
  CanonicalWriter w(kRotationSchema);
  w.Str(r.algorithm_);
  w.U32(dim);
  w.U64(seed);
  const size_t d = dim;
  if (haar) {
    r.matrix_ = HaarMatrix(dim, seed);
    for (double v : r.matrix_) w.F64(v);
    const std::vector<double>& m = r.matrix_;
    // Forward Y = X Mᵀ: P[c][j] = M[j][c]. Inverse X = Y M: P[c][j] = M[c][j].
    r.packed_fwd_ = PackPanels(dim, [&](size_t c, size_t j) { return m[j * d + c]; });
    r.packed_inv_ = PackPanels(dim, [&](size_t c, size_t j) { return m[c * d + j]; });
  } else {
    Rng rng(seed);
    r.window_ = HadamardWindow(dim);
    const size_t count = (r.window_ == d ? 3 : 6) * d;
    r.signs_.resize(count);
    for (size_t i = 0; i < count; ++i) r.signs_[i] = (rng.NextU64() >> 63) == 0 ? 1 : -1;
    for (int8_t s : r.signs_) w.U8(s > 0 ? 1 : 0);
    if (r.window_ != d) {
      r.PrepareWindowedF32();
      r.digest_ = w.Digest();
      return r;
    }
    const float scale = static_cast<float>(HadamardScale(dim));
    r.sign1_scaled_f32_.resize(d);
    r.sign2_f32_.resize(d);
    r.sign3_f32_.resize(d);
    for (size_t i = 0; i < d; ++i) {
      r.sign1_scaled_f32_[i] = static_cast<float>(r.signs_[i]) * scale;
      r.sign2_f32_[i] = static_cast<float>(r.signs_[d + i]);
      r.sign3_f32_[i] = static_cast<float>(r.signs_[2 * d + i]);
    }
  }
  r.digest_ = w.Digest();
  return r;
}

bool Rotation::is_hadamard() const { return algorithm_ == kRotationHadamard; }

// The f32 windowed kernels fold each window's 1/sqrt(P) into the sign vector applied right after
// that window (coordinates outside the window keep a plain sign), so a round is four passes (signs,
// FWHT, signs, FWHT). Forward order per round: A-signs, FWHT(A), B-signs, FWHT(B); the scale of the
// last FWHT(B) has no following sign vector and is applied by the kernel (window_scale_f32_). Inverse
// order per round (rounds 3, 2, 1): FWHT(B), B-signs, FWHT(A), A-signs, each sign vector folding the
// scale of the FWHT just before it. With P an even power of two the scale is exact in f32.
void Rotation::PrepareWindowedF32() {
  const size_t d = dim_, p = window_;
  const double scale = WindowScale(window_);
  window_scale_f32_ = static_cast<float>(scale);
  auto in_a = [&](size_t i) { return i < p; };
  auto in_b = [&](size_t i) { return i >= d - p; };
  windowed_fwd_f32_.assign(6 * d, 0.0f);
  windowed_inv_f32_.assign(6 * d, 0.0f);
  for (size_t round = 0; round < 3; ++round) {
    const int8_t* sa = &signs_[2 * round * d];
    const int8_t* sb = sa + d;
    float* fa = &windowed_fwd_f32_[2 * round * d];
    float* fb = fa + d;
    float* ia = &windowed_inv_f32_[2 * round * d];
    float* ib = ia + d;
    for (size_t i = 0; i < d; ++i) {
      // Forward: A-signs follow the previous round's FWHT(B) (none before round 0).
      fa[i] = static_cast<float>(sa[i] * (round > 0 && in_b(i) ? scale : 1.0));
      fb[i] = static_cast<float>(sb[i] * (in_a(i) ? scale : 1.0));
      ib[i] = static_cast<float>(sb[i] * (in_b(i) ? scale : 1.0));
      ia[i] = static_cast<float>(sa[i] * (in_a(i) ? scale : 1.0));
    }
  }
}

void Rotation::Apply(const double* x, double* y) const {
  const size_t d = dim_;
  if (is_hadamard() && window_ != d) {  // two windows A = [0, P), B = [d - P, d) per round
    if (y != x) std::memcpy(y, x, d * sizeof(double));
    const size_t p = window_;
    const double scale = WindowScale(window_);
    for (size_t round = 0; round < 3; ++round) {
      const int8_t* sa = &signs_[2 * round * d];
      const int8_t* sb = sa + d;
      for (size_t i = 0; i < d; ++i) y[i] *= sa[i];
      WindowF64(y, 0, p, scale);
      for (size_t i = 0; i < d; ++i) y[i] *= sb[i];
      WindowF64(y, d - p, p, scale);
    }
    return;
  }
  if (is_hadamard()) {  // in place in y
    if (y != x) std::memcpy(y, x, d * sizeof(double));
    for (size_t i = 0; i < d; ++i) y[i] *= signs_[i];
    Fwht(y, d);
    for (size_t i = 0; i < d; ++i) y[i] *= signs_[d + i];
    Fwht(y, d);
    for (size_t i = 0; i < d; ++i) y[i] *= signs_[2 * d + i];
    Fwht(y, d);
    const double scale = HadamardScale(dim_);
    for (size_t i = 0; i < d; ++i) y[i] *= scale;
    return;
  }
  if (y == x) {  // rare: compute out of place, then copy back
    std::vector<double> tmp(x, x + d);
    Apply(tmp.data(), y);
    return;
  }
  for (size_t r = 0; r < d; ++r) {
    const double* row = &matrix_[r * d];
    double s = 0.0;
    for (size_t c = 0; c < d; ++c) s += row[c] * x[c];
    y[r] = s;
  }
}

void Rotation::ApplyInverse(const double* y, double* x) const {
  const size_t d = dim_;
  if (is_hadamard() && window_ != d) {  // the forward steps transposed, in reverse order
    if (x != y) std::memcpy(x, y, d * sizeof(double));
    const size_t p = window_;
    const double scale = WindowScale(window_);
    for (size_t round = 3; round-- > 0;) {
      const int8_t* sa = &signs_[2 * round * d];
      const int8_t* sb = sa + d;
      WindowF64(x, d - p, p, scale);
      for (size_t i = 0; i < d; ++i) x[i] *= sb[i];
      WindowF64(x, 0, p, scale);
      for (size_t i = 0; i < d; ++i) x[i] *= sa[i];
    }
    return;
  }
  if (is_hadamard()) {  // in place in x
    if (x != y) std::memcpy(x, y, d * sizeof(double));
    Fwht(x, d);
    for (size_t i = 0; i < d; ++i) x[i] *= signs_[2 * d + i];
    Fwht(x, d);
    for (size_t i = 0; i < d; ++i) x[i] *= signs_[d + i];
    Fwht(x, d);
    const double scale = HadamardScale(dim_);
    for (size_t i = 0; i < d; ++i) x[i] = (x[i] * signs_[i]) * scale;
    return;
  }
  if (x == y) {
    std::vector<double> tmp(y, y + d);
    ApplyInverse(tmp.data(), x);
    return;
  }
  // x_c = sum_r M[r][c] y_r with r ascending from 0.0, accumulated row by row so M is read in order.
  for (size_t c = 0; c < d; ++c) x[c] = 0.0;
  for (size_t r = 0; r < d; ++r) {
    const double* row = &matrix_[r * d];
    const double yr = y[r];
    for (size_t c = 0; c < d; ++c) x[c] += row[c] * yr;
  }
}

void Rotation::ApplyBatch(const float* x, float* y, size_t n) const {
  if (n == 0) return;
  const bool simd = UseSimd();
  if (is_hadamard() && window_ != dim_) {
    (simd ? rotation_internal::HadamardWindowsBatchAvx2 : rotation_internal::HadamardWindowsBatchScalar)(
        x, y, n, dim_, window_, windowed_fwd_f32_.data(), window_scale_f32_, false);
    return;
  }
  if (is_hadamard()) {
    (simd ? rotation_internal::HadamardBatchAvx2 : rotation_internal::HadamardBatchScalar)(
        x, y, n, dim_, sign1_scaled_f32_.data(), sign2_f32_.data(), sign3_f32_.data(), false);
  } else {
    (simd ? rotation_internal::MatMulPanelsAvx2 : rotation_internal::MatMulPanelsScalar)(
        x, y, n, dim_, packed_fwd_.data());
  }
}

void Rotation::ApplyInverseBatch(const float* y, float* x, size_t n) const {
  if (n == 0) return;
  const bool simd = UseSimd();
  if (is_hadamard() && window_ != dim_) {
    (simd ? rotation_internal::HadamardWindowsBatchAvx2 : rotation_internal::HadamardWindowsBatchScalar)(
        y, x, n, dim_, window_, windowed_inv_f32_.data(), window_scale_f32_, true);
    return;
  }
  if (is_hadamard()) {
    (simd ? rotation_internal::HadamardBatchAvx2 : rotation_internal::HadamardBatchScalar)(
        y, x, n, dim_, sign1_scaled_f32_.data(), sign2_f32_.data(), sign3_f32_.data(), true);
  } else {
    (simd ? rotation_internal::MatMulPanelsAvx2 : rotation_internal::MatMulPanelsScalar)(
        y, x, n, dim_, packed_inv_.data());
  }
}

namespace rotation_internal {

namespace {
// Baseline x86-64 has SSE2, so 4-lane GCC vector types compile to plain SSE on every x86-64 CPU
// (and to scalar code elsewhere). 2 rows x 16 lanes = 8 accumulator registers, no spills.
typedef float V4 __attribute__((vector_size(16)));
constexpr size_t kScalarRows = 2;
constexpr size_t kQuads = kPanelWidth / 4;

template <size_t MR>
void ScalarMicro(const float* x, float* y, size_t d, const float* panel, size_t col0) {
  V4 acc[MR][kQuads];
  for (size_t r = 0; r < MR; ++r)
    for (size_t q = 0; q < kQuads; ++q) acc[r][q] = V4{0, 0, 0, 0};
  for (size_t c = 0; c < d; ++c) {
    V4 b[kQuads];
    std::memcpy(b, panel + c * kPanelWidth, sizeof(b));
    for (size_t r = 0; r < MR; ++r) {
      const float a = x[r * d + c];
      const V4 av = {a, a, a, a};
      for (size_t q = 0; q < kQuads; ++q) acc[r][q] += av * b[q];
    }
  }
  const size_t width = d - col0 < kPanelWidth ? d - col0 : kPanelWidth;
  for (size_t r = 0; r < MR; ++r) std::memcpy(y + r * d + col0, acc[r], width * sizeof(float));
}
}  // namespace

void MatMulPanelsScalar(const float* x, float* y, size_t n, uint32_t dim, const float* packed) {
  const size_t d = dim;
  const size_t panels = (d + kPanelWidth - 1) / kPanelWidth;
  constexpr size_t kRowBlock = 64;
  for (size_t r0 = 0; r0 < n; r0 += kRowBlock) {
    const size_t r1 = r0 + kRowBlock < n ? r0 + kRowBlock : n;
    for (size_t p = 0; p < panels; ++p) {
      const float* panel = packed + p * d * kPanelWidth;
      size_t r = r0;
      for (; r + kScalarRows <= r1; r += kScalarRows) {
        ScalarMicro<kScalarRows>(x + r * d, y + r * d, d, panel, p * kPanelWidth);
      }
      for (; r < r1; ++r) ScalarMicro<1>(x + r * d, y + r * d, d, panel, p * kPanelWidth);
    }
  }
}

namespace {
// Portable f32 FWHT with the reference butterflies: stages h = 1, 2 on groups of four in scalar
// registers, then h >= 4 four lanes at a time (SSE2 on baseline x86-64). Same pairs, same order of
// dependent operations, hence the same bits as Fwht<float> and the AVX2 kernel.
void FwhtF32(float* x, size_t d) {
  if (d < 4) {
    Fwht(x, d);
    return;
  }
  for (size_t i = 0; i < d; i += 4) {
    const float b0 = x[i] + x[i + 1], b1 = x[i] - x[i + 1];
    const float b2 = x[i + 2] + x[i + 3], b3 = x[i + 2] - x[i + 3];
    x[i] = b0 + b2;
    x[i + 2] = b0 - b2;
    x[i + 1] = b1 + b3;
    x[i + 3] = b1 - b3;
  }
  for (size_t h = 4; h < d; h *= 2) {
    for (size_t i = 0; i < d; i += 2 * h) {
      for (size_t j = i; j < i + h; j += 4) {
        V4 a, b;
        std::memcpy(&a, x + j, sizeof(V4));
        std::memcpy(&b, x + j + h, sizeof(V4));
        const V4 s = a + b, t = a - b;
        std::memcpy(x + j, &s, sizeof(V4));
        std::memcpy(x + j + h, &t, sizeof(V4));
      }
    }
  }
}

void MulF32(const float* in, const float* s, float* out, size_t d) {
  for (size_t i = 0; i < d; ++i) out[i] = in[i] * s[i];
}
}  // namespace

void HadamardBatchScalar(const float* x, float* y, size_t n, uint32_t dim, const float* s1,
                         const float* d2, const float* d3, bool inverse) {
  const size_t d = dim;
  for (size_t r = 0; r < n; ++r) {
    const float* in = x + r * d;
    float* out = y + r * d;
    if (!inverse) {
      MulF32(in, s1, out, d);
      FwhtF32(out, d);
      MulF32(out, d2, out, d);
      FwhtF32(out, d);
      MulF32(out, d3, out, d);
      FwhtF32(out, d);
    } else {
      std::memcpy(out, in, d * sizeof(float));
      FwhtF32(out, d);
      MulF32(out, d3, out, d);
      FwhtF32(out, d);
      MulF32(out, d2, out, d);
      FwhtF32(out, d);
      MulF32(out, s1, out, d);
    }
  }
}

void HadamardWindowsBatchScalar(const float* x, float* y, size_t n, uint32_t dim, uint32_t window,
                                const float* signs, float last_scale, bool inverse) {
  const size_t d = dim, p = window;
  for (size_t r = 0; r < n; ++r) {
    const float* in = x + r * d;
    float* out = y + r * d;
    std::memcpy(out, in, d * sizeof(float));
    if (!inverse) {
      for (size_t round = 0; round < 3; ++round) {
        MulF32(out, signs + 2 * round * d, out, d);
        FwhtF32(out, p);
        MulF32(out, signs + (2 * round + 1) * d, out, d);
        FwhtF32(out + d - p, p);
      }
      for (size_t i = d - p; i < d; ++i) out[i] *= last_scale;
    } else {
      for (size_t round = 3; round-- > 0;) {
        FwhtF32(out + d - p, p);
        MulF32(out, signs + (2 * round + 1) * d, out, d);
        FwhtF32(out, p);
        MulF32(out, signs + 2 * round * d, out, d);
      }
    }
  }
}

}  // namespace rotation_internal
}  // namespace fibquant
