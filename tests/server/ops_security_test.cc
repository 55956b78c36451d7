// Unit tests of server/security.h and server/options_flags.h: loopback detection, the plaintext
// rule, credential flag combinations, the admin token check, flag-name normalisation.
#include "server/security.h"

#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/options_flags.h"
#include "tests/server/ops_test_util.h"

namespace fibquant::server {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
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
