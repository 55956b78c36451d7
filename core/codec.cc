// Quantizer: the FibQuant vector codec (see codec.h and docs/format/code.md).
//
// Both paths validate and encode the norm the same way (f64, left-to-right sum of squares), so the
// norm bytes never depend on the path; they differ in how the block indices are chosen (f64 exact
// vs f32 exact with SIMD) and how decode is evaluated (f64 vs f32). The fast path works on tiles
// of up to kTile vectors in thread-local scratch that only ever grows, so steady-state calls allocate
// nothing.
#include "core/codec.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/bitpack.h"
#include "core/codec_kernels.h"
#include "core/status_macros.h"

namespace fibquant {

using codec_internal::Isa;
using codec_internal::SearchTable;

struct Quantizer::SearchIndex {
  SearchTable table;
};

namespace {

constexpr size_t kTile = 256;
// Tiles shrink for large d so one f32 tile stays within 256 KiB (L2-resident).
constexpr size_t kTileFloats = 65536;

size_t TileFor(CodecPath path, uint32_t d) {
  if (path != CodecPath::kFast) return 1;
  return std::clamp<size_t>(kTileFloats / d, 1, kTile);
}

struct Scratch {
  std::vector<float> x;      // tile input as f32
  std::vector<float> y;      // rotated / gathered
  std::vector<float> z;      // decode output before conversion
  std::vector<uint32_t> idx;
  std::vector<double> xd, ud, yd;
  std::vector<uint8_t> ok;
  std::vector<float> nu;
  std::vector<double> sumsq;
};

Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

template <class T>
void Grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

bool ValidDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

absl::StatusOr<size_t> CheckedMul(size_t a, size_t b, const char* what) {
  if (b != 0 && a > std::numeric_limits<size_t>::max() / b) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": size overflows size_t"));
  }
  return a * b;
}

enum class BatchOp { kEncode, kDecode };

// The argument checks of Quantizer::Encode and Decode: known dtype and path, sizes that do not
// overflow, and `tensor_size` bytes of vectors (Encode's input, Decode's output) and `codes_size`
// bytes of codes for `n` vectors of `dim` elements and `code_bytes` bytes per code. The two sizes
// are checked in argument order: Encode's input first, Decode's codes first.
absl::Status CheckBatchArgs(BatchOp op, DType dtype, CodecPath path, size_t n, uint32_t dim,
                            size_t code_bytes, size_t tensor_size, size_t codes_size) {
  if (!ValidDType(dtype)) return absl::InvalidArgumentError("dtype: unknown element type");
  if (path != CodecPath::kReference && path != CodecPath::kFast) {
    return absl::InvalidArgumentError("path: unknown codec path");
  }
  const bool encode = op == BatchOp::kEncode;
  const char* tensor_what = encode ? "encode input" : "decode output";
  const char* codes_what = encode ? "encode codes" : "decode codes";
  const size_t es = DTypeSize(dtype);
  FQ_ASSIGN_OR_RETURN(const size_t elems, CheckedMul(n, dim, tensor_what));
  FQ_ASSIGN_OR_RETURN(const size_t tensor_bytes, CheckedMul(elems, es, tensor_what));
  FQ_ASSIGN_OR_RETURN(const size_t code_total, CheckedMul(n, code_bytes, codes_what));
  const auto check_tensor = [&]() -> absl::Status {
    if (tensor_size == tensor_bytes) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(tensor_what, ": ", tensor_size, " bytes, expected ",
                                                   tensor_bytes, " (", n, " vectors x ", dim, " x ", es,
                                                   " bytes of ", std::string(DTypeName(dtype)), ")"));
  };
  const auto check_codes = [&]() -> absl::Status {
    if (codes_size == code_total) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(codes_what, ": ", codes_size, " bytes, expected ",
                                                   code_total, " (", n, " codes x ", code_bytes,
                                                   " bytes)"));
  };
  FQ_RETURN_IF_ERROR(encode ? check_tensor() : check_codes());
  return encode ? check_codes() : check_tensor();
}

// The norm rule shared by both paths: every element finite, nu = sqrt(sum x_i^2) in f64 summed
// left to right, nu > 0, and nu narrowed f64 -> f32 -> binary16 finite and > 0. CheckNorm is the
// part after the sum (`sumsq`, from SumSquaresF64 or CheckVector's own loop).
absl::Status CheckNorm(double sumsq, size_t v, double* nu, uint16_t* half);

absl::Status CheckVector(const float* x, uint32_t d, size_t v, double* nu, uint16_t* half) {
  double s = 0;
  for (uint32_t i = 0; i < d; ++i) {
    if (!std::isfinite(x[i])) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "vector %d: element %d is not finite (%g)", v, i, static_cast<double>(x[i])));
    }
    s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  }
  return CheckNorm(s, v, nu, half);
}

absl::Status CheckNorm(double sumsq, size_t v, double* nu, uint16_t* half) {
  const double n = std::sqrt(sumsq);
  if (n == 0) return absl::InvalidArgumentError(absl::StrFormat("vector %d: zero norm", v));
  const uint16_t h = FloatToHalf(static_cast<float>(n));
  const float back = HalfToFloat(h);
  if (!std::isfinite(back) || !(back > 0)) {
    return absl::OutOfRangeError(absl::StrFormat(
        "vector %d: norm %g is outside the fp16 norm range (overflows at >= 65520, underflows "
        "below ~2.98e-8)",
        v, n));
  }
  // In the binary16 subnormal range the stored norm loses precision (a norm of 4e-8 came back as
  // 5.96e-8: the whole vector 49 % too long). Below 2^-15 the rounding error can exceed 2^-10 of
  // the norm, twice the worst case of the normal range; such a vector is refused like one outside
  // the range, so a keep_raw profile stores it raw (exactly) instead of coding it wrong.
  if (std::abs(static_cast<double>(back) - n) > n * 0x1p-10) {
    return absl::OutOfRangeError(absl::StrFormat(
        "vector %d: norm %g is in the fp16 subnormal range, where the stored norm %g is off by "
        "more than 2^-10 of it (norms below ~3.05e-5 lose precision)",
        v, n, static_cast<double>(back)));
  }
  *nu = n;
  *half = h;
  return absl::OkStatus();
}

void ToF32(DType dtype, const uint8_t* in, size_t count, float* out, Isa isa) {
  switch (dtype) {
    case DType::kF32: std::memcpy(out, in, count * 4); return;
    case DType::kF16: codec_internal::LoadF16(in, count, out, isa); return;
    case DType::kBF16: ToFloat(DType::kBF16, in, count, out); return;
  }
}

void FromF32(DType dtype, const float* in, size_t count, uint8_t* out, Isa isa) {
  switch (dtype) {
    case DType::kF32: std::memcpy(out, in, count * 4); return;
    case DType::kF16: codec_internal::StoreF16Saturating(in, count, out, isa); return;
    case DType::kBF16: codec_internal::StoreBf16Saturating(in, count, out); return;
  }
}

// Decode's first step on the fast path: y = nu * codeword for every block of `tn` vectors.
template <uint32_t K>
void GatherScaled(const float* cw, const uint32_t* idx, const float* nu, size_t tn, uint32_t blocks,
                  uint32_t kk, float* y) {
  const uint32_t k = K != 0 ? K : kk;
  for (size_t v = 0; v < tn; ++v) {
    const float n = nu[v];
    const __m128 n4 = _mm_set1_ps(n);  // SSE2 is baseline x86-64: no dispatch; same f32 products
    for (uint32_t j = 0; j < blocks; ++j) {
      const float* c = cw + static_cast<size_t>(idx[v * blocks + j]) * k;
      float* o = y + (v * blocks + j) * k;
      if constexpr (K == 4 || K == 8) {
        for (uint32_t q = 0; q < K; q += 4) {
          _mm_storeu_ps(o + q, _mm_mul_ps(_mm_loadu_ps(c + q), n4));
        }
      } else {
        for (uint32_t c2 = 0; c2 < k; ++c2) o[c2] = c[c2] * n;
      }
    }
  }
}

}  // namespace

Quantizer::Quantizer(Codebook codebook, Rotation rotation)
    : codebook_(std::move(codebook)), rotation_(std::move(rotation)) {
  code_bytes_ = codebook_.profile().code_bytes();
}

absl::StatusOr<std::shared_ptr<const Quantizer>> Quantizer::Create(Codebook codebook) {
  const Profile& p = codebook.profile();
  FQ_RETURN_IF_ERROR(p.Validate());
  const size_t expected = static_cast<size_t>(p.codebook_size) * p.block_dim;
  if (codebook.codewords().size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat("codebook: ", codebook.codewords().size(),
                                                   " codeword values, expected N*k = ", expected));
  }
  FQ_ASSIGN_OR_RETURN(Rotation rotation,
                      Rotation::Create(p.rotation_algorithm, p.rotation_dim(), p.rotation_seed));
  if (rotation.digest() != codebook.rotation_digest()) {
    return absl::DataLossError(absl::StrCat("codebook rotation_digest ", codebook.rotation_digest(),
                                            " does not match the rotation rebuilt from the profile (",
                                            rotation.digest(), ")"));
  }
  std::shared_ptr<Quantizer> q(new Quantizer(std::move(codebook), std::move(rotation)));
  auto index = std::make_shared<SearchIndex>();
  const float* cw = q->codebook_.codewords().data();
  // The k = 2 grid, the clustered search (k = 3, 4 with N >= 1024) and, on AVX-512 VNNI CPUs, the
  // int16 screening (k = 4, any N) beat the norm pruning where they apply. Every choice returns the
  // same indices.
  const bool clustered =
      (p.block_dim == 2 && p.codebook_size >= SearchTable::kGridMinN &&
       p.codebook_size <= SearchTable::kGridMaxN) ||
      (p.block_dim >= 3 && p.block_dim <= 4 && p.codebook_size >= SearchTable::kClusterMinN) ||
      (p.block_dim == 4 && codec_internal::Avx512Active());
  index->table = SearchTable::Build(
      cw, p.codebook_size, p.block_dim,
      !clustered && SearchTable::PruningPays(cw, p.codebook_size, p.block_dim));
  q->search_ = std::move(index);
  return std::shared_ptr<const Quantizer>(std::move(q));
}

absl::Status Quantizer::Encode(DType dtype, absl::Span<const uint8_t> in, size_t n,
                               absl::Span<uint8_t> codes, CodecPath path,
                               std::vector<VectorFailure>* failures) const {
  FQ_RETURN_IF_ERROR(CheckBatchArgs(BatchOp::kEncode, dtype, path, n, dim(), code_bytes_, in.size(),
                                    codes.size()));
  const uint32_t d = dim();
  const size_t es = DTypeSize(dtype);
  if (failures != nullptr) failures->clear();

  const Profile& p = profile();
  const uint32_t k = p.block_dim, blocks = p.block_count(), w = p.wire_index_bits, nc = p.codebook_size;
  // The rotation acts on the unit vector zero-padded to dr = blocks * k coordinates (dr == d when k
  // divides d); the padding is never stored, so only the rotated length changes.
  const uint32_t dr = p.rotation_dim();
  const float* cw = codebook_.codewords().data();
  const Isa isa = codec_internal::ActiveIsa();
  Scratch& s = ThreadScratch();
  const size_t tile = TileFor(path, dr);
  Grow(s.x, tile * d);
  Grow(s.y, tile * dr);
  if (dr != d) Grow(s.z, tile * dr);
  Grow(s.idx, tile * blocks);
  Grow(s.ok, tile);
  Grow(s.nu, tile);
  Grow(s.sumsq, tile);
  uint16_t half_tile[kTile];
  if (path == CodecPath::kReference) {
    Grow(s.xd, d);
    Grow(s.ud, dr);
    Grow(s.yd, dr);
    std::fill_n(s.ud.data() + d, dr - d, 0.0);
  }

  for (size_t t0 = 0; t0 < n; t0 += tile) {
    const size_t tn = std::min(tile, n - t0);
    ToF32(dtype, in.data() + t0 * d * es, tn * d, s.x.data(), isa);
    codec_internal::SumSquaresF64(s.x.data(), tn, d, s.sumsq.data(), isa);
    for (size_t v = 0; v < tn; ++v) {
      double nu = 0;
      uint16_t h = 0;
      // A non-finite sum means a non-finite element: CheckVector finds it for the message.
      absl::Status st = std::isfinite(s.sumsq[v])
                            ? CheckNorm(s.sumsq[v], t0 + v, &nu, &h)
                            : CheckVector(s.x.data() + v * d, d, t0 + v, &nu, &h);
      s.ok[v] = st.ok();
      if (!st.ok()) {
        if (failures == nullptr) return st;
        failures->push_back({t0 + v, std::move(st)});
        std::memset(codes.data() + (t0 + v) * code_bytes_, 0, code_bytes_);
        std::fill_n(s.x.data() + v * d, d, 0.0f);
        continue;
      }
      half_tile[v] = h;
      if (path == CodecPath::kReference) {
        for (uint32_t i = 0; i < d; ++i) s.ud[i] = static_cast<double>(s.x[v * d + i]) / nu;
        rotation_.Apply(s.ud.data(), s.yd.data());
        for (uint32_t j = 0; j < blocks; ++j) {
          s.idx[v * blocks + j] =
              codec_internal::NearestReference(cw, nc, k, s.yd.data() + static_cast<size_t>(j) * k);
        }
      } else {
        const float inv = static_cast<float>(1.0 / nu);
        float* xv = s.x.data() + v * d;
        for (uint32_t i = 0; i < d; ++i) xv[i] *= inv;
      }
    }
    if (path == CodecPath::kFast) {
      if (dr == d) {
        rotation_.ApplyBatch(s.x.data(), s.y.data(), tn);
      } else {
        for (size_t v = 0; v < tn; ++v) {
          std::memcpy(s.z.data() + v * dr, s.x.data() + v * d, d * sizeof(float));
          std::fill_n(s.z.data() + v * dr + d, dr - d, 0.0f);
        }
        rotation_.ApplyBatch(s.z.data(), s.y.data(), tn);
      }
      search_->table.Nearest(s.y.data(), tn * blocks, s.idx.data(), isa);
    }
    for (size_t v = 0; v < tn; ++v) {
      if (!s.ok[v]) continue;
      uint8_t* code = codes.data() + (t0 + v) * code_bytes_;
      code[0] = static_cast<uint8_t>(half_tile[v] & 0xff);
      code[1] = static_cast<uint8_t>(half_tile[v] >> 8);
      PackRaw(s.idx.data() + v * blocks, blocks, w, code + 2);
    }
  }
  return absl::OkStatus();
}

absl::Status Quantizer::Decode(absl::Span<const uint8_t> codes, size_t n, DType dtype,
                               absl::Span<uint8_t> out, CodecPath path) const {
  FQ_RETURN_IF_ERROR(CheckBatchArgs(BatchOp::kDecode, dtype, path, n, dim(), code_bytes_, out.size(),
                                    codes.size()));
  const uint32_t d = dim();
  const size_t es = DTypeSize(dtype);

  const Profile& p = profile();
  const uint32_t k = p.block_dim, blocks = p.block_count(), w = p.wire_index_bits, nc = p.codebook_size;
  const uint32_t dr = p.rotation_dim();  // the inverse rotation's output is cut back to d
  const float* cw = codebook_.codewords().data();
  const Isa isa = codec_internal::ActiveIsa();
  Scratch& s = ThreadScratch();
  const size_t tile = TileFor(path, dr);
  Grow(s.y, tile * dr);
  Grow(s.z, tile * dr);
  Grow(s.idx, tile * blocks);
  Grow(s.nu, tile);
  if (path == CodecPath::kReference) {
    Grow(s.ud, dr);
    Grow(s.yd, dr);
  }

  for (size_t t0 = 0; t0 < n; t0 += tile) {
    const size_t tn = std::min(tile, n - t0);
    // Validate and unpack the whole tile first: a corrupt code fails the call before any output.
    for (size_t v = 0; v < tn; ++v) {
      const uint8_t* code = codes.data() + (t0 + v) * code_bytes_;
      const uint16_t h = static_cast<uint16_t>(code[0] | (code[1] << 8));
      const float nu = HalfToFloat(h);
      if (!std::isfinite(nu) || !(nu > 0)) {
        return absl::DataLossError(absl::StrFormat(
            "code %d: norm field 0x%04x decodes to %g, expected finite and > 0", t0 + v, h,
            static_cast<double>(nu)));
      }
      s.nu[v] = nu;
      uint32_t* idx = s.idx.data() + v * blocks;
      if (!UnpackRaw(code + 2, blocks, w, idx)) {
        return absl::DataLossError(
            absl::StrFormat("code %d: index field has a non-zero padding bit", t0 + v));
      }
      for (uint32_t j = 0; j < blocks && nc < (uint64_t{1} << w); ++j) {  // else w bits < N
        if (idx[j] >= nc) {
          return absl::DataLossError(absl::StrFormat(
              "code %d: index field: block %d index %d >= codebook size %d", t0 + v, j, idx[j], nc));
        }
      }
    }
    uint8_t* dst = out.data() + t0 * d * es;
    if (path == CodecPath::kReference) {
      for (size_t v = 0; v < tn; ++v) {
        const uint32_t* idx = s.idx.data() + v * blocks;
        for (uint32_t j = 0; j < blocks; ++j) {
          const float* c = cw + static_cast<size_t>(idx[j]) * k;
          for (uint32_t c2 = 0; c2 < k; ++c2) s.yd[j * k + c2] = static_cast<double>(c[c2]);
        }
        rotation_.ApplyInverse(s.yd.data(), s.ud.data());
        const double nu = static_cast<double>(s.nu[v]);
        float* z = s.z.data() + v * d;
        for (uint32_t i = 0; i < d; ++i) z[i] = static_cast<float>(nu * s.ud[i]);
      }
      FromF32(dtype, s.z.data(), tn * d, dst, Isa::kScalar);
    } else {
      switch (k) {  // a constant k lets the compiler turn each block into one vector multiply
        case 1: GatherScaled<1>(cw, s.idx.data(), s.nu.data(), tn, blocks, k, s.y.data()); break;
        case 2: GatherScaled<2>(cw, s.idx.data(), s.nu.data(), tn, blocks, k, s.y.data()); break;
        case 4: GatherScaled<4>(cw, s.idx.data(), s.nu.data(), tn, blocks, k, s.y.data()); break;
        case 8: GatherScaled<8>(cw, s.idx.data(), s.nu.data(), tn, blocks, k, s.y.data()); break;
        default: GatherScaled<0>(cw, s.idx.data(), s.nu.data(), tn, blocks, k, s.y.data()); break;
      }
      rotation_.ApplyInverseBatch(s.y.data(), s.z.data(), tn);
      if (dr != d) {  // rows move down in place (row v starts at v*dr >= v*d)
        for (size_t v = 1; v < tn; ++v) {
          std::memmove(s.z.data() + v * d, s.z.data() + v * dr, d * sizeof(float));
        }
      }
      FromF32(dtype, s.z.data(), tn * d, dst, isa);
    }
  }
  return absl::OkStatus();
}

bool Quantizer::uses_pruned_search() const {
  return search_->table.prune() || search_->table.clustered();
}

absl::Status Quantizer::DecodeF32(absl::Span<const uint8_t> codes, size_t n, float* out,
                                  CodecPath path) const {
  FQ_ASSIGN_OR_RETURN(const size_t elems, CheckedMul(n, dim(), "decode output"));
  FQ_ASSIGN_OR_RETURN(const size_t bytes, CheckedMul(elems, 4, "decode output"));
  if (out == nullptr && bytes != 0) return absl::InvalidArgumentError("decode output: null pointer");
  return Decode(codes, n, DType::kF32,
                absl::Span<uint8_t>(reinterpret_cast<uint8_t*>(out), bytes), path);
}

}  // namespace fibquant
