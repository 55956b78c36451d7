// Explains a failed TLS connection in the operator's terms.
//
// When a TLS handshake fails, gRPC's client reports only UNAVAILABLE with "Socket closed" or
// "failed to connect to all addresses": the reason (the server's certificate is not signed by
// --tls-ca, it does not cover the dialed name, the server requires a client certificate, or it
// refused the one presented) stays inside the TLS stack. After such a failure the CLI repeats the
// handshake itself with OpenSSL, using the same files, and reports what the handshake says.
//
// Ownership: plain functions. Thread safety: safe to call concurrently (own SSL objects per call).
#ifndef FIBQUANT_CLIENT_CLI_TLS_DIAGNOSE_H_
#define FIBQUANT_CLIENT_CLI_TLS_DIAGNOSE_H_

#include <chrono>
#include <string>

namespace fibquant::cli {

struct TlsProbeConfig {
  std::string target;        // host:port, [v6]:port (unix: and other schemes are not probed)
  std::string ca_pem;        // roots that must have signed the server certificate
  std::string cert_pem;      // client certificate chain (empty: none)
  std::string key_pem;       // its key
  std::string server_name;   // name to verify instead of the target's host (empty: the host)
  std::chrono::milliseconds timeout{3000};  // connect, handshake and the post-handshake read
};

// One sentence saying what is wrong with the TLS connection to `config.target`, or "" when the
// handshake (and the server's acceptance of the client certificate) succeeds or the target cannot
// be reached at all (then the original error already says so).
std::string DiagnoseTls(const TlsProbeConfig& config);

}  // namespace fibquant::cli

#endif  // FIBQUANT_CLIENT_CLI_TLS_DIAGNOSE_H_
