// Unit tests of server/security.h and server/options_flags.h: loopback detection, the plaintext
// rule, credential flag combinations, the admin token check, flag-name normalisation, and the
// TlsReloader's re-checks (good rotation staged and logged, bad rotation kept out and warned).
#include "server/security.h"

#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "server/options_flags.h"
#include "tests/server/ops_test_util.h"

namespace fibquant::server {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;
using Metadata = std::multimap<grpc::string_ref, grpc::string_ref>;

TEST(LoopbackTest, RecognisesLoopbackAddresses) {
  for (const char* addr : {"127.0.0.1:50051", "127.1.2.3:0", "localhost:50051", "LOCALHOST:1",
                           "[::1]:50051", "ipv4:127.0.0.1:5", "ipv6:[::1]:5", "[::ffff:127.0.0.1]:9",
                           "unix:/tmp/fq.sock", "unix-abstract:fq"}) {
    EXPECT_TRUE(IsLoopbackListenAddress(addr)) << addr;
  }
}

TEST(LoopbackTest, RejectsEverythingElse) {
  for (const char* addr : {"0.0.0.0:50051", "[::]:50051", ":50051", "10.0.0.1:50051",
                           "192.168.1.5:1", "example.com:443", "128.0.0.1:1", "[::2]:1",
                           "[::1:1", ""}) {
    EXPECT_FALSE(IsLoopbackListenAddress(addr)) << addr;
  }
}

TEST(PlaintextRuleTest, RefusesPlaintextOffLoopbackUnlessAllowed) {
  absl::Status s = CheckPlaintextAllowed("0.0.0.0:50051", /*tls_enabled=*/false,
                                         /*allow_insecure=*/false);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("--allow-insecure"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("0.0.0.0:50051"));
  EXPECT_TRUE(CheckPlaintextAllowed("0.0.0.0:50051", false, true).ok());
  EXPECT_TRUE(CheckPlaintextAllowed("0.0.0.0:50051", true, false).ok());
  EXPECT_TRUE(CheckPlaintextAllowed("127.0.0.1:50051", false, false).ok());
}

TEST(CredentialsTest, NoTlsFlagsGiveInsecureCredentials) {
  auto creds = MakeServerCredentials(TlsFlags{});
  ASSERT_TRUE(creds.ok()) << creds.status();
  EXPECT_NE(*creds, nullptr);
}

TEST(CredentialsTest, IncompleteCombinationsAreInvalidArgument) {
  auto key_only = MakeServerCredentials(TlsFlags{"", "/k.pem", ""});
  EXPECT_EQ(key_only.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(key_only.status().message()), HasSubstr("--tls-key requires --tls-cert"));
  auto cert_only = MakeServerCredentials(TlsFlags{"/c.pem", "", ""});
  EXPECT_EQ(cert_only.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(cert_only.status().message()), HasSubstr("--tls-cert requires --tls-key"));
  auto ca_only = MakeServerCredentials(TlsFlags{"", "", "/ca.pem"});
  EXPECT_EQ(ca_only.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ca_only.status().message()), HasSubstr("--tls-client-ca"));
}

TEST(CredentialsTest, MissingAndNonPemFilesNameTheFlag) {
  testing::TempDir dir;
  auto missing = MakeServerCredentials(
      TlsFlags{(dir.path() / "nope.crt").string(), (dir.path() / "nope.key").string(), ""});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("--tls-cert"));

  const auto junk = dir.path() / "junk.pem";
  testing::WriteWholeFile(junk, "not a certificate\n");
  auto not_pem = MakeServerCredentials(TlsFlags{junk.string(), junk.string(), ""});
  EXPECT_EQ(not_pem.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(not_pem.status().message()), HasSubstr("--tls-cert"));
}

// Throwaway PKI from scripts/gen-test-certs --negative (server/client certs of a test CA, an
// unrelated CA with its own certs, and already expired certs of the test CA).
class CertificateChecksTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    const std::string gen = (testing::SourceRoot() / "scripts" / "gen-test-certs").string() +
                            " --negative '" + dir_->path().string() + "' >/dev/null";
    ASSERT_EQ(std::system(gen.c_str()), 0);
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }
  static std::string File(const char* name) { return (dir_->path() / name).string(); }
  static testing::TempDir* dir_;
};
testing::TempDir* CertificateChecksTest::dir_ = nullptr;

TEST_F(CertificateChecksTest, ValidPairDescribesTheCertificate) {
  CertificateInfo info;
  auto creds = MakeServerCredentials(TlsFlags{File("server.crt"), File("server.key"), File("ca.crt")},
                                     &info);
  ASSERT_TRUE(creds.ok()) << creds.status();
  EXPECT_EQ(info.subject, "CN=localhost");
  EXPECT_LT(info.not_before, absl::Now() + absl::Minutes(1));
  EXPECT_GT(info.not_after, absl::Now() + absl::Hours(24));
  EXPECT_THAT(info.Describe(), HasSubstr("subject CN=localhost, valid 20"));
}

TEST_F(CertificateChecksTest, ExpiredServerCertificateIsFailedPrecondition) {
  auto creds =
      MakeServerCredentials(TlsFlags{File("expired-server.crt"), File("expired-server.key"), ""});
  EXPECT_EQ(creds.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(creds.status().message()), HasSubstr("--tls-cert"));
  EXPECT_THAT(std::string(creds.status().message()), HasSubstr("expired-server.crt"));
  EXPECT_THAT(std::string(creds.status().message()), HasSubstr("expired at 20"));
}

TEST_F(CertificateChecksTest, NotYetValidServerCertificateIsFailedPrecondition) {
  // The certificate was issued just now; a clock two days behind sees it as not yet valid.
  auto creds = MakeServerCredentials(TlsFlags{File("server.crt"), File("server.key"), ""}, nullptr,
                                     absl::Now() - absl::Hours(48));
  EXPECT_EQ(creds.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(creds.status().message()), HasSubstr("is not valid before"));
  // And one a week ahead sees it expired.
  auto later = MakeServerCredentials(TlsFlags{File("server.crt"), File("server.key"), ""}, nullptr,
                                     absl::Now() + absl::Hours(24 * 7));
  EXPECT_EQ(later.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(later.status().message()), HasSubstr("expired at"));
}

TEST_F(CertificateChecksTest, KeyOfAnotherCertificateIsInvalidArgument) {
  auto creds = MakeServerCredentials(TlsFlags{File("server.crt"), File("client.key"), ""});
  EXPECT_EQ(creds.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(creds.status().message()), HasSubstr("--tls-key"));
  EXPECT_THAT(std::string(creds.status().message()), HasSubstr("is not the private key of --tls-cert"));
}

TEST_F(CertificateChecksTest, PemMarkersAroundGarbageAreInvalidArgument) {
  const std::string bad_cert = File("bad.crt");
  testing::WriteWholeFile(bad_cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
  auto cert = MakeServerCredentials(TlsFlags{bad_cert, File("server.key"), ""});
  EXPECT_EQ(cert.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(cert.status().message()), HasSubstr("--tls-cert"));
  EXPECT_THAT(std::string(cert.status().message()), HasSubstr("no parsable X.509 certificate"));

  const std::string bad_key = File("bad.key");
  testing::WriteWholeFile(bad_key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
  auto key = MakeServerCredentials(TlsFlags{File("server.crt"), bad_key, ""});
  EXPECT_EQ(key.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(key.status().message()), HasSubstr("--tls-key"));
  EXPECT_THAT(std::string(key.status().message()), HasSubstr("no parsable unencrypted private key"));

  auto ca = MakeServerCredentials(TlsFlags{File("server.crt"), File("server.key"), bad_cert});
  EXPECT_EQ(ca.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ca.status().message()), HasSubstr("--tls-client-ca"));
}

TEST_F(CertificateChecksTest, ClientCaBundleNeedsOneValidCertificate) {
  // Only expired certificates: every client would be refused.
  auto expired = MakeServerCredentials(
      TlsFlags{File("server.crt"), File("server.key"), File("expired-client.crt")});
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(expired.status().message()), HasSubstr("--tls-client-ca"));
  EXPECT_THAT(std::string(expired.status().message()), HasSubstr("expired at"));

  // An expired certificate beside a valid CA (a rotation in progress) is accepted.
  const std::string bundle = File("bundle.crt");
  testing::WriteWholeFile(bundle, testing::ReadWholeFile(File("expired-client.crt")) +
                                      testing::ReadWholeFile(File("ca.crt")));
  auto mixed = MakeServerCredentials(TlsFlags{File("server.crt"), File("server.key"), bundle});
  EXPECT_TRUE(mixed.ok()) << mixed.status();
}

// The reloader on files in a private directory, driven by CheckNow (no background thread).
class TlsReloaderTest : public CertificateChecksTest {
 protected:
  void SetUp() override {
    work_ = std::make_unique<testing::TempDir>();
    Put("other-server.crt", "tls.crt");
    Put("other-server.key", "tls.key");
  }
  // Replaces <work>/<to> with a copy of the generated <from>, via a temporary name and rename (as
  // a Secret update does).
  void Put(const char* from, const char* to) {
    const auto tmp = work_->path() / (std::string(to) + ".tmp");
    testing::WriteWholeFile(tmp, testing::ReadWholeFile(File(from)));
    std::filesystem::rename(tmp, work_->path() / to);
  }
  std::string Work(const char* name) const { return (work_->path() / name).string(); }
  absl::StatusOr<std::unique_ptr<TlsReloader>> Make(const std::string& ca = "") {
    return TlsReloader::Create(
        TlsFlags{Work("tls.crt"), Work("tls.key"), ca}, absl::Seconds(1),
        [this](const std::string& line) { log_.push_back(line); },
        [this](absl::Time t) { expiries_.push_back(t); });
  }
  // Log lines containing `what`.
  int Lines(const std::string& what) const {
    int n = 0;
    for (const std::string& line : log_) n += line.find(what) != std::string::npos ? 1 : 0;
    return n;
  }
  std::string Last(const std::string& what) const {
    for (auto it = log_.rbegin(); it != log_.rend(); ++it) {
      if (it->find(what) != std::string::npos) return *it;
    }
    return "";
  }
  std::unique_ptr<testing::TempDir> work_;
  std::vector<std::string> log_;
  std::vector<absl::Time> expiries_;
};

TEST_F(TlsReloaderTest, ValidRotationIsStagedAndLoggedOnce) {
  auto r = Make();
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_NE((*r)->credentials(), nullptr);
  EXPECT_THAT((*r)->served().issuer, HasSubstr("other CA"));
  ASSERT_EQ(expiries_.size(), 1u);
  EXPECT_EQ(expiries_[0], (*r)->served().not_after);

  // Unchanged files: nothing logged.
  EXPECT_TRUE((*r)->CheckNow().ok());
  EXPECT_THAT(log_, ElementsAre());

  Put("server.key", "tls.key");
  Put("server.crt", "tls.crt");
  EXPECT_TRUE((*r)->CheckNow().ok());
  EXPECT_THAT((*r)->served().issuer, HasSubstr("test CA"));
  ASSERT_EQ(Lines("tls certificate reloaded"), 1);
  EXPECT_THAT(Last("tls certificate reloaded"), HasSubstr("tls certificate reloaded: subject CN=localhost, valid 20"));
  EXPECT_THAT(Last("tls certificate reloaded"), HasSubstr("issuer CN=fibquant test CA"));
  EXPECT_EQ(expiries_.size(), 2u);
  // The test certificates live two days: the new one is within the 14-day warning, once.
  EXPECT_EQ(Lines("warning: the tls certificate in use expires in"), 1);
  const size_t lines = log_.size();
  EXPECT_TRUE((*r)->CheckNow().ok());
  EXPECT_EQ(log_.size(), lines);
}

TEST_F(TlsReloaderTest, BadRotationKeepsTheLastGoodCertificateAndWarnsOnce) {
  auto r = Make();
  ASSERT_TRUE(r.ok()) << r.status();
  const CertificateInfo before = (*r)->served();

  Put("expired-server.crt", "tls.crt");
  Put("expired-server.key", "tls.key");
  EXPECT_EQ((*r)->CheckNow().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*r)->CheckNow().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_EQ(log_.size(), 1u);  // the same problem is logged once
  EXPECT_THAT(log_[0], HasSubstr("warning: tls files not reloaded: --tls-cert"));
  EXPECT_THAT(log_[0], HasSubstr("expired at"));
  EXPECT_THAT(log_[0], HasSubstr("keeping the last good certificate in use"));
  EXPECT_THAT(log_[0], HasSubstr("issuer CN=fibquant other CA"));
  EXPECT_EQ((*r)->served().issuer, before.issuer);
  EXPECT_EQ((*r)->served().not_after, before.not_after);

  // A certificate with another certificate's key: also refused, a new warning.
  Put("server.crt", "tls.crt");
  Put("client.key", "tls.key");
  EXPECT_EQ((*r)->CheckNow().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Lines("warning: tls files not reloaded"), 2);
  EXPECT_THAT(Last("not reloaded"), HasSubstr("is not the private key of --tls-cert"));
  EXPECT_EQ((*r)->served().issuer, before.issuer);
  EXPECT_EQ(expiries_.size(), 1u);

  // Fixed: served, logged.
  Put("server.key", "tls.key");
  EXPECT_TRUE((*r)->CheckNow().ok());
  EXPECT_THAT((*r)->served().issuer, HasSubstr("test CA"));
  EXPECT_EQ(Lines("tls certificate reloaded"), 1);
  EXPECT_EQ(expiries_.size(), 2u);
}

TEST_F(TlsReloaderTest, StartupChecksMatchMakeServerCredentials) {
  Put("expired-server.crt", "tls.crt");
  Put("expired-server.key", "tls.key");
  EXPECT_EQ(Make().status().code(), absl::StatusCode::kFailedPrecondition);
  Put("server.crt", "tls.crt");
  Put("client.key", "tls.key");
  EXPECT_EQ(Make().status().code(), absl::StatusCode::kInvalidArgument);
  Put("server.key", "tls.key");
  EXPECT_EQ(Make(File("expired-client.crt")).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Make(File("ca.crt")).ok());
}

TEST_F(TlsReloaderTest, ClientCaRotationIsLoggedWithoutACertificateChange) {
  Put("other-ca.crt", "ca.crt");
  auto r = Make(Work("ca.crt"));
  ASSERT_TRUE(r.ok()) << r.status();
  Put("ca.crt", "ca.crt");
  EXPECT_TRUE((*r)->CheckNow().ok());
  // The startup certificate's expiry warning is main.cc's (given once at startup), not repeated.
  ASSERT_EQ(log_.size(), 1u);
  EXPECT_THAT(log_[0], HasSubstr("tls client ca reloaded from '" + Work("ca.crt") + "'"));
  EXPECT_EQ(expiries_.size(), 2u);
}

TEST(TlsReloaderArgsTest, IntervalBelowOneSecondIsRefused) {
  auto r = TlsReloader::Create(TlsFlags{"/c", "/k", ""}, absl::ZeroDuration(), nullptr, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("--tls-reload-seconds"));
}

TEST(AdminTokenTest, RejectsWeakTokens) {
  EXPECT_EQ(AdminTokenAuth::FromToken("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AdminTokenAuth::FromToken("short").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AdminTokenAuth::FromToken("has a space in it ok").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(AdminTokenAuth::FromToken("0123456789abcdef").ok());
}

TEST(AdminTokenTest, MissingIsUnauthenticatedWrongIsPermissionDenied) {
  auto auth = AdminTokenAuth::FromToken("s3cret-token-0123456789");
  ASSERT_TRUE(auth.ok()) << auth.status();

  Metadata none;
  EXPECT_EQ((*auth)->Authorize(none).code(), absl::StatusCode::kUnauthenticated);

  Metadata basic{{"authorization", "Basic dXNlcjpwYXNz"}};
  EXPECT_EQ((*auth)->Authorize(basic).code(), absl::StatusCode::kUnauthenticated);

  Metadata wrong{{"authorization", "Bearer s3cret-token-0123456780"}};
  absl::Status denied = (*auth)->Authorize(wrong);
  EXPECT_EQ(denied.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(denied.message()), ::testing::Not(HasSubstr("s3cret")));

  Metadata prefix{{"authorization", "Bearer s3cret-token"}};
  EXPECT_EQ((*auth)->Authorize(prefix).code(), absl::StatusCode::kPermissionDenied);

  Metadata right{{"authorization", "Bearer s3cret-token-0123456789"}};
  EXPECT_TRUE((*auth)->Authorize(right).ok());
  Metadata lower{{"authorization", "bearer s3cret-token-0123456789"}};
  EXPECT_TRUE((*auth)->Authorize(lower).ok());
}

// Issue 14 item 12: two authorization values used to be resolved first-wins.
TEST(AdminTokenTest, TwoAuthorizationValuesAreInvalidArgument) {
  auto auth = AdminTokenAuth::FromToken("s3cret-token-0123456789");
  ASSERT_TRUE(auth.ok()) << auth.status();
  for (const Metadata& md : {Metadata{{"authorization", "Bearer s3cret-token-0123456789"},
                                      {"authorization", "Bearer wrong-token-00000000000"}},
                             Metadata{{"authorization", "Bearer wrong-token-00000000000"},
                                      {"authorization", "Bearer s3cret-token-0123456789"}},
                             Metadata{{"authorization", "Bearer s3cret-token-0123456789"},
                                      {"authorization", "Bearer s3cret-token-0123456789"}}}) {
    const absl::Status s = auth.value()->Authorize(md);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("more than once"));
    EXPECT_THAT(std::string(s.message()), Not(HasSubstr("s3cret")));
  }
}

// Issue 14 item 12: a world-writable token file is refused at start, naming the flag and mode.
TEST(AdminTokenTest, WorldWritableTokenFileIsRefused) {
  testing::TempDir dir;
  const auto path = dir.path() / "token";
  testing::WriteWholeFile(path, "file-token-0123456789\n");
  ASSERT_EQ(::chmod(path.c_str(), 0666), 0);
  auto auth = AdminTokenAuth::FromFile(path.string());
  EXPECT_EQ(auth.status().code(), absl::StatusCode::kFailedPrecondition) << auth.status();
  EXPECT_THAT(std::string(auth.status().message()), HasSubstr("--admin-token-file"));
  EXPECT_THAT(std::string(auth.status().message()), HasSubstr("0666"));
  // Through a symlink (how a Secret volume presents it) the target's mode counts.
  const auto link = dir.path() / "link";
  std::filesystem::create_symlink(path, link);
  EXPECT_EQ(AdminTokenAuth::FromFile(link.string()).status().code(),
            absl::StatusCode::kFailedPrecondition);
  for (mode_t ok_mode : {0600, 0640, 0644, 0400}) {
    ASSERT_EQ(::chmod(path.c_str(), ok_mode), 0);
    EXPECT_TRUE(AdminTokenAuth::FromFile(path.string()).ok()) << std::oct << ok_mode;
  }
}

TEST(AdminTokenTest, FileTrailingNewlineIsIgnored) {
  testing::TempDir dir;
  const auto path = dir.path() / "token";
  testing::WriteWholeFile(path, "file-token-0123456789\n");
  auto auth = AdminTokenAuth::FromFile(path.string());
  ASSERT_TRUE(auth.ok()) << auth.status();
  Metadata right{{"authorization", "Bearer file-token-0123456789"}};
  EXPECT_TRUE((*auth)->Authorize(right).ok());

  auto missing = AdminTokenAuth::FromFile((dir.path() / "absent").string());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("--admin-token-file"));
}

TEST(FlagArgsTest, DashesInNamesBecomeUnderscores) {
  const char* argv[] = {"fibquant-server", "--data-dir=./a-b", "--tls-client-ca", "x-y.pem",
                        "-h", "--", "--not-a-flag"};
  EXPECT_THAT(NormalizeFlagArgs(7, argv),
              ElementsAre("fibquant-server", "--data_dir=./a-b", "--tls_client_ca", "x-y.pem", "-h",
                          "--", "--not-a-flag"));
  EXPECT_TRUE(WantsHelp(NormalizeFlagArgs(7, argv)));
  const char* plain[] = {"fibquant-server", "--listen=127.0.0.1:1"};
  EXPECT_FALSE(WantsHelp(NormalizeFlagArgs(2, plain)));
}

TEST(FlagArgsTest, ListenAddressesAreCheckedBeforeBinding) {
  for (const char* ok : {"127.0.0.1:0", "127.0.0.1:65535", "[::1]:50051", "localhost:1",
                         "0.0.0.0:9464"}) {
    EXPECT_TRUE(ValidateListenAddress("--listen", ok, false).ok()) << ok;
  }
  EXPECT_TRUE(ValidateListenAddress("--listen", "unix:/tmp/fq.sock", true).ok());
  for (const char* bad : {"127.0.0.1:99999", "127.0.0.1:", "127.0.0.1", ":", "127.0.0.1:-1",
                          "127.0.0.1:80a", "[::1:50051", "127.0.0.1:000001"}) {
    absl::Status s = ValidateListenAddress("--listen", bad, true);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(s.message()), HasSubstr("--listen=")) << bad;
  }
  EXPECT_EQ(ValidateListenAddress("--metrics-listen", "unix:/tmp/m.sock", false).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fibquant::server
