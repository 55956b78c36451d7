// Transport and admin security of the server: TLS / mTLS credentials from PEM files, the rule that
// plaintext listens only on loopback unless the operator explicitly allows it, and the admin bearer
// token that guards RegisterProfile.
//
// Certificate reload (TlsReloader): with --tls-reload-seconds > 0 the server serves through gRPC's
// TLS credentials with a FileWatcherCertificateProvider. The provider does not watch the operator's
// files directly: a background thread re-reads --tls-cert/--tls-key/--tls-client-ca every interval,
// applies the same checks as startup (parsable, valid now, key matches, a valid client CA) and only
// then stages the files into private in-memory files (memfd, never written to disk) that the
// provider watches. A bad rotation (expired certificate, mismatched key, garbage) is therefore
// never served: the last good material stays in use and a warning is logged.
//
// Ownership: AdminTokenAuth is created once at startup (main.cc) and shared read-only with the
// service for the server's lifetime. A TlsReloader is created once by main.cc and must outlive the
// grpc::Server built with its credentials (it owns the staged files the provider reads). The other
// functions are stateless.
// Thread safety: AdminTokenAuth is immutable after creation; Authorize may run on any thread.
// TlsReloader: CheckNow, served and credentials may be called from any thread (internally locked);
// its own background thread (Start) calls the log / expiry callbacks, one call at a time.
#ifndef FIBQUANT_SERVER_SECURITY_H_
#define FIBQUANT_SERVER_SECURITY_H_

#include <array>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/kv_frame_auth.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/string_ref.h"

namespace fibquant::server {

// TLS material as given on the command line (paths to PEM files; empty = not set).
struct TlsFlags {
  std::string cert_file;       // --tls-cert
  std::string key_file;        // --tls-key
  std::string client_ca_file;  // --tls-client-ca: require and verify client certificates (mTLS)
  bool enabled() const { return !cert_file.empty() || !key_file.empty(); }
};

// Reads a whole file (PEM, token). NotFound / PermissionDenied / DataLoss naming `flag` and `path`.
[[nodiscard]] absl::StatusOr<std::string> ReadSmallFile(const std::string& flag,
                                                        const std::string& path,
                                                        size_t max_bytes = 1 << 20);

// The server certificate as the operator should see it in the startup log.
struct CertificateInfo {
  std::string subject;  // RFC 2253 form, e.g. "CN=localhost"
  std::string issuer;   // same form
  absl::Time not_before;
  absl::Time not_after;
  // "subject CN=localhost, valid 2026-11-26T16:25:15Z .. 2026-11-28T16:25:15Z, issuer CN=my CA"
  std::string Describe() const;
};

// Server credentials: insecure when no TLS flag is set; TLS with cert+key; mTLS (client certificate
// required and verified against the CA) when a client CA is also given.
//
// The files are checked here, at startup, so a misconfigured server fails with a message naming the
// flag instead of starting and then failing every handshake:
//  - InvalidArgument: an incomplete combination (cert without key, key without cert, client CA
//    without cert); a file that holds no parsable PEM certificate / private key; a key that is not
//    the certificate's key.
//  - FailedPrecondition: the first certificate of --tls-cert is expired or not yet valid at `now`;
//    no certificate of --tls-client-ca is valid at `now`.
//  - NotFound / PermissionDenied / DataLoss from reading the files (ReadSmallFile).
// On success with TLS, `*info` (when not null) describes the server certificate.
[[nodiscard]] absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFlags& tls, CertificateInfo* info = nullptr, absl::Time now = absl::Now());

// The TLS files after every startup check of MakeServerCredentials: PEM text as read, and the
// server certificate's description. Same errors as MakeServerCredentials (TLS must be enabled;
// with TLS disabled this is InvalidArgument).
struct CheckedTlsFiles {
  std::string cert_pem;
  std::string key_pem;
  std::string client_ca_pem;  // empty without --tls-client-ca
  CertificateInfo info;
};
[[nodiscard]] absl::StatusOr<CheckedTlsFiles> ReadAndCheckTlsFiles(const TlsFlags& tls,
                                                                   absl::Time now = absl::Now());

// Reloading TLS credentials (see the top of this file). Typical use:
//   auto r = TlsReloader::Create(tls, absl::Seconds(60), log, on_expiry);  // startup checks
//   builder.AddListeningPort(listen, (*r)->credentials(), &port);
//   (*r)->Start();  // background re-check every interval until destruction
class TlsReloader {
 public:
  using LogFn = std::function<void(const std::string& line)>;
  // Called with the notAfter of the certificate being served: once from Create and on each reload.
  using ExpiryFn = std::function<void(absl::Time not_after)>;

  // Reads and checks the files (errors as MakeServerCredentials), stages them and builds the
  // credentials. `interval` (>= 1 s) is both the re-check period and the provider's refresh period,
  // so a rotation is served within about two intervals.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<TlsReloader>> Create(
      const TlsFlags& tls, absl::Duration interval, LogFn log, ExpiryFn on_expiry,
      absl::Time now = absl::Now());
  ~TlsReloader();  // stops and joins the background thread
  TlsReloader(const TlsReloader&) = delete;
  TlsReloader& operator=(const TlsReloader&) = delete;

  std::shared_ptr<grpc::ServerCredentials> credentials() const { return credentials_; }
  // The certificate currently staged for serving.
  CertificateInfo served() const;

  // One re-check: re-reads the files; when they pass the checks and differ from what is staged,
  // stages them and logs "tls certificate reloaded: <Describe()>"; when they fail, logs a warning
  // (once per distinct problem) and keeps the last good material. Also warns once per certificate
  // when the served one expires within 14 days. Returns the check's status (OK when unchanged).
  absl::Status CheckNow(absl::Time now = absl::Now());

  // Runs CheckNow every interval on a background thread until destruction. Call at most once.
  void Start();

 private:
  struct Staged;
  TlsReloader(TlsFlags tls, absl::Duration interval, LogFn log, ExpiryFn on_expiry);
  absl::Status Stage(const CheckedTlsFiles& files) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WarnIfExpiringSoon(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const TlsFlags tls_;
  const absl::Duration interval_;
  const LogFn log_;
  const ExpiryFn on_expiry_;
  std::shared_ptr<grpc::ServerCredentials> credentials_;

  mutable absl::Mutex mu_;
  std::unique_ptr<Staged> staged_ ABSL_GUARDED_BY(mu_);
  CheckedTlsFiles current_ ABSL_GUARDED_BY(mu_);
  std::string last_problem_ ABSL_GUARDED_BY(mu_);
  std::string warned_cert_pem_ ABSL_GUARDED_BY(mu_);  // expiry warning already given for it
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// True when `listen` (a gRPC listen address: "host:port", "[v6]:port", "unix:path",
// "unix-abstract:name") can only be reached from this machine: 127.0.0.0/8, ::1, "localhost" or a
// Unix socket.
bool IsLoopbackListenAddress(const std::string& listen);

// The plaintext rule: without TLS, a listen address that is not loopback is refused unless
// --allow-insecure is set (FailedPrecondition naming the flags and the address).
absl::Status CheckPlaintextAllowed(const std::string& listen, bool tls_enabled, bool allow_insecure);

// FailedPrecondition naming `flag` when `path` (followed through symlinks) is writable by every
// user: a secret anyone on the host can replace is no secret. A missing file is OK here (the read
// that follows reports it).
absl::Status CheckSecretFileMode(const std::string& flag, const std::string& path);

// The admin bearer token. RegisterProfile requires the metadata `authorization: Bearer <token>`.
// The token is kept only as its SHA-256; requests are compared by SHA-256 of the presented value
// with CRYPTO_memcmp, so the comparison takes the same time wherever the first difference is and
// does not leak the token's length.
class AdminTokenAuth {
 public:
  // The token is the file's content with surrounding whitespace (a trailing newline) removed.
  // FailedPrecondition when the file is world-writable (CheckSecretFileMode).
  // InvalidArgument when it is empty or shorter than 16 characters, or contains whitespace or
  // control characters (they cannot travel in an HTTP/2 header value unchanged).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<AdminTokenAuth>> FromFile(
      const std::string& path);
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<AdminTokenAuth>> FromToken(
      const std::string& token);

  // OK when the metadata carries `authorization: Bearer <token>` with the right token.
  // Unauthenticated when the header is missing or not a Bearer credential; InvalidArgument when it
  // appears more than once; PermissionDenied when a Bearer token is present but wrong. Messages never echo the presented value.
  absl::Status Authorize(
      const std::multimap<grpc::string_ref, grpc::string_ref>& client_metadata) const;
  absl::Status Authorize(const grpc::ServerContextBase& context) const {
    return Authorize(context.client_metadata());
  }

 private:
  explicit AdminTokenAuth(const std::array<unsigned char, 32>& digest) : digest_(digest) {}
  std::array<unsigned char, 32> digest_;
};

// The admin token in force, replaceable at run time (SIGHUP re-reads --admin-token-file). Reload
// keeps the token in use when the file fails its checks, so a bad edit never opens or locks the
// admin RPCs. Thread safety: Authorize and Reload may run concurrently on any threads.
class AdminTokenHolder {
 public:
  AdminTokenHolder(std::string path, std::unique_ptr<AdminTokenAuth> initial)
      : path_(std::move(path)), auth_(std::move(initial)) {}
  // Re-reads the file (AdminTokenAuth::FromFile); on success the new token replaces the old one.
  absl::Status Reload();
  absl::Status Authorize(const grpc::ServerContextBase& context) const;
  const std::string& path() const { return path_; }

 private:
  const std::string path_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const AdminTokenAuth> auth_ ABSL_GUARDED_BY(mu_);
};

// The frame keys in force (--frame-key-file, core/kv_frame_auth.h), replaceable at run time
// (SIGHUP): a reload that fails its checks keeps the keys in use. Streams take the ring once at
// their header, so a reload applies to new streams. Thread safety: all methods may be called
// concurrently.
class FrameKeyHolder {
 public:
  // FailedPrecondition for a world-writable file; InvalidArgument naming the flag, the path and
  // the line for a malformed one; NotFound / PermissionDenied when it cannot be read.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<FrameKeyHolder>> FromFile(const std::string& path);
  absl::Status Reload();
  std::shared_ptr<const KvFrameKeyRing> Current() const;
  // "2 keys (ids 3, 9), sealing with key id 3" (never the secrets).
  std::string Describe() const;
  const std::string& path() const { return path_; }

 private:
  explicit FrameKeyHolder(std::string path) : path_(std::move(path)) {}
  const std::string path_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const KvFrameKeyRing> ring_ ABSL_GUARDED_BY(mu_);
};

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_SECURITY_H_
