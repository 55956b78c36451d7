// Reader tests for the `fibquant` CLI (client/cli/tensor_io.h, kv_pages.h): .npy v1/v2/v3 and
// .safetensors written by the tests, raw files, and hostile headers (malformed, truncated, offsets
// past the end, huge declared shapes) with the exact status code each must give. The "huge"
// cases run with a data limit far above the file size: they must fail on the file-size check,
// before any allocation proportional to the declared size.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "client/cli/kv_pages.h"
#include "client/cli/tensor_io.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace fibquant::cli {
namespace {

using ::testing::HasSubstr;

class TensorIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("fq-cli-io-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Write(const std::string& name, const std::string& bytes) {
    const auto p = (dir_ / name).string();
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
  std::filesystem::path dir_;
};

Tensor F32Tensor(std::vector<uint64_t> shape) {
  Tensor t;
  t.dtype = DType::kF32;
  t.shape = std::move(shape);
  std::vector<float> v(t.element_count());
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.5f - 3.0f;
  t.data.assign(reinterpret_cast<const char*>(v.data()), v.size() * 4);
  return t;
}

std::string Le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

std::string Safetensors(const std::string& json, const std::string& data) { return Le64(json.size()) + json + data; }

TEST_F(TensorIoTest, NpyRoundTripF32AndVersions) {
  Tensor t = F32Tensor({4, 2, 8});
  auto back = ReadNpy(Write("a.npy", EncodeNpy(t)), false);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->dtype, DType::kF32);
  EXPECT_EQ(back->shape, t.shape);
  EXPECT_EQ(back->data, t.data);
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2, 8), }";
  for (int v : {2, 3}) {
    auto r = ReadNpy(Write("v" + std::to_string(v) + ".npy", EncodeNpyWithHeader(dict, t.data, v)), false);
    ASSERT_TRUE(r.ok()) << "version " << v << ": " << r.status();
    EXPECT_EQ(r->data, t.data);
  }
}

TEST_F(TensorIoTest, NpyF16AndBf16Flag) {
  const std::string payload(2 * 3 * 4, '\x01');
  auto f16 = ParseNpy(EncodeNpyWithHeader("{'descr': '<f2', 'fortran_order': False, 'shape': (3, 4), }", payload),
                      "f16.npy", false);
  ASSERT_TRUE(f16.ok()) << f16.status();
  EXPECT_EQ(f16->dtype, DType::kF16);
  for (const char* descr : {"<u2", "|V2"}) {
    const std::string file = EncodeNpyWithHeader(
        std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (3, 4), }", payload);
    auto refused = ParseNpy(file, "bf16.npy", false);
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << descr;
    EXPECT_THAT(refused.status().message(), HasSubstr("--npy-bf16"));
    auto bf16 = ParseNpy(file, "bf16.npy", true);
    ASSERT_TRUE(bf16.ok()) << bf16.status();
    EXPECT_EQ(bf16->dtype, DType::kBF16);
  }
}

TEST_F(TensorIoTest, NpyMalformedHeaders) {
  const std::string data(16, '\0');
  struct Case {
    std::string dict;
    std::string what;
  };
  for (const Case& c : std::vector<Case>{
           {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), ", "expected"},
           {"{'descr': '<f4', 'fortran_order': False}", "missing 'shape'"},
           {"{'descr': '<f8', 'fortran_order': False, 'shape': (2, 1), }", "unsupported dtype"},
           {"{'descr': '>f4', 'fortran_order': False, 'shape': (2, 2), }", "big-endian"},
           {"{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", "fortran_order"},
           {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }", "non-integer"},
           {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999, 1), }", "64 bits"},
           {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), 'extra': 1, }", "unsupported value"},
       }) {
    auto r = ParseNpy(EncodeNpyWithHeader(c.dict, data), "m.npy", false);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.dict << " " << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr(c.what)) << c.dict;
    EXPECT_THAT(r.status().message(), HasSubstr("m.npy"));
  }
  EXPECT_EQ(ParseNpy("NOTNUMPY-at-all", "x.npy", false).status().code(), absl::StatusCode::kInvalidArgument);
  std::string v9 = EncodeNpyWithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", data);
  v9[6] = 9;
  EXPECT_EQ(ParseNpy(v9, "v9.npy", false).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(TensorIoTest, NpyTruncatedAndTrailing) {
  Tensor t = F32Tensor({4, 8});
  std::string file = EncodeNpy(t);
  auto cut = ParseNpy(file.substr(0, file.size() - 1), "cut.npy", false);
  EXPECT_EQ(cut.status().code(), absl::StatusCode::kDataLoss) << cut.status();
  EXPECT_THAT(cut.status().message(), HasSubstr("truncated"));
  // Header length pointing past the end of the file.
  auto cut_header = ParseNpy(file.substr(0, 40), "cuth.npy", false);
  EXPECT_EQ(cut_header.status().code(), absl::StatusCode::kDataLoss) << cut_header.status();
  EXPECT_EQ(ParseNpy(file.substr(0, 8), "pre.npy", false).status().code(), absl::StatusCode::kDataLoss);
  auto extra = ParseNpy(file + "xx", "extra.npy", false);
  EXPECT_EQ(extra.status().code(), absl::StatusCode::kInvalidArgument) << extra.status();
}

TEST_F(TensorIoTest, NpyHugeDeclaredShapeFailsBeforeAllocating) {
  TensorLimits generous;
  generous.max_data_bytes = ~uint64_t{0};  // only the file size can stop it
  // 2^40 x 2^20 f32 elements declared, 16 bytes present.
  auto huge = ParseNpy(
      EncodeNpyWithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1048576), }",
                          std::string(16, '\0')),
      "huge.npy", false, generous);
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kDataLoss) << huge.status();
  // A shape whose byte count overflows 64 bits.
  auto overflow = ParseNpy(
      EncodeNpyWithHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", ""),
      "ovf.npy", false, generous);
  EXPECT_EQ(overflow.status().code(), absl::StatusCode::kInvalidArgument) << overflow.status();
  EXPECT_THAT(overflow.status().message(), HasSubstr("overflows"));
  // A real file above the configured limit.
  TensorLimits small;
  small.max_data_bytes = 64;
  auto limited = ParseNpy(EncodeNpy(F32Tensor({4, 8})), "big.npy", false, small);
  EXPECT_EQ(limited.status().code(), absl::StatusCode::kResourceExhausted) << limited.status();
  // A header length above the header limit (the file really is that long).
  small.max_header_bytes = 32;
  auto big_header = ParseNpy(EncodeNpy(F32Tensor({2, 2})), "bh.npy", false, small);
  EXPECT_EQ(big_header.status().code(), absl::StatusCode::kResourceExhausted) << big_header.status();
}

TEST_F(TensorIoTest, SafetensorsPickByName) {
  Tensor k = F32Tensor({4, 2, 8});
  Tensor v = F32Tensor({3, 8});
  const std::string path = Write("kv.safetensors", EncodeSafetensors({{"keys", &k}, {"values", &v}}));
  auto rk = ReadSafetensors(path, "keys");
  ASSERT_TRUE(rk.ok()) << rk.status();
  EXPECT_EQ(rk->shape, k.shape);
  EXPECT_EQ(rk->data, k.data);
  auto rv = ReadSafetensors(path, "values");
  ASSERT_TRUE(rv.ok()) << rv.status();
  EXPECT_EQ(rv->data, v.data);
  auto ambiguous = ReadSafetensors(path, "");
  EXPECT_EQ(ambiguous.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ambiguous.status().message(), HasSubstr("--tensor"));
  EXPECT_EQ(ReadSafetensors(path, "nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ReadSafetensors((dir_ / "missing.safetensors").string(), "").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(TensorIoTest, SafetensorsHostileHeaders) {
  const std::string data(64, '\0');  // 16 f32
  struct Case {
    std::string json;
    absl::StatusCode code;
    std::string what;
  };
  for (const Case& c : std::vector<Case>{
           {R"({"t":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}})", absl::StatusCode::kOk, ""},
           {R"({"t":{"dtype":"F32","shape":[4,4],"data_offsets":[0,65]}})", absl::StatusCode::kDataLoss, "past the end"},
           {R"({"t":{"dtype":"F32","shape":[4,4],"data_offsets":[8,72]}})", absl::StatusCode::kDataLoss, "past the end"},
           {R"({"t":{"dtype":"F32","shape":[4,4],"data_offsets":[0,60]}})", absl::StatusCode::kInvalidArgument, "needs 64"},
           {R"({"t":{"dtype":"F32","shape":[4,4],"data_offsets":[64,0]}})", absl::StatusCode::kInvalidArgument, "begin"},
           {R"({"t":{"dtype":"I32","shape":[4,4],"data_offsets":[0,64]}})", absl::StatusCode::kInvalidArgument, "unsupported dtype"},
           {R"({"t":{"dtype":"F32","shape":[4,-4],"data_offsets":[0,64]}})", absl::StatusCode::kInvalidArgument, "non-negative"},
           {R"({"t":{"dtype":"F32","shape":[4,4]}})", absl::StatusCode::kInvalidArgument, "data_offsets"},
           {R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,64]}})",
            absl::StatusCode::kInvalidArgument, "overflows"},
           {R"({"t":{"dtype":"F32","shape":[1099511627776,1024],"data_offsets":[0,4503599627370496]}})",
            absl::StatusCode::kDataLoss, "past the end"},
           {R"([1,2,3])", absl::StatusCode::kInvalidArgument, "JSON object"},
           {R"({"t":)", absl::StatusCode::kInvalidArgument, "JSON object"},
       }) {
    TensorLimits generous;
    generous.max_data_bytes = ~uint64_t{0};
    auto r = ReadSafetensors(Write("h.safetensors", Safetensors(c.json, data)), "", generous);
    EXPECT_EQ(r.status().code(), c.code) << c.json << " -> " << r.status();
    if (!c.what.empty()) {
      EXPECT_THAT(r.status().message(), HasSubstr(c.what)) << c.json;
    }
  }
  // Header length past the end of the file, and above the header limit.
  auto lie = ReadSafetensors(Write("lie.safetensors", Le64(1ull << 62) + "{}"), "");
  EXPECT_EQ(lie.status().code(), absl::StatusCode::kDataLoss) << lie.status();
  EXPECT_EQ(ReadSafetensors(Write("short.safetensors", "abc"), "").status().code(), absl::StatusCode::kDataLoss);
  TensorLimits small;
  small.max_header_bytes = 8;
  auto big = ReadSafetensors(
      Write("big.safetensors", Safetensors(R"({"t":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}})", data)),
      "", small);
  EXPECT_EQ(big.status().code(), absl::StatusCode::kResourceExhausted) << big.status();
}

TEST_F(TensorIoTest, RawFiles) {
  Tensor t = F32Tensor({64, 4, 2});
  const std::string path = Write("x.f32", t.data);
  auto ok = ReadRaw(path, DType::kF32, {64, 4, 2});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->data, t.data);
  EXPECT_EQ(ReadRaw(path, DType::kF32, {64, 4, 4}).status().code(), absl::StatusCode::kDataLoss);
  // Raw files have no header: the message names the flags that declared the size.
  EXPECT_EQ(ReadRaw(path, DType::kF32, {64, 4, 4}).status().message(),
            path + ": truncated: --shape [64, 4, 4] of f32 needs 4096 data bytes but the file has 2048");
  EXPECT_EQ(ReadRaw(path, DType::kF32, {64, 4, 1}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadRaw(path, DType::kF32, {1ull << 40, 1ull << 40}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseShapeFlag("64,0").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseShapeFlag("64,x").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseShapeFlag("64,4,128"), (std::vector<uint64_t>{64, 4, 128}));
}

TEST_F(TensorIoTest, RealFixtureThroughNpyAndSafetensors) {
  const std::string fixture = std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32";
  auto raw = ReadRaw(fixture, DType::kF32, {64, 4, 128});
  ASSERT_TRUE(raw.ok()) << raw.status();
  auto npy = ReadNpy(Write("k.npy", EncodeNpy(*raw)), false);
  ASSERT_TRUE(npy.ok()) << npy.status();
  EXPECT_EQ(npy->data, raw->data);
  auto st = ReadSafetensors(Write("k.safetensors", EncodeSafetensors({{"k", &*raw}})), "k");
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->data, raw->data);
}

TEST(KvPagesTest, LayoutsAndPageGridRoundTrip) {
  EXPECT_EQ(LayoutOf({5}, "x").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LayoutOf({1, 2, 3, 4, 5}, "x").status().code(), absl::StatusCode::kInvalidArgument);
  KvTensorShape shape;
  shape.layers = 2;
  shape.kv_heads = 4;
  shape.tokens = 64;
  shape.head_dim = 8;
  for (std::vector<uint64_t> dims : std::vector<std::vector<uint64_t>>{{40, 8}, {40, 3, 8}, {2, 4, 40, 8}}) {
    Tensor t = F32Tensor(dims);
    auto l = LayoutOf(t.shape, "t");
    ASSERT_TRUE(l.ok());
    // 40 tokens: neither 64 nor a multiple of 16.
    EXPECT_EQ(CheckLayoutFitsProfile(*l, shape, 16, "t").code(), absl::StatusCode::kInvalidArgument);
    ASSERT_TRUE(CheckLayoutFitsProfile(*l, shape, 8, "t").ok());
    auto plan = PlanPages(*l, 16);  // 16, 16, 8 per sequence: the last page is short
    TensorAssembler as(*l, t.shape, 16, DType::kF32);
    for (const auto& c : plan) ASSERT_TRUE(as.Add(c, GatherPage(t, *l, c, DType::kF32)).ok());
    auto back = as.Finish();
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->data, t.data);
    TensorAssembler dup(*l, t.shape, 16, DType::kF32);
    ASSERT_TRUE(dup.Add(plan[0], GatherPage(t, *l, plan[0], DType::kF32)).ok());
    EXPECT_EQ(dup.Add(plan[0], GatherPage(t, *l, plan[0], DType::kF32)).code(), absl::StatusCode::kDataLoss);
    EXPECT_EQ(dup.Finish().status().code(), absl::StatusCode::kDataLoss);
    KvPageCoords off = plan[0];
    off.token_start = 3;
    EXPECT_EQ(dup.Add(off, GatherPage(t, *l, plan[0], DType::kF32)).code(), absl::StatusCode::kDataLoss);
  }
  Tensor t = F32Tensor({16, 9});
  auto l = LayoutOf(t.shape, "t");
  EXPECT_EQ(CheckLayoutFitsProfile(*l, shape, 16, "t").code(), absl::StatusCode::kInvalidArgument);
}

// Shapes near the 32-bit token limit: the page count is arithmetic, and planning does not wrap.
TEST(KvPagesTest, PageCountAndPlanNearTheTokenLimit) {
  auto huge = LayoutOf({4294967295ull, 1}, "t");
  ASSERT_TRUE(huge.ok());
  EXPECT_EQ(PageCount(*huge, 4096), 1048576u);
  EXPECT_EQ(PageCount(*huge, 0), 0u);
  auto many = LayoutOf({4294967295ull, 4294967295ull, 4294967295ull, 1}, "t");
  ASSERT_TRUE(many.ok());
  EXPECT_EQ(PageCount(*many, 1), UINT64_MAX);  // saturates instead of wrapping
  // Two pages: t = 0 and t = 2^31; the next step (2^32) would wrap a 32-bit counter to 0.
  const auto plan = PlanPages(*huge, 1u << 31);
  ASSERT_EQ(plan.size(), 2u);
  EXPECT_EQ(plan[1].token_start, 1u << 31);
  EXPECT_EQ(plan[1].token_count, (1u << 31) - 1);
  EXPECT_TRUE(PlanPages(*huge, 0).empty());
}

// Random corruption of real .npy and .safetensors files: never a crash, only documented codes.
TEST_F(TensorIoTest, RandomCorruptionGivesDocumentedCodes) {
  Tensor t = F32Tensor({16, 2, 8});
  const std::string npy = EncodeNpy(t);
  const std::string st = EncodeSafetensors({{"t", &t}});
  std::mt19937_64 rng(7);
  auto allowed = [](absl::StatusCode c) {
    return c == absl::StatusCode::kOk || c == absl::StatusCode::kInvalidArgument ||
           c == absl::StatusCode::kDataLoss || c == absl::StatusCode::kResourceExhausted ||
           c == absl::StatusCode::kNotFound;
  };
  for (int trial = 0; trial < 1500; ++trial) {
    std::string a = npy, b = st;
    // Mostly the headers: that is where the parsing happens.
    for (int e = 0; e < 3; ++e) {
      a[rng() % std::min<size_t>(a.size(), 140)] = static_cast<char>(rng());
      b[rng() % std::min<size_t>(b.size(), 120)] = static_cast<char>(rng());
    }
    if (trial % 5 == 0) a.resize(rng() % a.size());
    if (trial % 5 == 1) b.resize(rng() % b.size());
    auto ra = ParseNpy(a, "r.npy", trial % 2 == 0);
    EXPECT_TRUE(allowed(ra.status().code())) << ra.status();
    if (trial % 10 == 0) {  // the safetensors reader works on files
      auto rb = ReadSafetensors(Write("r.safetensors", b), "");
      EXPECT_TRUE(allowed(rb.status().code())) << rb.status();
    }
  }
}

}  // namespace
}  // namespace fibquant::cli
