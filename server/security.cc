#include "server/security.h"

#include <arpa/inet.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <ctime>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string_view>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "grpcpp/security/server_credentials.h"

namespace fibquant::server {
namespace {

// Admin tokens shorter than this are refused: a token is a shared secret, not a password.
constexpr size_t kMinTokenLength = 16;

std::array<unsigned char, 32> Sha256(std::string_view data) {
  std::array<unsigned char, 32> out{};
  unsigned int len = 0;
  // EVP_Digest cannot fail for SHA-256 on an in-memory buffer short of memory exhaustion; a zero
  // digest on failure would only make every comparison fail (never succeed), which is safe.
  if (EVP_Digest(data.data(), data.size(), out.data(), &len, EVP_sha256(), nullptr) != 1) {
    out.fill(0);
  }
  return out;
}

bool LooksLikePem(const std::string& text, std::string_view kind) {
  return text.find("-----BEGIN ") != std::string::npos && text.find(kind) != std::string::npos;
}

struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyDeleter {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct BioDeleter {
  void operator()(BIO* b) const { BIO_free(b); }
};
using X509Ptr = std::unique_ptr<X509, X509Deleter>;

// OpenSSL would prompt on the terminal for the passphrase of an encrypted key; gRPC cannot use
// encrypted keys anyway, so refuse without prompting.
int NoPassphrase(char*, int, int, void*) { return -1; }

std::unique_ptr<BIO, BioDeleter> MemBio(const std::string& pem) {
  return std::unique_ptr<BIO, BioDeleter>(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// Every certificate in a PEM bundle, in order (empty when none parses).
std::vector<X509Ptr> ParseCertificates(const std::string& pem) {
  std::vector<X509Ptr> certs;
  auto bio = MemBio(pem);
  while (bio != nullptr) {
    X509* x = PEM_read_bio_X509(bio.get(), nullptr, NoPassphrase, nullptr);
    if (x == nullptr) break;
    certs.emplace_back(x);
  }
  ERR_clear_error();  // the loop ends on an expected "no start line"
  return certs;
}

absl::Time AsnTimeToAbsl(const ASN1_TIME* t) {
  std::tm tm{};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1) return absl::InfinitePast();
  return absl::FromTimeT(timegm(&tm));
}

CertificateInfo Inspect(const X509* cert) {
  CertificateInfo info;
  if (auto bio = std::unique_ptr<BIO, BioDeleter>(BIO_new(BIO_s_mem())); bio != nullptr) {
    X509_NAME_print_ex(bio.get(), X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio.get(), &data);
    if (n > 0) info.subject.assign(data, static_cast<size_t>(n));
  }
  info.not_before = AsnTimeToAbsl(X509_get0_notBefore(cert));
  info.not_after = AsnTimeToAbsl(X509_get0_notAfter(cert));
  return info;
}

std::string Rfc3339(absl::Time t) { return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", t, absl::UTCTimeZone()); }

// Empty when `info` is valid at `now`, else why not.
std::string ValidityProblem(const CertificateInfo& info, absl::Time now) {
  if (now < info.not_before) return absl::StrCat("is not valid before ", Rfc3339(info.not_before));
  if (now > info.not_after) return absl::StrCat("expired at ", Rfc3339(info.not_after));
  return "";
}

}  // namespace

std::string CertificateInfo::Describe() const {
  return absl::StrCat("subject ", subject.empty() ? "(empty)" : subject, ", valid ",
                      Rfc3339(not_before), " .. ", Rfc3339(not_after));
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& flag, const std::string& path,
                                          size_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    std::string msg = absl::StrCat(flag, ": cannot open '", path, "': ", std::strerror(err));
    if (err == EACCES) return absl::PermissionDeniedError(msg);
    return absl::NotFoundError(msg);
  }
  std::string data;
  data.resize(max_bytes + 1);
  in.read(data.data(), static_cast<std::streamsize>(data.size()));
  if (in.bad()) {
    return absl::DataLossError(absl::StrCat(flag, ": error reading '", path, "'"));
  }
  data.resize(static_cast<size_t>(in.gcount()));
  if (data.size() > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": '", path, "' is larger than ", max_bytes, " bytes"));
  }
  return data;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFlags& tls, CertificateInfo* info, absl::Time now) {
  if (!tls.enabled()) {
    if (!tls.client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls-client-ca requires --tls-cert and --tls-key (mTLS is TLS with client certificates)");
    }
    return grpc::InsecureServerCredentials();
  }
  if (tls.cert_file.empty()) return absl::InvalidArgumentError("--tls-key requires --tls-cert");
  if (tls.key_file.empty()) return absl::InvalidArgumentError("--tls-cert requires --tls-key");

  auto cert = ReadSmallFile("--tls-cert", tls.cert_file);
  if (!cert.ok()) return cert.status();
  if (!LooksLikePem(*cert, "CERTIFICATE-----")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls-cert: '", tls.cert_file, "' holds no PEM certificate"));
  }
  auto key = ReadSmallFile("--tls-key", tls.key_file);
  if (!key.ok()) return key.status();
  if (!LooksLikePem(*key, "PRIVATE KEY-----")) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls-key: '", tls.key_file, "' holds no PEM private key"));
  }

  std::vector<X509Ptr> chain = ParseCertificates(*cert);
  if (chain.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls-cert: '", tls.cert_file, "' holds no parsable X.509 certificate"));
  }
  const CertificateInfo leaf = Inspect(chain.front().get());
  if (std::string problem = ValidityProblem(leaf, now); !problem.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--tls-cert: certificate '", tls.cert_file, "' (", leaf.subject, ") ", problem,
        "; clients would refuse every handshake (renew it)"));
  }
  {
    auto bio = MemBio(*key);
    std::unique_ptr<EVP_PKEY, PkeyDeleter> pkey(
        bio == nullptr ? nullptr : PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassphrase, nullptr));
    ERR_clear_error();
    if (pkey == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tls-key: '", tls.key_file, "' holds no parsable unencrypted private key"));
    }
    const bool match = X509_check_private_key(chain.front().get(), pkey.get()) == 1;
    ERR_clear_error();
    if (!match) {
      return absl::InvalidArgumentError(absl::StrCat("--tls-key: '", tls.key_file,
                                                     "' is not the private key of --tls-cert '",
                                                     tls.cert_file, "'"));
    }
  }
  if (info != nullptr) *info = leaf;

  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_key_cert_pairs.push_back({*key, *cert});
  if (!tls.client_ca_file.empty()) {
    auto ca = ReadSmallFile("--tls-client-ca", tls.client_ca_file);
    if (!ca.ok()) return ca.status();
    if (!LooksLikePem(*ca, "CERTIFICATE-----")) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls-client-ca: '", tls.client_ca_file, "' holds no PEM certificate"));
    }
    std::vector<X509Ptr> cas = ParseCertificates(*ca);
    if (cas.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tls-client-ca: '", tls.client_ca_file, "' holds no parsable X.509 certificate"));
    }
    // A bundle may carry an old CA beside its successor during a rotation; only a bundle in which
    // no CA is valid makes every client handshake fail.
    std::string first_problem;
    bool any_valid = false;
    for (const X509Ptr& c : cas) {
      std::string problem = ValidityProblem(Inspect(c.get()), now);
      if (problem.empty()) any_valid = true;
      else if (first_problem.empty()) first_problem = problem;
    }
    if (!any_valid) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--tls-client-ca: no certificate in '", tls.client_ca_file, "' is valid now (the first ",
          first_problem, "); every client certificate would be refused"));
    }
    options.pem_root_certs = *ca;
    options.client_certificate_request =
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

bool IsLoopbackListenAddress(const std::string& listen) {
  std::string_view addr = listen;
  if (addr.starts_with("unix:") || addr.starts_with("unix-abstract:")) return true;
  if (addr.starts_with("ipv4:")) addr.remove_prefix(5);
  if (addr.starts_with("ipv6:")) addr.remove_prefix(5);
  if (addr.starts_with("dns:///")) addr.remove_prefix(7);

  std::string host;
  if (addr.starts_with("[")) {
    const size_t close = addr.find(']');
    if (close == std::string_view::npos) return false;
    host = std::string(addr.substr(1, close - 1));
  } else {
    const size_t colon = addr.rfind(':');
    host = std::string(colon == std::string_view::npos ? addr : addr.substr(0, colon));
  }
  host = absl::AsciiStrToLower(host);
  if (host == "localhost") return true;

  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) {
    return (ntohl(v4.s_addr) >> 24) == 127;
  }
  in6_addr v6{};
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    // IPv4-mapped loopback (::ffff:127.x.y.z).
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
  }
  // Empty host (":50051"), wildcard or a name that may resolve anywhere: not loopback.
  return false;
}

absl::Status CheckPlaintextAllowed(const std::string& listen, bool tls_enabled,
                                   bool allow_insecure) {
  if (tls_enabled || allow_insecure || IsLoopbackListenAddress(listen)) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "--listen=", listen,
      " is not a loopback address and no --tls-cert/--tls-key is set: refusing to serve "
      "plaintext gRPC to the network (set up TLS, listen on 127.0.0.1, or pass --allow-insecure "
      "if a trusted proxy terminates TLS)"));
}

absl::StatusOr<std::unique_ptr<AdminTokenAuth>> AdminTokenAuth::FromFile(const std::string& path) {
  auto content = ReadSmallFile("--admin-token-file", path, 4096);
  if (!content.ok()) return content.status();
  auto auth = FromToken(std::string(absl::StripAsciiWhitespace(*content)));
  if (!auth.ok()) {
    return absl::Status(auth.status().code(),
                        absl::StrCat("--admin-token-file '", path, "': ", auth.status().message()));
  }
  return auth;
}

absl::StatusOr<std::unique_ptr<AdminTokenAuth>> AdminTokenAuth::FromToken(
    const std::string& token) {
  if (token.size() < kMinTokenLength) {
    return absl::InvalidArgumentError(absl::StrCat("admin token must be at least ",
                                                   kMinTokenLength, " characters, got ",
                                                   token.size()));
  }
  for (unsigned char c : token) {
    if (c <= 0x20 || c >= 0x7f) {
      return absl::InvalidArgumentError(
          "admin token must be printable ASCII without spaces (it travels in an HTTP/2 header)");
    }
  }
  return std::unique_ptr<AdminTokenAuth>(new AdminTokenAuth(Sha256(token)));
}

absl::Status AdminTokenAuth::Authorize(
    const std::multimap<grpc::string_ref, grpc::string_ref>& client_metadata) const {
  auto it = client_metadata.find("authorization");
  if (it == client_metadata.end()) {
    return absl::UnauthenticatedError(
        "this method requires metadata 'authorization: Bearer <admin token>'");
  }
  std::string_view value(it->second.data(), it->second.size());
  constexpr std::string_view kBearer = "Bearer ";
  if (value.size() < kBearer.size() ||
      !absl::EqualsIgnoreCase(absl::string_view(value.data(), kBearer.size()), "Bearer ")) {
    return absl::UnauthenticatedError(
        "authorization metadata must be 'Bearer <admin token>'");
  }
  const std::array<unsigned char, 32> presented = Sha256(value.substr(kBearer.size()));
  if (CRYPTO_memcmp(presented.data(), digest_.data(), digest_.size()) != 0) {
    return absl::PermissionDeniedError("admin token rejected");
  }
  return absl::OkStatus();
}

}  // namespace fibquant::server
