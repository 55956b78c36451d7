// Implementations of the benchmark codecs (bench/baselines.h).
#include "bench/baselines.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/codebook.h"
#include "core/profile.h"

#ifdef FQ_HAVE_FAISS
#include <omp.h>

#include <faiss/impl/ProductQuantizer.h>
#include <faiss/impl/ScalarQuantizer.h>
#endif

namespace fibquant::bench {
namespace {

// Per-thread f32 scratch for codecs that work in f32.
float* Scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Input as f32: the buffer itself for f32, else converted into scratch.
const float* AsF32(DType dtype, const uint8_t* in, size_t count) {
  if (dtype == DType::kF32) return reinterpret_cast<const float*>(in);
  float* s = Scratch(count);
  ToFloat(dtype, in, count, s);
  return s;
}

class FibCodec final : public VectorCodec {
 public:
  FibCodec(std::shared_ptr<const Quantizer> q, std::string rot) : q_(std::move(q)), rot_(std::move(rot)) {}
  std::string name() const override {
    const Profile& p = q_->profile();
    return (p.block_dim == 1 ? std::string("scalar-lloyd") : std::string("fibquant")) +
           " k=" + std::to_string(p.block_dim) + " N=" + std::to_string(p.codebook_size) + " " + rot_;
  }
  std::string family() const override {
    const Profile& p = q_->profile();
    return p.block_dim == 1 ? "scalar-lloyd k=1" : "fibquant k=" + std::to_string(p.block_dim);
  }
  uint32_t dim() const override { return q_->dim(); }
  size_t code_bytes() const override { return q_->code_bytes(); }
  double index_bits_per_coord() const override { return q_->profile().wire_bits_per_coord; }
  absl::Status Encode(DType dtype, const uint8_t* in, size_t n, uint8_t* codes) const override {
    const size_t in_bytes = n * dim() * DTypeSize(dtype);
    return q_->Encode(dtype, absl::MakeConstSpan(in, in_bytes), n, absl::MakeSpan(codes, n * code_bytes()),
                      CodecPath::kFast);
  }
  absl::Status Decode(const uint8_t* codes, size_t n, DType dtype, uint8_t* out) const override {
    return q_->Decode(absl::MakeConstSpan(codes, n * code_bytes()), n, dtype,
                      absl::MakeSpan(out, n * dim() * DTypeSize(dtype)), CodecPath::kFast);
  }

 private:
  std::shared_ptr<const Quantizer> q_;
  std::string rot_;
};

// ---- per-vector absmax integer quantization -------------------------------------------------
// code: fp16 scale s = absmax / L (L = 127 or 7), then round(x / s) clamped to [-L, L]; int8 as
// signed bytes, int4 as two offset-binary nibbles per byte (low nibble first).

__attribute__((target_clones("avx2", "default")))
void QuantRow(const float* x, uint32_t d, float inv, int levels, int8_t* q) {
  const float lim = static_cast<float>(levels);
  for (uint32_t i = 0; i < d; ++i) {
    float v = std::nearbyint(x[i] * inv);
    v = std::min(lim, std::max(-lim, v));
    q[i] = static_cast<int8_t>(v);
  }
}

__attribute__((target_clones("avx2", "default")))
float AbsMax(const float* x, uint32_t d) {
  float m = 0;
  for (uint32_t i = 0; i < d; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

__attribute__((target_clones("avx2", "default")))
void DequantI8(const int8_t* q, uint32_t d, float s, float* out) {
  for (uint32_t i = 0; i < d; ++i) out[i] = static_cast<float>(q[i]) * s;
}

__attribute__((target_clones("avx2", "default")))
void DequantI4(const uint8_t* q, uint32_t d, float s, float* out) {
  for (uint32_t i = 0; i < d / 2; ++i) {
    out[2 * i] = static_cast<float>(static_cast<int>(q[i] & 15) - 8) * s;
    out[2 * i + 1] = static_cast<float>(static_cast<int>(q[i] >> 4) - 8) * s;
  }
}

class AbsmaxCodec final : public VectorCodec {
 public:
  AbsmaxCodec(uint32_t d, int bits) : d_(d), bits_(bits) {}
  std::string name() const override { return "absmax int" + std::to_string(bits_); }
  std::string family() const override { return name(); }
  uint32_t dim() const override { return d_; }
  size_t code_bytes() const override { return 2 + (bits_ == 8 ? d_ : d_ / 2); }
  double index_bits_per_coord() const override { return bits_; }
  absl::Status Encode(DType dtype, const uint8_t* in, size_t n, uint8_t* codes) const override {
    const float* x = AsF32(dtype, in, n * d_);
    const int levels = bits_ == 8 ? 127 : 7;
    std::vector<int8_t> q(d_);
    for (size_t v = 0; v < n; ++v) {
      const float* row = x + v * d_;
      uint8_t* c = codes + v * code_bytes();
      const uint16_t sh = FloatToHalf(AbsMax(row, d_) / static_cast<float>(levels));
      const float s = HalfToFloat(sh);
      std::memcpy(c, &sh, 2);
      const float inv = s > 0 ? 1.0f / s : 0.0f;
      if (bits_ == 8) {
        QuantRow(row, d_, inv, levels, reinterpret_cast<int8_t*>(c + 2));
      } else {
        QuantRow(row, d_, inv, levels, q.data());
        for (uint32_t i = 0; i < d_ / 2; ++i) {
          c[2 + i] = static_cast<uint8_t>((q[2 * i] + 8) | ((q[2 * i + 1] + 8) << 4));
        }
      }
    }
    return absl::OkStatus();
  }
  absl::Status Decode(const uint8_t* codes, size_t n, DType dtype, uint8_t* out) const override {
    float* y = dtype == DType::kF32 ? reinterpret_cast<float*>(out) : Scratch(n * d_);
    for (size_t v = 0; v < n; ++v) {
      const uint8_t* c = codes + v * code_bytes();
      uint16_t sh;
      std::memcpy(&sh, c, 2);
      const float s = HalfToFloat(sh);
      if (bits_ == 8) {
        DequantI8(reinterpret_cast<const int8_t*>(c + 2), d_, s, y + v * d_);
      } else {
        DequantI4(c + 2, d_, s, y + v * d_);
      }
    }
    if (dtype != DType::kF32) FromFloat(dtype, y, n * d_, out);
    return absl::OkStatus();
  }

 private:
  uint32_t d_;
  int bits_;
};

class Float16Codec final : public VectorCodec {
 public:
  Float16Codec(uint32_t d, DType storage) : d_(d), storage_(storage) {}
  std::string name() const override { return storage_ == DType::kF16 ? "fp16" : "bf16"; }
  std::string family() const override { return name(); }
  uint32_t dim() const override { return d_; }
  size_t code_bytes() const override { return 2 * size_t{d_}; }
  double index_bits_per_coord() const override { return 16; }
  absl::Status Encode(DType dtype, const uint8_t* in, size_t n, uint8_t* codes) const override {
    if (dtype == storage_) {
      std::memcpy(codes, in, n * code_bytes());
      return absl::OkStatus();
    }
    FromFloat(storage_, AsF32(dtype, in, n * d_), n * d_, codes);
    return absl::OkStatus();
  }
  absl::Status Decode(const uint8_t* codes, size_t n, DType dtype, uint8_t* out) const override {
    if (dtype == storage_) {
      std::memcpy(out, codes, n * code_bytes());
      return absl::OkStatus();
    }
    if (dtype == DType::kF32) {
      ToFloat(storage_, codes, n * d_, reinterpret_cast<float*>(out));
      return absl::OkStatus();
    }
    float* s = Scratch(n * d_);
    ToFloat(storage_, codes, n * d_, s);
    FromFloat(dtype, s, n * d_, out);
    return absl::OkStatus();
  }

 private:
  uint32_t d_;
  DType storage_;
};

#ifdef FQ_HAVE_FAISS
class FaissPqCodec final : public VectorCodec {
 public:
  FaissPqCodec(uint32_t d, uint32_t m, uint32_t nbits) : pq_(d, m, nbits), m_(m), nbits_(nbits) {}
  std::string name() const override {
    return "faiss PQ m=" + std::to_string(m_) + " nbits=" + std::to_string(nbits_);
  }
  std::string family() const override { return "faiss PQ dsub=" + std::to_string(pq_.dsub); }
  uint32_t dim() const override { return static_cast<uint32_t>(pq_.d); }
  size_t code_bytes() const override { return pq_.code_size; }
  bool data_calibrated() const override { return true; }
  double index_bits_per_coord() const override { return static_cast<double>(nbits_) / pq_.dsub; }
  absl::Status Train(const float* x, size_t n) override {
    if (n < pq_.ksub) return absl::FailedPreconditionError("fewer training vectors than centroids");
    try {
      pq_.verbose = false;
      pq_.train(n, x);
    } catch (const std::exception& e) {
      return absl::InternalError(e.what());
    }
    return absl::OkStatus();
  }
  absl::Status Encode(DType dtype, const uint8_t* in, size_t n, uint8_t* codes) const override {
    pq_.compute_codes(AsF32(dtype, in, n * dim()), codes, n);
    return absl::OkStatus();
  }
  absl::Status Decode(const uint8_t* codes, size_t n, DType dtype, uint8_t* out) const override {
    float* y = dtype == DType::kF32 ? reinterpret_cast<float*>(out) : Scratch(n * dim());
    pq_.decode(codes, y, n);
    if (dtype != DType::kF32) FromFloat(dtype, y, n * dim(), out);
    return absl::OkStatus();
  }

 private:
  faiss::ProductQuantizer pq_;
  uint32_t m_, nbits_;
};

class FaissSqCodec final : public VectorCodec {
 public:
  FaissSqCodec(uint32_t d, faiss::ScalarQuantizer::QuantizerType t, std::string type, double bits)
      : sq_(d, t), type_(std::move(type)), bits_(bits) {}
  std::string name() const override { return "faiss SQ " + type_; }
  std::string family() const override { return "faiss SQ"; }
  uint32_t dim() const override { return static_cast<uint32_t>(sq_.d); }
  size_t code_bytes() const override { return sq_.code_size; }
  bool data_calibrated() const override { return true; }
  double index_bits_per_coord() const override { return bits_; }
  absl::Status Train(const float* x, size_t n) override {
    try {
      sq_.train(n, x);
    } catch (const std::exception& e) {
      return absl::InternalError(e.what());
    }
    return absl::OkStatus();
  }
  absl::Status Encode(DType dtype, const uint8_t* in, size_t n, uint8_t* codes) const override {
    sq_.compute_codes(AsF32(dtype, in, n * dim()), codes, n);
    return absl::OkStatus();
  }
  absl::Status Decode(const uint8_t* codes, size_t n, DType dtype, uint8_t* out) const override {
    float* y = dtype == DType::kF32 ? reinterpret_cast<float*>(out) : Scratch(n * dim());
    sq_.decode(codes, y, n);
    if (dtype != DType::kF32) FromFloat(dtype, y, n * dim(), out);
    return absl::OkStatus();
  }

 private:
  faiss::ScalarQuantizer sq_;
  std::string type_;
  double bits_;
};
#endif

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return {};
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<VectorCodec>> MakeFibQuant(uint32_t d, uint32_t k, uint32_t n,
                                                          const FibOptions& opt, double* build_seconds) {
  const std::string_view rot = opt.rotation == "hadamard" ? kRotationHadamard : kRotationHaarQr;
  auto profile = Profile::PaperDefault(d, k, n, opt.seed, rot);
  if (!profile.ok()) return profile.status();
  if (opt.training_samples) profile->training_samples = opt.training_samples;
  if (opt.restarts) profile->lloyd_restarts = opt.restarts;
  if (absl::Status st = profile->Validate(); !st.ok()) return st;
  if (build_seconds) *build_seconds = 0;
  std::string path;
  absl::StatusOr<Codebook> cb = absl::NotFoundError("not cached");
  if (!opt.cache_dir.empty()) {
    path = opt.cache_dir + "/cb_d" + std::to_string(d) + "_k" + std::to_string(k) + "_N" + std::to_string(n) +
           "_" + opt.rotation + "_M" + std::to_string(profile->training_samples) + "_R" +
           std::to_string(profile->lloyd_restarts) + "_s" + std::to_string(opt.seed) + ".json";
    const std::string json = ReadFile(path);
    if (!json.empty()) {
      cb = Codebook::FromJson(json);
      if (cb.ok() && !(cb->profile() == *profile)) cb = absl::NotFoundError("stale cache");
    }
  }
  if (!cb.ok()) {
    cb = Codebook::Build(*profile, opt.threads);
    if (!cb.ok()) return cb.status();
    if (build_seconds) *build_seconds = cb->build_stats().seconds;
    if (!path.empty()) {
      std::ofstream f(path, std::ios::binary);
      f << cb->ToJson(0);
    }
  }
  auto q = Quantizer::Create(*std::move(cb));
  if (!q.ok()) return q.status();
  return std::unique_ptr<VectorCodec>(new FibCodec(*q, opt.rotation));
}

std::unique_ptr<VectorCodec> MakeAbsmaxInt(uint32_t d, int bits) {
  return std::make_unique<AbsmaxCodec>(d, bits);
}
std::unique_ptr<VectorCodec> MakeFloat16(uint32_t d, DType storage) {
  return std::make_unique<Float16Codec>(d, storage);
}

#ifdef FQ_HAVE_FAISS
bool HaveFaiss() { return true; }
void SetFaissThreads(int threads) { omp_set_num_threads(threads); }
absl::StatusOr<std::unique_ptr<VectorCodec>> MakeFaissPq(uint32_t d, uint32_t m, uint32_t nbits) {
  if (m == 0 || d % m != 0 || nbits == 0 || nbits > 16) return absl::InvalidArgumentError("bad PQ shape");
  return std::unique_ptr<VectorCodec>(new FaissPqCodec(d, m, nbits));
}
absl::StatusOr<std::unique_ptr<VectorCodec>> MakeFaissSq(uint32_t d, const std::string& type) {
  using QT = faiss::ScalarQuantizer::QuantizerType;
  QT t;
  double bits;
  if (type == "4bit") { t = QT::QT_4bit; bits = 4; }
  else if (type == "6bit") { t = QT::QT_6bit; bits = 6; }
  else if (type == "8bit") { t = QT::QT_8bit; bits = 8; }
  else if (type == "4bit_uniform") { t = QT::QT_4bit_uniform; bits = 4; }
  else if (type == "8bit_uniform") { t = QT::QT_8bit_uniform; bits = 8; }
  else return absl::InvalidArgumentError("unknown SQ type " + type);
  return std::unique_ptr<VectorCodec>(new FaissSqCodec(d, t, type, bits));
}
#else
bool HaveFaiss() { return false; }
void SetFaissThreads(int) {}
absl::StatusOr<std::unique_ptr<VectorCodec>> MakeFaissPq(uint32_t, uint32_t, uint32_t) {
  return absl::UnimplementedError("built without Faiss");
}
absl::StatusOr<std::unique_ptr<VectorCodec>> MakeFaissSq(uint32_t, const std::string&) {
  return absl::UnimplementedError("built without Faiss");
}
#endif

}  // namespace fibquant::bench
