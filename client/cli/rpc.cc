#include "client/cli/rpc.h"

#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/cli/tensor_io.h"

namespace fibquant::cli {
namespace {

namespace v1 = fibquant::v1;
using Clock = std::chrono::steady_clock;

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, const char* flag) {
  auto s = ReadFile(path, 1 << 20);
  if (!s.ok()) {
    return absl::Status(s.status().code(), absl::StrCat(flag, ": ", s.status().message()));
  }
  return s;
}

// Runs one bidirectional stream: header, then n requests with at most `window` unanswered, answers
// read concurrently. `on_response` returns true for a page answer (frees a window slot), false for
// a trailing receipt, or an error that cancels the stream. `sent[i]` records when request i left.
template <typename Req, typename Resp>
absl::Status RunStream(grpc::ClientContext& ctx, grpc::ClientReaderWriter<Req, Resp>& stream,
                       const Req& header, size_t n, const std::function<Req(size_t)>& make_request,
                       const std::function<absl::StatusOr<bool>(Resp&)>& on_response, size_t window,
                       std::vector<Clock::time_point>& sent, const char* method) {
  absl::Mutex mu;
  absl::CondVar cv;
  size_t inflight = 0;
  bool reader_done = false;
  absl::Status local;  // first client-side error (order, content)
  if (window == 0) window = 1;
  std::thread reader([&] {
    Resp resp;
    while (stream.Read(&resp)) {
      absl::StatusOr<bool> page = on_response(resp);
      absl::MutexLock lock(&mu);
      if (!page.ok()) {
        if (local.ok()) local = page.status();
        ctx.TryCancel();
        continue;  // drain until the cancelled stream ends
      }
      if (*page && inflight > 0) {
        --inflight;
        cv.Signal();
      }
    }
    absl::MutexLock lock(&mu);
    reader_done = true;
    cv.Signal();
  });
  bool ok = stream.Write(header);
  for (size_t i = 0; ok && i < n; ++i) {
    {
      absl::MutexLock lock(&mu);
      while (inflight >= window && !reader_done) cv.Wait(&mu);
      if (reader_done) break;
      ++inflight;
      sent[i] = Clock::now();
    }
    ok = stream.Write(make_request(i));
  }
  stream.WritesDone();
  reader.join();
  grpc::Status st = stream.Finish();
  if (!local.ok()) return local;
  if (!st.ok()) return client::ToAbslStatus(st, method);
  return absl::OkStatus();
}

}  // namespace

bool IsLoopbackTarget(const std::string& target) {
  std::string t = target;
  if (t.starts_with("unix:")) return true;
  if (t.starts_with("ipv4:")) t = t.substr(5);
  if (t.starts_with("ipv6:")) t = t.substr(5);
  if (t.starts_with("dns:///")) t = t.substr(7);
  std::string host;
  if (t.starts_with("[")) {
    size_t close = t.find(']');
    if (close == std::string::npos) return false;
    host = t.substr(1, close - 1);
  } else {
    size_t colon = t.rfind(':');
    host = colon == std::string::npos ? t : t.substr(0, colon);
  }
  host = absl::AsciiStrToLower(host);
  return host == "localhost" || host == "::1" || host.starts_with("127.");
}

absl::StatusOr<Connection> Connect(const ConnectionFlags& f) {
  Connection c;
  if (f.server.empty()) return absl::InvalidArgumentError("--server is empty");
  if ((!f.tls_cert.empty()) != (!f.tls_key.empty())) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key must be given together (mTLS)");
  }
  if (!f.tls_cert.empty() && f.tls_ca.empty()) {
    return absl::InvalidArgumentError("--tls-cert needs --tls-ca (the CA that signed the server)");
  }
  if (!f.tls_server_name.empty() && f.tls_ca.empty()) {
    return absl::InvalidArgumentError("--tls-server-name needs --tls-ca");
  }
  if (f.tls_ca.empty()) {
    c.channel = client::MakeInsecureChannel(f.server, f.connection);
  } else {
    client::TlsChannelConfig tls;
    auto ca = ReadSmallFile(f.tls_ca, "--tls-ca");
    if (!ca.ok()) return ca.status();
    tls.root_certs_pem = *ca;
    if (!f.tls_cert.empty()) {
      auto cert = ReadSmallFile(f.tls_cert, "--tls-cert");
      if (!cert.ok()) return cert.status();
      auto key = ReadSmallFile(f.tls_key, "--tls-key");
      if (!key.ok()) return key.status();
      tls.client_cert_chain_pem = *cert;
      tls.client_key_pem = *key;
    }
    tls.server_name_override = f.tls_server_name;
    c.channel = client::MakeTlsChannel(f.server, tls, f.connection);
  }
  if (!f.token_file.empty()) {
    auto token = ReadSmallFile(f.token_file, "--token-file");
    if (!token.ok()) return token.status();
    std::string t(absl::StripAsciiWhitespace(*token));
    if (t.empty()) return absl::InvalidArgumentError(absl::StrCat("--token-file ", f.token_file, " is empty"));
    c.client_options.admin_token = t;
  }
  if (f.deadline) {
    c.client_options.unary_timeout = *f.deadline;
    c.client_options.register_timeout = *f.deadline;
    c.client_options.stream_timeout = *f.deadline;
  }
  c.unary_deadline = c.client_options.unary_timeout;
  c.stream_deadline = c.client_options.stream_timeout;
  c.stub = v1::KvCompressionService::NewStub(c.channel);
  return c;
}

absl::StatusOr<CompressStreamResult> CompressStream(v1::KvCompressionService::Stub& stub,
                                                    const v1::CompressStreamHeader& header,
                                                    std::span<const v1::RawPage> pages,
                                                    const StreamOptions& options, const PageCallback& on_page) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + options.deadline);
  if (!options.bearer_token.empty()) ctx.AddMetadata("authorization", absl::StrCat("Bearer ", options.bearer_token));
  auto stream = stub.CompressPages(&ctx);
  CompressStreamResult out;
  out.pages.reserve(pages.size());
  out.latency_seconds.reserve(pages.size());
  std::vector<Clock::time_point> sent(pages.size());
  bool have_receipt = false;
  uint64_t bytes_done = 0;
  v1::CompressPagesRequest hreq;
  *hreq.mutable_header() = header;
  absl::Status st = RunStream<v1::CompressPagesRequest, v1::CompressPagesResponse>(
      ctx, *stream, hreq, pages.size(),
      [&](size_t i) {
        v1::CompressPagesRequest r;
        *r.mutable_page() = pages[i];
        r.mutable_page()->set_client_sequence(i);
        return r;
      },
      [&](v1::CompressPagesResponse& resp) -> absl::StatusOr<bool> {
        if (resp.has_receipt()) {
          if (have_receipt) return absl::InternalError("CompressPages: server sent two receipts");
          have_receipt = true;
          out.receipt = std::move(*resp.mutable_receipt());
          return false;
        }
        const size_t i = out.pages.size();
        if (!resp.has_page() || i >= pages.size() || resp.page().sequence() != i ||
            resp.page().client_sequence() != i) {
          return absl::InternalError(absl::StrCat("CompressPages: answer out of order at page ", i));
        }
        out.latency_seconds.push_back(std::chrono::duration<double>(Clock::now() - sent[i]).count());
        out.pages.push_back(std::move(*resp.mutable_page()));
        bytes_done += pages[i].data().size();
        if (on_page) on_page(out.pages.size(), bytes_done);
        return true;
      },
      options.window, sent, "CompressPages");
  if (!st.ok()) return st;
  if (out.pages.size() != pages.size()) {
    return absl::InternalError(absl::StrCat("CompressPages: server answered ", out.pages.size(), " of ",
                                            pages.size(), " pages"));
  }
  if (!have_receipt) return absl::InternalError("CompressPages: stream ended without a receipt");
  return out;
}

absl::StatusOr<DecompressStreamResult> DecompressStream(v1::KvCompressionService::Stub& stub,
                                                        const v1::DecompressStreamHeader& header,
                                                        std::span<const std::string> frames,
                                                        const StreamOptions& options,
                                                        const PageCallback& on_page) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + options.deadline);
  if (!options.bearer_token.empty()) ctx.AddMetadata("authorization", absl::StrCat("Bearer ", options.bearer_token));
  auto stream = stub.DecompressPages(&ctx);
  DecompressStreamResult out;
  out.pages.reserve(frames.size());
  out.latency_seconds.reserve(frames.size());
  std::vector<Clock::time_point> sent(frames.size());
  uint64_t bytes_done = 0;
  v1::DecompressPagesRequest hreq;
  *hreq.mutable_header() = header;
  absl::Status st = RunStream<v1::DecompressPagesRequest, v1::DecompressPagesResponse>(
      ctx, *stream, hreq, frames.size(),
      [&](size_t i) {
        v1::DecompressPagesRequest r;
        r.mutable_frame()->set_frame(frames[i]);
        r.mutable_frame()->set_client_sequence(i);
        return r;
      },
      [&](v1::DecompressPagesResponse& resp) -> absl::StatusOr<bool> {
        if (resp.has_receipt()) {
          out.receipt = std::move(*resp.mutable_receipt());
          return false;
        }
        const size_t i = out.pages.size();
        if (!resp.has_page() || i >= frames.size() || resp.page().sequence() != i ||
            resp.page().client_sequence() != i) {
          return absl::InternalError(absl::StrCat("DecompressPages: answer out of order at page ", i));
        }
        out.latency_seconds.push_back(std::chrono::duration<double>(Clock::now() - sent[i]).count());
        bytes_done += resp.page().data().size();
        out.pages.push_back(std::move(*resp.mutable_page()));
        if (on_page) on_page(out.pages.size(), bytes_done);
        return true;
      },
      options.window, sent, "DecompressPages");
  if (!st.ok()) return st;
  if (out.pages.size() != frames.size()) {
    return absl::InternalError(absl::StrCat("DecompressPages: server answered ", out.pages.size(), " of ",
                                            frames.size(), " frames"));
  }
  return out;
}

}  // namespace fibquant::cli
