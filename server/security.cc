#include "server/security.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <ctime>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string_view>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"

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

std::string NameToString(const X509_NAME* name) {
  std::string out;
  if (auto bio = std::unique_ptr<BIO, BioDeleter>(BIO_new(BIO_s_mem())); bio != nullptr) {
    X509_NAME_print_ex(bio.get(), name, 0, XN_FLAG_RFC2253);
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio.get(), &data);
    if (n > 0) out.assign(data, static_cast<size_t>(n));
  }
  return out;
}

CertificateInfo Inspect(const X509* cert) {
  CertificateInfo info;
  info.subject = NameToString(X509_get_subject_name(cert));
  info.issuer = NameToString(X509_get_issuer_name(cert));
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
                      Rfc3339(not_before), " .. ", Rfc3339(not_after), ", issuer ",
                      issuer.empty() ? "(empty)" : issuer);
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

absl::StatusOr<CheckedTlsFiles> ReadAndCheckTlsFiles(const TlsFlags& tls, absl::Time now) {
  if (!tls.enabled()) return absl::InvalidArgumentError("TLS is not enabled (no --tls-cert/--tls-key)");
  if (tls.cert_file.empty()) return absl::InvalidArgumentError("--tls-key requires --tls-cert");
  if (tls.key_file.empty()) return absl::InvalidArgumentError("--tls-cert requires --tls-key");

  CheckedTlsFiles out;
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
  out.info = leaf;
  out.cert_pem = *std::move(cert);
  out.key_pem = *std::move(key);

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
    out.client_ca_pem = *std::move(ca);
  }
  return out;
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
  auto files = ReadAndCheckTlsFiles(tls, now);
  if (!files.ok()) return files.status();
  if (info != nullptr) *info = files->info;

  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_key_cert_pairs.push_back({files->key_pem, files->cert_pem});
  if (!tls.client_ca_file.empty()) {
    options.pem_root_certs = files->client_ca_pem;
    options.client_certificate_request =
        GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

// ---- TlsReloader ----

namespace {

// Warn this long before the served certificate expires.
constexpr absl::Duration kExpiryWarning = absl::Hours(24 * 14);

// An anonymous in-memory file holding `data` (memfd: never on disk, gone with its last fd).
absl::StatusOr<int> NewMemFile(const char* name, const std::string& data) {
  const int fd = memfd_create(name, MFD_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("memfd_create: ", std::strerror(errno)));
  }
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      close(fd);
      return absl::InternalError(absl::StrCat("writing a staged tls file: ", std::strerror(err)));
    }
    done += static_cast<size_t>(n);
  }
  return fd;
}

// Atomically makes descriptor `*slot` (kept at the same number, so its /proc/self/fd path stays
// valid) refer to a new in-memory file with `data`; the first call allocates the descriptor.
absl::Status StageInto(int* slot, const char* name, const std::string& data) {
  auto fd = NewMemFile(name, data);
  if (!fd.ok()) return fd.status();
  if (*slot < 0) {
    *slot = *fd;
    return absl::OkStatus();
  }
  // dup2 replaces the file behind *slot in one step: a reader opening /proc/self/fd/<slot> sees
  // either the old file or the new one, never a partial write.
  if (dup3(*fd, *slot, O_CLOEXEC) < 0) {
    const int err = errno;
    close(*fd);
    return absl::InternalError(absl::StrCat("dup3: ", std::strerror(err)));
  }
  close(*fd);
  return absl::OkStatus();
}

std::string FdPath(int fd) { return absl::StrCat("/proc/self/fd/", fd); }

}  // namespace

struct TlsReloader::Staged {
  int key_fd = -1;
  int cert_fd = -1;
  int ca_fd = -1;
  ~Staged() {
    for (int fd : {key_fd, cert_fd, ca_fd}) {
      if (fd >= 0) close(fd);
    }
  }
};

TlsReloader::TlsReloader(TlsFlags tls, absl::Duration interval, LogFn log, ExpiryFn on_expiry)
    : tls_(std::move(tls)),
      interval_(interval),
      log_(std::move(log)),
      on_expiry_(std::move(on_expiry)),
      staged_(std::make_unique<Staged>()) {}

absl::StatusOr<std::unique_ptr<TlsReloader>> TlsReloader::Create(const TlsFlags& tls,
                                                                 absl::Duration interval, LogFn log,
                                                                 ExpiryFn on_expiry,
                                                                 absl::Time now) {
  if (interval < absl::Seconds(1)) {
    return absl::InvalidArgumentError("--tls-reload-seconds must be >= 1 to reload certificates");
  }
  if (!tls.enabled() && !tls.client_ca_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls-client-ca requires --tls-cert and --tls-key (mTLS is TLS with client certificates)");
  }
  auto files = ReadAndCheckTlsFiles(tls, now);
  if (!files.ok()) return files.status();
  std::unique_ptr<TlsReloader> r(new TlsReloader(tls, interval, std::move(log), std::move(on_expiry)));
  {
    absl::MutexLock lock(&r->mu_);
    if (absl::Status s = r->Stage(*files); !s.ok()) return s;
    r->current_ = *files;
    // main.cc logs the startup expiry warning itself.
    if (files->info.not_after - now < kExpiryWarning) r->warned_cert_pem_ = files->cert_pem;

    const unsigned int seconds =
        static_cast<unsigned int>(std::max<int64_t>(1, absl::ToInt64Seconds(interval)));
    auto provider = tls.client_ca_file.empty()
                        ? std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
                              FdPath(r->staged_->key_fd), FdPath(r->staged_->cert_fd), seconds)
                        : std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
                              FdPath(r->staged_->key_fd), FdPath(r->staged_->cert_fd),
                              FdPath(r->staged_->ca_fd), seconds);
    grpc::experimental::TlsServerCredentialsOptions options(provider);
    options.watch_identity_key_cert_pairs();
    if (!tls.client_ca_file.empty()) {
      options.watch_root_certs();
      options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    } else {
      options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    }
    r->credentials_ = grpc::experimental::TlsServerCredentials(options);
    if (r->credentials_ == nullptr) {
      return absl::InternalError("gRPC refused the reloading TLS credentials options");
    }
  }
  if (r->on_expiry_) r->on_expiry_(files->info.not_after);
  return r;
}

TlsReloader::~TlsReloader() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
  // Drop our reference to the credentials (and so, once the server is gone, the provider and its
  // refresh thread) before the staged files it reads are closed.
  credentials_.reset();
}

CertificateInfo TlsReloader::served() const {
  absl::MutexLock lock(&mu_);
  return current_.info;
}

absl::Status TlsReloader::Stage(const CheckedTlsFiles& files) {
  // Key first, then certificate: gRPC's watcher checks that they match and keeps the previous pair
  // when it reads between the two steps; the next refresh picks up the complete pair.
  if (absl::Status s = StageInto(&staged_->key_fd, "fibquant-tls-key", files.key_pem); !s.ok()) {
    return s;
  }
  if (absl::Status s = StageInto(&staged_->cert_fd, "fibquant-tls-cert", files.cert_pem);
      !s.ok()) {
    return s;
  }
  if (!tls_.client_ca_file.empty()) {
    if (absl::Status s = StageInto(&staged_->ca_fd, "fibquant-tls-client-ca", files.client_ca_pem);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

void TlsReloader::WarnIfExpiringSoon(absl::Time now) {
  const absl::Duration left = current_.info.not_after - now;
  if (left >= kExpiryWarning || warned_cert_pem_ == current_.cert_pem) return;
  warned_cert_pem_ = current_.cert_pem;
  if (log_) {
    log_(absl::StrCat("warning: the tls certificate in use expires in ",
                      absl::FormatDuration(absl::Trunc(left, absl::Minutes(1))),
                      "; renew the files (they are reloaded without a restart)"));
  }
}

absl::Status TlsReloader::CheckNow(absl::Time now) {
  auto files = ReadAndCheckTlsFiles(tls_, now);
  absl::MutexLock lock(&mu_);
  if (!files.ok()) {
    std::string problem(files.status().message());
    if (problem != last_problem_ && log_) {
      log_(absl::StrCat("warning: tls files not reloaded: ", problem,
                        "; keeping the last good certificate in use (",
                        current_.info.Describe(), ")"));
    }
    last_problem_ = std::move(problem);
    WarnIfExpiringSoon(now);
    return files.status();
  }
  last_problem_.clear();
  if (files->cert_pem == current_.cert_pem && files->key_pem == current_.key_pem &&
      files->client_ca_pem == current_.client_ca_pem) {
    WarnIfExpiringSoon(now);
    return absl::OkStatus();
  }
  if (absl::Status s = Stage(*files); !s.ok()) {
    // Partly staged material is still a checked set from disk or the previous one; gRPC serves a
    // pair only when key and certificate match.
    if (log_) log_(absl::StrCat("warning: tls files not reloaded: ", s.message()));
    return s;
  }
  const bool cert_changed =
      files->cert_pem != current_.cert_pem || files->key_pem != current_.key_pem;
  current_ = *std::move(files);
  if (log_) {
    log_(cert_changed
             ? absl::StrCat("tls certificate reloaded: ", current_.info.Describe())
             : absl::StrCat("tls client ca reloaded from '", tls_.client_ca_file, "'"));
  }
  if (on_expiry_) on_expiry_(current_.info.not_after);
  WarnIfExpiringSoon(now);
  return absl::OkStatus();
}

void TlsReloader::Start() {
  thread_ = std::thread([this] {
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        if (mu_.AwaitWithTimeout(absl::Condition(&stop_), interval_)) return;
      }
      (void)CheckNow();
    }
  });
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

absl::Status CheckSecretFileMode(const std::string& flag, const std::string& path) {
  struct stat st {};
  // stat, not lstat: a Kubernetes Secret volume reaches its files through symlinks, and what matters
  // is who may rewrite the bytes the server reads.
  if (::stat(path.c_str(), &st) != 0) return absl::OkStatus();  // the read reports it, naming the flag
  if ((st.st_mode & S_IWOTH) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        flag, ": '", path, "' is writable by every user (mode ",
        absl::StrFormat("%04o", st.st_mode & 07777),
        "); anyone on the host could replace the secret: chmod o-w (0600 or 0400 is usual)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AdminTokenAuth>> AdminTokenAuth::FromFile(const std::string& path) {
  if (absl::Status mode = CheckSecretFileMode("--admin-token-file", path); !mode.ok()) return mode;
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
  // Two values would leave which one counts to the order a proxy happened to keep (gRPC passes
  // every value; a first-wins rule here and a last-wins rule in front of us disagree).
  if (client_metadata.count("authorization") > 1) {
    return absl::InvalidArgumentError(
        "metadata 'authorization' must appear once; this request carries it more than once");
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

namespace {
absl::StatusOr<std::shared_ptr<const KvFrameKeyRing>> ReadFrameKeys(const std::string& path) {
  if (absl::Status mode = CheckSecretFileMode("--frame-key-file", path); !mode.ok()) return mode;
  auto text = ReadSmallFile("--frame-key-file", path, 64 * 1024);
  if (!text.ok()) return text.status();
  auto ring = KvFrameKeyRing::Parse(*text, absl::StrCat("--frame-key-file '", path, "'"));
  if (!ring.ok()) return ring.status();
  return std::make_shared<const KvFrameKeyRing>(*std::move(ring));
}
}  // namespace

absl::StatusOr<std::unique_ptr<FrameKeyHolder>> FrameKeyHolder::FromFile(const std::string& path) {
  std::unique_ptr<FrameKeyHolder> h(new FrameKeyHolder(path));
  if (absl::Status s = h->Reload(); !s.ok()) return s;
  return h;
}

absl::Status FrameKeyHolder::Reload() {
  auto ring = ReadFrameKeys(path_);
  if (!ring.ok()) return ring.status();
  absl::MutexLock lock(&mu_);
  ring_ = *std::move(ring);
  return absl::OkStatus();
}

std::shared_ptr<const KvFrameKeyRing> FrameKeyHolder::Current() const {
  absl::MutexLock lock(&mu_);
  return ring_;
}

std::string FrameKeyHolder::Describe() const {
  std::shared_ptr<const KvFrameKeyRing> ring = Current();
  if (ring == nullptr) return "no keys";
  const std::vector<uint16_t> ids = ring->ids();
  return absl::StrCat(ids.size(), ids.size() == 1 ? " key" : " keys", " (ids ",
                      absl::StrJoin(ids, ", "), "), sealing with key id ", ring->active_id());
}

absl::Status AdminTokenHolder::Reload() {
  auto fresh = AdminTokenAuth::FromFile(path_);
  if (!fresh.ok()) return fresh.status();
  absl::MutexLock lock(&mu_);
  auth_ = std::shared_ptr<const AdminTokenAuth>(std::move(*fresh));
  return absl::OkStatus();
}

absl::Status AdminTokenHolder::Authorize(const grpc::ServerContextBase& context) const {
  std::shared_ptr<const AdminTokenAuth> auth;
  {
    absl::MutexLock lock(&mu_);
    auth = auth_;
  }
  return auth->Authorize(context);
}

}  // namespace fibquant::server
