// End-to-end tests of the `fibquant` binary against a real fibquant-server started on 127.0.0.1
// with a free port (tests/cli/cli_test_util.h). Inputs are real K vectors (tests/data/L1_k.f32,
// [64 tokens, 4 heads, 128] f32) written by the test as .npy and .safetensors. Each CLI run is a
// child process bounded by timeout(1); the test checks exit codes, stdout JSON, the stored
// container and receipt, and the decoded tensor against the input.
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cli/container.h"
#include "client/cli/tensor_io.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/cli/cli_test_util.h"

namespace fibquant::cli {
namespace {

using ::fibquant::cli::testing::CliServer;
using ::fibquant::cli::testing::ReadWholeFile;
using ::fibquant::cli::testing::RunCliBinary;
using ::fibquant::cli::testing::RunResult;
using ::fibquant::cli::testing::ServerProcess;
using ::fibquant::cli::testing::TempDir;
using ::fibquant::cli::testing::WriteWholeFile;
using ::testing::HasSubstr;

constexpr char kSpec[] = R"({"profile_id": "cli-e2e-l1-keys",
 "shape": {"role": "key", "attention_kind": "mha", "batch": 1, "layers": 1, "kv_heads": 4,
   "query_heads": 4, "tokens": 64, "head_dim": 128, "dtype": "f32", "rope_state": "pre_rope"},
 "axis_policy": "per_token", "tokens_per_page": 16,
 "fibquant": {"block_dim": 2, "codebook_size": 256, "seed": 7},
 "protected": {"first_tokens_raw": 2},
 "fallback": {"mode": "keep_raw"}})";

class CliE2eTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    cli_ = new CliServer();
    auto failed = cli_->Start();
    ASSERT_FALSE(failed.has_value()) << *failed;
    WriteWholeFile(Path("spec.json"), kSpec);
    RunResult reg = Run({"profile", "register", Path("spec.json")});
    ASSERT_EQ(reg.code, 0) << reg.err;
    digest_ = nlohmann::json::parse(reg.out).at("digest").get<std::string>();
    auto k = ReadRaw(std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32", DType::kF32, {64, 4, 128});
    ASSERT_TRUE(k.ok()) << k.status();
    keys_ = new Tensor(std::move(*k));
  }
  static void TearDownTestSuite() {
    delete keys_;
    delete cli_;
  }

  static std::string Path(const std::string& name) { return cli_->Path(name); }

  // Runs the CLI with --server appended (unless `with_server` is false); bounded by timeout(1).
  static RunResult Run(std::vector<std::string> args, bool with_server = true) {
    return cli_->Run(std::move(args), with_server);
  }

  // Relative squared error sum((a-b)^2)/sum(a^2) of two f32 buffers.
  static double RelErr(const std::string& a, const std::string& b) {
    EXPECT_EQ(a.size(), b.size());
    const auto* x = reinterpret_cast<const float*>(a.data());
    const auto* y = reinterpret_cast<const float*>(b.data());
    double num = 0, den = 0;
    for (size_t i = 0; i < std::min(a.size(), b.size()) / 4; ++i) {
      num += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
      den += double(x[i]) * x[i];
    }
    return num / den;
  }

  static CliServer* cli_;
  static std::string digest_;
  static Tensor* keys_;
};

CliServer* CliE2eTest::cli_ = nullptr;
std::string CliE2eTest::digest_;
Tensor* CliE2eTest::keys_ = nullptr;

TEST_F(CliE2eTest, NpyRoundTripStoresAndPrintsTheReceipt) {
  WriteWholeFile(Path("k.npy"), EncodeNpy(*keys_));
  RunResult c = Run({"compress", "--profile", digest_, "--in", Path("k.npy"), "--out", Path("k.fqc"),
                     "--label", "e2e"});
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_THAT(c.err, HasSubstr("compressed 16 pages"));
  EXPECT_EQ(c.err.find('\r'), std::string::npos) << "progress bar drawn on a non-terminal stderr";
  nlohmann::json receipt = nlohmann::json::parse(c.out);
  EXPECT_EQ(receipt.at("operation"), "compress");
  EXPECT_EQ(receipt.at("pages"), "16");  // proto3 JSON: 64-bit integers are strings
  EXPECT_EQ(receipt.at("profileDigest"), digest_);
  EXPECT_EQ(receipt.at("label"), "e2e");
  const std::string id = receipt.at("receiptId").get<std::string>();

  // The container holds 16 frames and the same receipt.
  auto container = DecodeContainer(ReadWholeFile(Path("k.fqc")));
  ASSERT_TRUE(container.ok()) << container.status();
  EXPECT_EQ(container->frames.size(), 16u);
  EXPECT_EQ(nlohmann::json::parse(container->receipt_json).at("receiptDigest"), receipt.at("receiptDigest"));
  auto meta = nlohmann::json::parse(container->metadata_json);
  EXPECT_EQ(meta.at("source").at("shape"), nlohmann::json({64, 4, 128}));

  // The server stored it too.
  RunResult r = Run({"receipt", id});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out).at("receiptDigest"), receipt.at("receiptDigest"));

  RunResult d = Run({"decompress", "--in", Path("k.fqc"), "--out", Path("k.out.npy")});
  ASSERT_EQ(d.code, 0) << d.err;
  EXPECT_EQ(nlohmann::json::parse(d.out).at("compress_receipt").at("receiptId"), id);
  auto back = ReadNpy(Path("k.out.npy"), false);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->dtype, DType::kF32);
  EXPECT_EQ(back->shape, keys_->shape);
  // 4 wire bits per coordinate on real keys: ~1% relative error (measured 0.0097); 5% is the bound.
  const double rel = RelErr(keys_->data, back->data);
  EXPECT_LT(rel, 0.05);
  EXPECT_GT(rel, 0.0);
  // The protected first 2 tokens of every head come back bit-exact.
  // [tokens, heads, head_dim]: tokens 0 and 1 of all 4 heads are the first 2*4*128 floats.
  const size_t protected_bytes = 2 * 4 * 128 * sizeof(float);
  EXPECT_EQ(back->data.substr(0, protected_bytes), keys_->data.substr(0, protected_bytes));
  EXPECT_NE(back->data.substr(protected_bytes, 4096), keys_->data.substr(protected_bytes, 4096));
}

TEST_F(CliE2eTest, SafetensorsRoundTripToRawBf16) {
  Tensor other;
  other.dtype = DType::kF32;
  other.shape = {2, 2};
  other.data.assign(16, '\0');
  WriteWholeFile(Path("kv.safetensors"), EncodeSafetensors({{"other", &other}, {"keys", keys_}}));
  RunResult ambiguous = Run({"compress", "--profile", digest_, "--in", Path("kv.safetensors"), "--out", Path("x.fqc")});
  EXPECT_EQ(ambiguous.code, 1);
  EXPECT_THAT(ambiguous.err, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(ambiguous.err, HasSubstr("--tensor"));
  RunResult c = Run({"compress", "--profile", digest_, "--in", Path("kv.safetensors"), "--tensor", "keys",
                     "--out", Path("st.fqc"), "--quiet"});
  ASSERT_EQ(c.code, 0) << c.err;
  RunResult d = Run({"decompress", "--in", Path("st.fqc"), "--out", Path("st.bf16"), "--dtype", "bf16",
                     "--format", "raw"});
  ASSERT_EQ(d.code, 0) << d.err;
  auto back = ReadRaw(Path("st.bf16"), DType::kBF16, {64, 4, 128});
  ASSERT_TRUE(back.ok()) << back.status();
  std::string as_f32(back->element_count() * 4, '\0');
  ToFloat(DType::kBF16, reinterpret_cast<const uint8_t*>(back->data.data()), back->element_count(),
          reinterpret_cast<float*>(as_f32.data()));
  EXPECT_LT(RelErr(keys_->data, as_f32), 0.05);
}

TEST_F(CliE2eTest, BenchTwoStreamsEightPagesHasNoErrors) {
  RunResult b = Run({"bench", "--streams", "2", "--pages", "8", "--max-seconds", "120"});
  ASSERT_EQ(b.code, 0) << b.err;
  nlohmann::json j = nlohmann::json::parse(b.out);
  EXPECT_EQ(j.at("errors"), 0);
  EXPECT_EQ(j.at("round_trip").at("checked_pages"), 16);
  // The codebook re-verified locally from GetCodebook, and every server decode equal to it.
  EXPECT_EQ(j.at("round_trip").at("local_decode"), "codebook digest verified");
  EXPECT_EQ(j.at("round_trip").at("local_decode_identical_pages"), 16);
  EXPECT_EQ(j.at("compress").at("pages"), 16);
  EXPECT_EQ(j.at("decompress").at("pages"), 16);
  EXPECT_GT(j.at("compress").at("pages_per_second").get<double>(), 0.0);
  EXPECT_GT(j.at("compress").at("latency_ms").at("p50").get<double>(), 0.0);
  EXPECT_LE(j.at("compress").at("latency_ms").at("p50").get<double>(),
            j.at("compress").at("latency_ms").at("p99").get<double>());
  // Against the registered profile too (its dtype, page size and grid).
  RunResult p = Run({"bench", "--streams", "2", "--pages", "8", "--profile", digest_});
  ASSERT_EQ(p.code, 0) << p.err;
  EXPECT_EQ(nlohmann::json::parse(p.out).at("errors"), 0);
}

TEST_F(CliE2eTest, BenchLoadGeneratorModeSamplesChecksAndMeasuresTheTransportCeiling) {
  RunResult b = Run({"bench", "--streams", "2", "--channels", "2", "--pages", "8", "--verify-every", "4",
                     "--transport-ceiling", "--max-seconds", "120"});
  ASSERT_EQ(b.code, 0) << b.err;
  nlohmann::json j = nlohmann::json::parse(b.out);
  EXPECT_EQ(j.at("errors"), 0);
  EXPECT_EQ(j.at("channels"), 2);
  // Pages 0 and 4 of each stream: 4 checked, each equal to the local decode.
  EXPECT_EQ(j.at("round_trip").at("checked_pages"), 4);
  EXPECT_EQ(j.at("round_trip").at("verify_every"), 4);
  EXPECT_EQ(j.at("round_trip").at("local_decode_identical_pages"), 4);
  EXPECT_EQ(j.at("compress").at("pages"), 16);
  EXPECT_EQ(j.at("decompress").at("pages"), 16);
  // The same 16 pages through the raw profile, sampled pages back exactly.
  const auto& c = j.at("transport_ceiling");
  EXPECT_EQ(c.at("errors"), 0);
  EXPECT_EQ(c.at("checked_pages"), 4);
  EXPECT_EQ(c.at("compress").at("pages"), 16);
  EXPECT_EQ(c.at("decompress").at("pages"), 16);
  EXPECT_NE(c.at("profile_digest"), j.at("profile_digest"));
  EXPECT_GT(c.at("frame_bytes").get<uint64_t>(), j.at("frame_bytes").get<uint64_t>());
  EXPECT_GT(j.at("codec_vs_transport").at("compress").get<double>(), 0.0);
  EXPECT_THAT(b.err, HasSubstr("transport ceiling"));
  // More connections than streams, and a zero sampling interval, are usage errors.
  EXPECT_EQ(Run({"bench", "--streams", "2", "--channels", "3"}).code, 2);
  EXPECT_EQ(Run({"bench", "--verify-every", "0"}).code, 2);
}

TEST_F(CliE2eTest, EvalVerdictAndExitCodes) {
  RunResult ok = Run({"eval", "--profile", digest_, "--keys", std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32",
                      "--queries", std::string(FQ_TEST_DATA_DIR) + "/L1_q.f32", "--raw-dtype", "f32", "--shape",
                      "64,4,128", "--head", "1"});
  ASSERT_EQ(ok.code, 0) << ok.err;
  auto reports = nlohmann::json::parse(ok.out).at("reports");
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_EQ(reports[0].at("metrics").at("querySource"), "caller_queries");
  RunResult over = Run({"eval", "--candidate", Path("spec.json"), "--max-attention-tv", "1e-9", "--keys",
                        std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32", "--raw-dtype", "f32", "--shape", "64,4,128"});
  EXPECT_EQ(over.code, 3) << over.err;
  EXPECT_THAT(over.err, HasSubstr("OVER BUDGET"));
}

TEST_F(CliE2eTest, ProfileByIdAndAlreadyRegistered) {
  RunResult again = Run({"profile", "register", Path("spec.json")});
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_THAT(again.err, HasSubstr("already registered: cli-e2e-l1-keys as " + digest_));
  EXPECT_EQ(nlohmann::json::parse(again.out).at("digest"), digest_);
  // --profile and `profile get` take the id as well as the digest.
  RunResult get = Run({"profile", "get", "cli-e2e-l1-keys"});
  ASSERT_EQ(get.code, 0) << get.err;
  EXPECT_EQ(nlohmann::json::parse(get.out).at("digest"), digest_);
  WriteWholeFile(Path("id.npy"), EncodeNpy(*keys_));
  RunResult c = Run({"compress", "--profile", "cli-e2e-l1-keys", "--in", Path("id.npy"), "--out",
                     Path("id.fqc")});
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_EQ(nlohmann::json::parse(c.out).at("profileDigest"), digest_);
  RunResult missing = Run({"compress", "--profile", "no-such-id", "--in", Path("id.npy"), "--out",
                           Path("none.fqc")});
  EXPECT_EQ(missing.code, 1);
  EXPECT_THAT(missing.err, HasSubstr("NOT_FOUND: --profile no-such-id: no registered profile has this id"));
}

TEST_F(CliE2eTest, ProfileInfoAndErrors) {
  RunResult get = Run({"profile", "get", digest_});
  ASSERT_EQ(get.code, 0) << get.err;
  EXPECT_EQ(nlohmann::json::parse(get.out).at("profileId"), "cli-e2e-l1-keys");
  RunResult list = Run({"profile", "list"});
  ASSERT_EQ(list.code, 0) << list.err;
  EXPECT_THAT(list.out, HasSubstr(digest_));
  RunResult info = Run({"info"});
  ASSERT_EQ(info.code, 0) << info.err;
  RunResult health = Run({"health"});
  ASSERT_EQ(health.code, 0) << health.err;
  EXPECT_EQ(nlohmann::json::parse(health.out).at("status"), "SERVING");
  RunResult unknown_service = Run({"health", "no.such.Service"});
  EXPECT_EQ(unknown_service.code, 1);
  EXPECT_THAT(unknown_service.err, HasSubstr("NOT_FOUND"));
  EXPECT_TRUE(nlohmann::json::parse(info.out).contains("limits"));

  // Usage errors: exit 2.
  EXPECT_EQ(Run({"frobnicate"}).code, 2);
  EXPECT_EQ(Run({"info", "--no-such-flag"}).code, 2);
  EXPECT_EQ(Run({"compress", "--in", "x.npy"}).code, 2);
  EXPECT_EQ(Run({"info", "--deadline", "soon"}).code, 2);
  RunResult remote = Run({"bench", "--server", "10.1.2.3:50051"}, /*with_server=*/false);
  EXPECT_EQ(remote.code, 2);
  EXPECT_THAT(remote.err, HasSubstr("loopback"));
  EXPECT_EQ(Run({"info", "--tls-cert", "c.pem"}).code, 2);

  // Failures: exit 1 with the status code and the file or digest named.
  RunResult unknown = Run({"profile", "get", "sha256:" + std::string(64, '0')});
  EXPECT_EQ(unknown.code, 1);
  EXPECT_THAT(unknown.err, HasSubstr("NOT_FOUND"));
  RunResult missing = Run({"compress", "--profile", digest_, "--in", Path("absent.npy"), "--out", Path("a.fqc")});
  EXPECT_EQ(missing.code, 1);
  EXPECT_THAT(missing.err, HasSubstr("absent.npy"));
  WriteWholeFile(Path("k3.npy"), EncodeNpy(*keys_));
  RunResult no_dir = Run({"compress", "--profile", digest_, "--in", Path("k3.npy"), "--out",
                          Path("no-such-dir/k3.fqc")});
  EXPECT_EQ(no_dir.code, 1);
  EXPECT_THAT(no_dir.err, HasSubstr("NOT_FOUND"));
  EXPECT_THAT(no_dir.err, HasSubstr("no-such-dir/k3.fqc"));
  auto l0 = ReadRaw(std::string(FQ_TEST_DATA_DIR) + "/L0_k.f32", DType::kF32, {64, 4, 64});
  ASSERT_TRUE(l0.ok());
  WriteWholeFile(Path("l0.npy"), EncodeNpy(*l0));
  RunResult wrong_dim = Run({"compress", "--profile", digest_, "--in", Path("l0.npy"), "--out", Path("l0.fqc")});
  EXPECT_EQ(wrong_dim.code, 1);
  EXPECT_THAT(wrong_dim.err, HasSubstr("head_dim 64"));

  // A corrupted container is refused before any RPC.
  WriteWholeFile(Path("k2.npy"), EncodeNpy(*keys_));
  ASSERT_EQ(Run({"compress", "--profile", digest_, "--in", Path("k2.npy"), "--out", Path("k2.fqc")}).code, 0);
  std::string bytes = ReadWholeFile(Path("k2.fqc"));
  bytes[bytes.size() / 2] ^= 0x01;
  WriteWholeFile(Path("bad.fqc"), bytes);
  RunResult bad = Run({"decompress", "--in", Path("bad.fqc"), "--out", Path("bad.npy")});
  EXPECT_EQ(bad.code, 1);
  EXPECT_THAT(bad.err, HasSubstr("DATA_LOSS"));
  EXPECT_THAT(bad.err, HasSubstr("checksum"));

  // Hostile metadata in valid containers, refused before any RPC and before planning pages (a shape
  // of 2^32-1 tokens used to wrap the 32-bit token counter of the page plan and loop, allocating
  // without bound): a tensor above the size limit is RESOURCE_EXHAUSTED, a page count that does not
  // match the frames is DATA_LOSS, both computed arithmetically.
  auto hostile = [&](const char* name, const char* shape, int tokens_per_page) {
    Container c;
    c.metadata_json = absl::StrCat(
        R"({"schema":"fq_cli_container_meta_v1","profile_digest":"sha256:0","source":{"file":"k.npy",)",
        R"("dtype":"f32","shape":)", shape, R"(},"page_dtype":"f32","tokens_per_page":)", tokens_per_page,
        R"(,"pages":1})");
    c.frames = {"x"};
    c.receipt_json = "{}";
    auto encoded = EncodeContainer(c);
    EXPECT_TRUE(encoded.ok()) << encoded.status();
    WriteWholeFile(Path(name), encoded.value_or(""));
    return Run({"decompress", "--in", Path(name), "--out", Path("hostile.npy")});
  };
  RunResult wrap = hostile("wrap.fqc", "[4294967295,1]", 4096);
  EXPECT_EQ(wrap.code, 1);
  EXPECT_THAT(wrap.err, HasSubstr("RESOURCE_EXHAUSTED"));
  EXPECT_THAT(wrap.err, HasSubstr("decoded tensor of 4294967295 elements is above the limit"));
  RunResult pages = hostile("pages.fqc", "[2000000,1]", 1);
  EXPECT_EQ(pages.code, 1);
  EXPECT_THAT(pages.err, HasSubstr("DATA_LOSS"));
  EXPECT_THAT(pages.err, HasSubstr("the tensor needs 2000000 pages but the container holds 1 frames"));

  // No server: the deadline bounds the wait, exit 1.
  RunResult down = Run({"info", "--server", "127.0.0.1:1", "--deadline", "2s"}, /*with_server=*/false);
  EXPECT_EQ(down.code, 1);
}

// register_if_missing from the CLI: `compress --spec` against a server that never had the profile.
// The stream header carries the spec, the server builds it (UNAVAILABLE "building ... retry" until
// it is done; the CLI retries), the compress succeeds under the digest the fixture's server gave the
// same spec (computed by the CLI), and the profile is then listed. The container keeps the spec,
// so `decompress` against another fresh server builds it there too. With --no-register-if-missing
// both streams are NOT_FOUND and nothing is registered.
TEST_F(CliE2eTest, SpecStreamsRegisterTheProfileOnAFreshServer) {
  CliServer fresh;
  auto failed = fresh.Start();
  ASSERT_FALSE(failed.has_value()) << *failed;
  WriteWholeFile(fresh.Path("spec.json"), kSpec);
  WriteWholeFile(fresh.Path("k.npy"), EncodeNpy(*keys_));
  auto compress = [&](const std::string& out, std::vector<std::string> extra) {
    std::vector<std::string> args = {"compress", "--spec", fresh.Path("spec.json"), "--in", fresh.Path("k.npy"),
                                     "--out", fresh.Path(out)};
    args.insert(args.end(), extra.begin(), extra.end());
    return fresh.Run(args);
  };
  RunResult off = compress("off.fqc", {"--no-register-if-missing"});
  EXPECT_EQ(off.code, 1) << off.err;
  EXPECT_THAT(off.err, HasSubstr("NOT_FOUND"));
  RunResult none = fresh.Run({"profile", "list"});
  ASSERT_EQ(none.code, 0) << none.err;
  EXPECT_THAT(none.err, HasSubstr("0 profile(s)"));

  RunResult c = compress("k.fqc", {"--label", "fresh"});
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_THAT(c.err, HasSubstr("register_if_missing"));  // the server's "building ... retry shortly"
  EXPECT_EQ(nlohmann::json::parse(c.out).at("profileDigest"), digest_);
  RunResult listed = fresh.Run({"profile", "list"});
  ASSERT_EQ(listed.code, 0) << listed.err;
  EXPECT_THAT(listed.out, HasSubstr(digest_));
  // With --spec, --profile names the digest (no local build); an id is a usage error.
  RunResult given = compress("given.fqc", {"--profile", digest_});
  ASSERT_EQ(given.code, 0) << given.err;
  EXPECT_EQ(compress("id.fqc", {"--profile", "cli-e2e-l1-keys"}).code, 2);

  CliServer other;
  failed = other.Start();
  ASSERT_FALSE(failed.has_value()) << *failed;
  RunResult d_off = other.Run({"decompress", "--in", fresh.Path("k.fqc"), "--out", other.Path("off.npy"),
                               "--no-register-if-missing"});
  EXPECT_EQ(d_off.code, 1) << d_off.err;
  EXPECT_THAT(d_off.err, HasSubstr("NOT_FOUND"));
  RunResult d = other.Run({"decompress", "--in", fresh.Path("k.fqc"), "--out", other.Path("k.out.npy")});
  ASSERT_EQ(d.code, 0) << d.err;
  auto back = ReadNpy(other.Path("k.out.npy"), false);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_LT(RelErr(keys_->data, back->data), 0.05);
  RunResult other_listed = other.Run({"profile", "list"});
  EXPECT_THAT(other_listed.out, HasSubstr(digest_));
}

// The real binary against a server with mTLS and an admin token: the CLI's --tls-* and
// --token-file flags, and the server's refusals surfacing as exit 1 with the status code.
TEST(CliTlsE2eTest, MutualTlsAndAdminToken) {
  TempDir dir;
  const auto certs = dir.path() / "certs";
  const std::string gen = (fibquant::server::testing::SourceRoot() / "scripts" / "gen-test-certs").string();
  if (std::system((gen + " " + certs.string() + " >/dev/null 2>&1").c_str()) != 0) {
    GTEST_SKIP() << "scripts/gen-test-certs failed (openssl missing?)";
  }
  WriteWholeFile(dir.path() / "token", "cli-e2e-token-0123456789abcdef\n");
  WriteWholeFile(dir.path() / "wrong-token", "not-the-token\n");
  WriteWholeFile(dir.path() / "spec.json", kSpec);
  ServerProcess server;
  server.Start({"--listen=127.0.0.1:0", "--metrics-listen=", "--workers=2",
                "--data-dir=" + (dir.path() / "data").string(), "--tls-cert=" + (certs / "server.crt").string(),
                "--tls-key=" + (certs / "server.key").string(), "--tls-client-ca=" + (certs / "ca.crt").string(),
                "--admin-token-file=" + (dir.path() / "token").string()},
               dir.path());
  auto port = server.WaitForPort();
  ASSERT_TRUE(port.has_value()) << server.Log();
  const std::string addr = "--server=127.0.0.1:" + std::to_string(*port);
  const std::string ca = "--tls-ca=" + (certs / "ca.crt").string();
  const std::string cert = "--tls-cert=" + (certs / "client.crt").string();
  const std::string key = "--tls-key=" + (certs / "client.key").string();
  auto run = [&](const std::vector<std::string>& args) { return RunCliBinary(args, dir.path(), 120); };
  RunResult health = run({"health", addr, ca, cert, key});
  ASSERT_EQ(health.code, 0) << health.err;
  EXPECT_THAT(health.out, HasSubstr("\"SERVING\""));
  RunResult info = run({"info", addr, ca, cert, key});
  ASSERT_EQ(info.code, 0) << info.err;
  EXPECT_TRUE(nlohmann::json::parse(info.out).contains("version"));
  // Plaintext against a TLS server, and TLS without the client certificate: exit 1.
  EXPECT_EQ(run({"info", addr, "--deadline=3s"}).code, 1);
  EXPECT_EQ(run({"info", addr, ca, "--deadline=3s"}).code, 1);
  RunResult no_token = run({"profile", "register", (dir.path() / "spec.json").string(), addr, ca, cert, key});
  EXPECT_EQ(no_token.code, 1);
  EXPECT_THAT(no_token.err, HasSubstr("UNAUTHENTICATED"));
  RunResult wrong = run({"profile", "register", (dir.path() / "spec.json").string(), addr, ca, cert, key,
                         "--token-file=" + (dir.path() / "wrong-token").string()});
  EXPECT_EQ(wrong.code, 1);
  EXPECT_THAT(wrong.err, HasSubstr("PERMISSION_DENIED"));
  RunResult ok = run({"profile", "register", (dir.path() / "spec.json").string(), addr, ca, cert, key,
                      "--token-file=" + (dir.path() / "token").string()});
  ASSERT_EQ(ok.code, 0) << ok.err;
  const std::string digest = nlohmann::json::parse(ok.out).at("digest").get<std::string>();
  auto k = ReadRaw(std::string(FQ_TEST_DATA_DIR) + "/L1_k.f32", DType::kF32, {64, 4, 128});
  ASSERT_TRUE(k.ok());
  WriteWholeFile(dir.path() / "k.npy", EncodeNpy(*k));
  RunResult c = run({"compress", "--profile", digest, "--in", (dir.path() / "k.npy").string(), "--out",
                     (dir.path() / "k.fqc").string(), addr, ca, cert, key});
  ASSERT_EQ(c.code, 0) << c.err;
  RunResult d = run({"decompress", "--in", (dir.path() / "k.fqc").string(), "--out",
                     (dir.path() / "k.out.npy").string(), addr, ca, cert, key});
  ASSERT_EQ(d.code, 0) << d.err;
  // A missing TLS file is named.
  RunResult missing = run({"info", addr, "--tls-ca=" + (dir.path() / "nope.pem").string()});
  EXPECT_EQ(missing.code, 1);
  EXPECT_THAT(missing.err, HasSubstr("--tls-ca"));
}

// TLS refusals are explained (gRPC alone says "Socket closed" or "failed to connect"): the CLI
// repeats the handshake with the same files and names what is wrong.
TEST(CliTlsE2eTest, TlsFailuresSayWhatIsWrong) {
  TempDir dir;
  const auto certs = dir.path() / "certs";
  const std::string gen = (fibquant::server::testing::SourceRoot() / "scripts" / "gen-test-certs").string();
  ASSERT_EQ(std::system((gen + " --negative " + certs.string() + " >/dev/null 2>&1").c_str()), 0);
  ServerProcess server;
  server.Start({"--listen=127.0.0.1:0", "--metrics-listen=", "--workers=1",
                "--data-dir=" + (dir.path() / "data").string(), "--tls-cert=" + (certs / "server.crt").string(),
                "--tls-key=" + (certs / "server.key").string(), "--tls-client-ca=" + (certs / "ca.crt").string()},
               dir.path());
  auto port = server.WaitForPort();
  ASSERT_TRUE(port.has_value()) << server.Log();
  const std::string addr = "--server=localhost:" + std::to_string(*port);
  auto file = [&](const std::string& name) { return (certs / name).string(); };
  auto run = [&](const std::vector<std::string>& args) {
    std::vector<std::string> all = {"info", addr, "--deadline=3s"};
    all.insert(all.end(), args.begin(), args.end());
    return RunCliBinary(all, dir.path(), 120);
  };
  RunResult no_cert = run({"--tls-ca=" + file("ca.crt")});
  EXPECT_EQ(no_cert.code, 1);
  EXPECT_THAT(no_cert.err, HasSubstr("UNAVAILABLE: the server requires a client certificate (mTLS) and "
                                     "none was presented: pass --tls-cert and --tls-key"));
  RunResult other = run({"--tls-ca=" + file("ca.crt"), "--tls-cert=" + file("other-client.crt"),
                         "--tls-key=" + file("other-client.key")});
  EXPECT_EQ(other.code, 1);
  EXPECT_THAT(other.err, HasSubstr("the server refused the client certificate --tls-cert: it is issued by "
                                   "CN=fibquant other CA, but the server accepts client certificates "
                                   "only from CN=fibquant test CA"));
  RunResult expired = run({"--tls-ca=" + file("ca.crt"), "--tls-cert=" + file("expired-client.crt"),
                           "--tls-key=" + file("expired-client.key")});
  EXPECT_EQ(expired.code, 1);
  EXPECT_THAT(expired.err, HasSubstr("the server refused the client certificate --tls-cert: it has expired"));
  RunResult wrong_ca = run({"--tls-ca=" + file("other-ca.crt"), "--tls-cert=" + file("client.crt"),
                            "--tls-key=" + file("client.key")});
  EXPECT_EQ(wrong_ca.code, 1);
  EXPECT_THAT(wrong_ca.err, HasSubstr("the server's certificate did not verify against --tls-ca"));
  RunResult wrong_name = run({"--tls-ca=" + file("ca.crt"), "--tls-cert=" + file("client.crt"),
                              "--tls-key=" + file("client.key"), "--tls-server-name=other.example"});
  EXPECT_EQ(wrong_name.code, 1);
  EXPECT_THAT(wrong_name.err, HasSubstr("does not cover the name 'other.example'"));
  // The explanation never hides a working setup.
  RunResult good = run({"--tls-ca=" + file("ca.crt"), "--tls-cert=" + file("client.crt"),
                        "--tls-key=" + file("client.key")});
  EXPECT_EQ(good.code, 0) << good.err;
}

}  // namespace
}  // namespace fibquant::cli
