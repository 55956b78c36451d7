#include "client/cli/tls_diagnose.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "openssl/err.h"
#include "openssl/pem.h"
#include "openssl/ssl.h"
#include "openssl/x509.h"
#include "openssl/x509_vfy.h"

namespace fibquant::cli {
namespace {

struct SslCtxFree {
  void operator()(SSL_CTX* c) const { SSL_CTX_free(c); }
};
struct SslFree {
  void operator()(SSL* s) const { SSL_free(s); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};

// host and port of "host:port" / "[v6]:port" (optionally ipv4:/ipv6:/dns: prefixed); false for
// anything else (unix sockets, URIs).
bool SplitTarget(const std::string& target, std::string* host, std::string* port) {
  if (absl::StrContains(target, "://") || absl::StartsWith(target, "unix")) return false;
  std::string t = target;
  for (const std::string scheme : {"ipv4:", "ipv6:", "dns:"}) {
    if (absl::StartsWith(t, scheme)) t = t.substr(scheme.size());
  }
  const size_t colon = t.rfind(':');
  if (colon == std::string::npos) return false;
  *host = t.substr(0, colon);
  *port = t.substr(colon + 1);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  return !host->empty() && !port->empty();
}

// A connected blocking TCP socket whose reads and writes time out after `timeout`, or -1.
int ConnectTcp(const std::string& host, const std::string& port, std::chrono::milliseconds timeout) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = res; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      close(fd);
      fd = -1;
      continue;
    }
    pollfd p{fd, POLLOUT, 0};
    int err = 0;
    socklen_t len = sizeof(err);
    if (poll(&p, 1, static_cast<int>(timeout.count())) != 1 ||
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(res);
  if (fd < 0) return -1;
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  timeval tv{static_cast<time_t>(timeout.count() / 1000),
             static_cast<suseconds_t>((timeout.count() % 1000) * 1000)};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  return fd;
}

// The reason strings OpenSSL queued (e.g. "tlsv13 alert certificate required"), lower case.
std::string DrainErrors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    const char* reason = ERR_reason_error_string(e);
    if (reason != nullptr) absl::StrAppend(&out, out.empty() ? "" : "; ", reason);
  }
  return out;
}

// Set by the client-certificate callback: the server asked for a certificate and none was set.
int CertRequestedIndex() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}
int OnCertRequest(SSL* ssl, X509**, EVP_PKEY**) {
  SSL_set_ex_data(ssl, CertRequestedIndex(), reinterpret_cast<void*>(1));
  return 0;  // no certificate to offer
}

std::string NameText(const X509_NAME* name) {
  std::unique_ptr<BIO, BioFree> bio(BIO_new(BIO_s_mem()));
  X509_NAME_print_ex(bio.get(), name, 0, XN_FLAG_RFC2253);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, n > 0 ? static_cast<size_t>(n) : 0);
}

// The server closed the connection (gRPC's server sends no alert when it refuses a client): say
// why as precisely as the handshake allows.
std::string ExplainClosed(SSL* ssl, const std::string& cert_pem, bool cert_requested) {
  if (cert_pem.empty()) {
    return cert_requested ? "the server requires a client certificate (mTLS) and none was presented: "
                            "pass --tls-cert and --tls-key"
                          : "";
  }
  std::unique_ptr<BIO, BioFree> cb(BIO_new_mem_buf(cert_pem.data(), static_cast<int>(cert_pem.size())));
  std::unique_ptr<X509, X509Free> leaf(PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr));
  ERR_clear_error();
  if (!leaf) return "";
  if (X509_cmp_current_time(X509_get0_notAfter(leaf.get())) < 0) {
    return "the server refused the client certificate --tls-cert: it has expired";
  }
  if (X509_cmp_current_time(X509_get0_notBefore(leaf.get())) > 0) {
    return "the server refused the client certificate --tls-cert: it is not valid yet";
  }
  // The CAs the server named in its certificate request (gRPC names its --tls-client-ca bundle).
  const STACK_OF(X509_NAME)* cas = SSL_get_client_CA_list(ssl);
  const X509_NAME* issuer = X509_get_issuer_name(leaf.get());
  if (cas != nullptr && sk_X509_NAME_num(cas) > 0) {
    std::string names;
    for (int i = 0; i < sk_X509_NAME_num(cas); ++i) {
      const X509_NAME* ca = sk_X509_NAME_value(cas, i);
      if (X509_NAME_cmp(ca, issuer) == 0) {
        return "the server refused the client certificate --tls-cert although its issuer is a CA "
               "the server accepts: check that it allows client authentication (extendedKeyUsage "
               "clientAuth) and that --tls-key is its key";
      }
      absl::StrAppend(&names, names.empty() ? "" : "; ", NameText(ca));
    }
    return absl::StrCat("the server refused the client certificate --tls-cert: it is issued by ",
                        NameText(issuer), ", but the server accepts client certificates only from ",
                        names, " (its --tls-client-ca)");
  }
  return "the server closed the connection after the TLS handshake: it refused the client "
         "certificate --tls-cert (it must be signed by the server's --tls-client-ca, be valid now "
         "and allow client authentication)";
}

// What a TLS alert from the server means for this client.
std::string ExplainAlert(const std::string& errors, bool sent_cert) {
  if (errors.empty()) return "";
  if (absl::StrContains(errors, "certificate required") ||
      (!sent_cert && absl::StrContains(errors, "handshake failure"))) {
    return "the server requires a client certificate (mTLS) and none was presented: pass "
           "--tls-cert and --tls-key";
  }
  if (sent_cert && (absl::StrContains(errors, "unknown ca") ||
                    absl::StrContains(errors, "bad certificate") ||
                    absl::StrContains(errors, "certificate expired") ||
                    absl::StrContains(errors, "unsupported certificate") ||
                    absl::StrContains(errors, "handshake failure") ||
                    absl::StrContains(errors, "decrypt error"))) {
    return absl::StrCat("the server refused the client certificate --tls-cert (TLS alert: ", errors,
                        "): it must be signed by the server's --tls-client-ca, be valid now and "
                        "allow client authentication");
  }
  return absl::StrCat("TLS handshake failed: ", errors);
}

// Blocks SIGPIPE in this thread while alive (a write to a socket the server closed must fail with
// EPIPE, not kill the CLI) and discards one raised meanwhile.
class SigpipeBlocked {
 public:
  SigpipeBlocked() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
  }
  ~SigpipeBlocked() {
    const timespec zero{0, 0};
    while (sigtimedwait(&pipe_, nullptr, &zero) == SIGPIPE) {
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }

 private:
  sigset_t pipe_;
  sigset_t old_;
};

}  // namespace

std::string DiagnoseTls(const TlsProbeConfig& config) {
  SigpipeBlocked no_sigpipe;
  std::string host, port;
  if (!SplitTarget(config.target, &host, &port)) return "";
  const int fd = ConnectTcp(host, port, config.timeout);
  if (fd < 0) return "";  // not reachable at all: the original error says so

  ERR_clear_error();
  std::unique_ptr<SSL_CTX, SslCtxFree> ctx(SSL_CTX_new(TLS_client_method()));
  if (!ctx) {
    close(fd);
    return "";
  }
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  {
    std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(config.ca_pem.data(), static_cast<int>(config.ca_pem.size())));
    X509_STORE* store = SSL_CTX_get_cert_store(ctx.get());
    while (X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
      X509_STORE_add_cert(store, x);
      X509_free(x);
    }
    ERR_clear_error();  // the end of the bundle reads as an error
  }
  const bool sent_cert = !config.cert_pem.empty();
  if (sent_cert) {
    std::unique_ptr<BIO, BioFree> cb(BIO_new_mem_buf(config.cert_pem.data(), static_cast<int>(config.cert_pem.size())));
    std::unique_ptr<X509, X509Free> leaf(PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr));
    if (leaf) SSL_CTX_use_certificate(ctx.get(), leaf.get());
    while (X509* extra = PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr)) {
      SSL_CTX_add_extra_chain_cert(ctx.get(), extra);  // takes ownership
    }
    std::unique_ptr<BIO, BioFree> kb(BIO_new_mem_buf(config.key_pem.data(), static_cast<int>(config.key_pem.size())));
    std::unique_ptr<EVP_PKEY, PkeyFree> key(PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr));
    if (key) SSL_CTX_use_PrivateKey(ctx.get(), key.get());
    ERR_clear_error();
  }
  // gRPC servers insist on ALPN h2.
  static const unsigned char kAlpn[] = {2, 'h', '2'};
  SSL_CTX_set_alpn_protos(ctx.get(), kAlpn, sizeof(kAlpn));
  if (!sent_cert) SSL_CTX_set_client_cert_cb(ctx.get(), OnCertRequest);

  std::unique_ptr<SSL, SslFree> ssl(SSL_new(ctx.get()));
  SSL_set_fd(ssl.get(), fd);
  const std::string name = config.server_name.empty() ? host : config.server_name;
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl.get());
  if (X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str()) != 1) {
    ERR_clear_error();
    X509_VERIFY_PARAM_set1_host(param, name.c_str(), 0);
    SSL_set_tlsext_host_name(ssl.get(), name.c_str());
  }

  std::string verdict;
  if (SSL_connect(ssl.get()) != 1) {
    const long verify = SSL_get_verify_result(ssl.get());
    const std::string errors = DrainErrors();
    if (verify != X509_V_OK) {
      const bool name_mismatch = verify == X509_V_ERR_HOSTNAME_MISMATCH || verify == X509_V_ERR_IP_ADDRESS_MISMATCH;
      verdict = name_mismatch
                    ? absl::StrCat("the server's certificate does not cover the name '", name,
                                   "' (", X509_verify_cert_error_string(verify),
                                   "): dial a name in its subjectAltName or pass --tls-server-name")
                    : absl::StrCat("the server's certificate did not verify against --tls-ca (",
                                   X509_verify_cert_error_string(verify),
                                   "): --tls-ca must be the CA that signed the server certificate");
    } else if (errors.empty() || absl::StrContains(errors, "unexpected eof")) {
      verdict = ExplainClosed(ssl.get(), config.cert_pem,
                              SSL_get_ex_data(ssl.get(), CertRequestedIndex()) != nullptr);
    } else {
      verdict = ExplainAlert(errors, sent_cert);
    }
  } else {
    // TLS 1.3 checks the client certificate after the client's side of the handshake is done:
    // a refusal arrives as an alert on the first read. A server that accepted us sends its HTTP/2
    // SETTINGS instead (or nothing until the client preface: the read times out).
    static const char kPreface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    SSL_write(ssl.get(), kPreface, sizeof(kPreface) - 1);
    char buf[64];
    if (SSL_read(ssl.get(), buf, sizeof(buf)) <= 0) {
      const int err = errno;
      const std::string errors = DrainErrors();
      if (errors.empty() || absl::StrContains(errors, "unexpected eof")) {
        // EOF rather than a read timeout: the server hung up on an accepted handshake.
        if (err != EAGAIN && err != EWOULDBLOCK) {
          verdict = ExplainClosed(ssl.get(), config.cert_pem,
                                  SSL_get_ex_data(ssl.get(), CertRequestedIndex()) != nullptr);
        }
      } else {
        verdict = ExplainAlert(errors, sent_cert);
      }
    }
    SSL_shutdown(ssl.get());
  }
  ERR_clear_error();
  ssl.reset();
  close(fd);
  return verdict;
}

}  // namespace fibquant::cli
