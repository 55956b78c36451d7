// fibquant-server: the FibQuant KV compression gRPC service as a process.
//
// Startup: flags -> security checks (TLS files, loopback-only plaintext, admin token) -> metrics
// exposer -> service (opens the data dir) -> preload -> gRPC server with health and reflection.
// Any failure prints one line naming the flag and exits 1 before anything listens.
//
// Shutdown: SIGTERM and SIGINT are blocked in every thread (the mask is set before the first thread
// starts and inherited) and received by one sigwait thread. On a signal: health goes NOT_SERVING
// (overall and for fibquant.v1.KvCompressionService), the service refuses new streams and
// registrations (UNAVAILABLE), and grpc::Server::Shutdown lets running calls finish until
// --drain-seconds have passed, then cancels the rest. The process exits 0.
//
// Thread safety: main() owns everything; the signal thread only touches the server, the service
// and the health service, all of which are thread-safe, and is joined before they are destroyed.
// With TLS and --tls-reload-seconds > 0 the TlsReloader's thread re-checks the certificate files
// and updates the expiry gauge (Metrics is thread-safe); it is joined when the reloader is
// destroyed, after the server and before the metrics.
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/data_dir_lock.h"
#include "server/metrics.h"
#include "server/options_flags.h"
#include "server/reflection_v1.h"
#include "server/security.h"
#include "server/service.h"

namespace {
const fibquant::server::ServiceOptions kDefaults;
}  // namespace

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "gRPC listen address (host:port, [v6]:port or unix:path; port 0 picks a free port). "
          "Plaintext is allowed only on loopback unless --allow-insecure is set.");
ABSL_FLAG(int32_t, workers, 0,
          "Worker threads for encode/decode (0 = one per core); codebook builds run on "
          "--build-workers instead.");
ABSL_FLAG(std::string, data_dir, "./fibquant-data",
          "Directory holding registered profiles and receipts (created if missing; back it up).");
ABSL_FLAG(std::string, preload_dir, "",
          "Directory of profile spec *.json files registered at startup (empty = none). A spec "
          "that fails to register stops the startup.");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9464",
          "Prometheus /metrics HTTP listen address (port 0 picks a free port; empty disables).");
ABSL_FLAG(std::string, tls_cert, "", "PEM server certificate chain; enables TLS (with --tls-key).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle; when set, clients must present a certificate it signed (mTLS).");
ABSL_FLAG(int32_t, tls_reload_seconds, 60,
          "Seconds between checks of --tls-cert/--tls-key/--tls-client-ca for rotated files; a "
          "rotation that passes the startup checks is served without a restart, a bad one is "
          "logged and the last good certificate stays in use (0 = read the files only at startup; "
          "at most 86400).");
ABSL_FLAG(std::string, admin_token_file, "",
          "File holding the admin token (>= 16 printable characters). When set, RegisterProfile "
          "requires metadata 'authorization: Bearer <token>'.");
ABSL_FLAG(bool, allow_insecure, false,
          "Allow plaintext gRPC on a non-loopback --listen address (only behind a trusted proxy "
          "that terminates TLS).");
ABSL_FLAG(uint64_t, max_message_bytes, kDefaults.max_message_bytes,
          "Largest gRPC message received or sent, in bytes.");
ABSL_FLAG(uint64_t, max_page_bytes, kDefaults.max_page_bytes,
          "Largest raw page (CompressPages) or frame (DecompressPages), in bytes.");
ABSL_FLAG(uint32_t, max_inflight_pages_per_stream, kDefaults.max_inflight_pages_per_stream,
          "Pages of one stream in work at once; the server stops reading the stream beyond this.");
ABSL_FLAG(uint32_t, max_concurrent_streams, kDefaults.max_concurrent_streams,
          "CompressPages + DecompressPages streams open at once; more get RESOURCE_EXHAUSTED.");
ABSL_FLAG(uint64_t, max_profile_build_cost, kDefaults.max_profile_build_cost,
          "Largest codebook build accepted, in training_samples x codebook_size x block_dim x "
          "lloyd_iterations x lloyd_restarts units.");
ABSL_FLAG(uint32_t, receipt_retention, kDefaults.receipt_retention,
          "Receipts kept; the oldest are dropped first.");
ABSL_FLAG(uint32_t, max_profiles, kDefaults.max_profiles,
          "Profiles kept in the registry; registering more gets RESOURCE_EXHAUSTED.");
ABSL_FLAG(uint32_t, max_calibrations, kDefaults.max_calibrations,
          "Calibration artifacts kept in the registry; registering more gets RESOURCE_EXHAUSTED.");
ABSL_FLAG(uint32_t, worker_queue_capacity, kDefaults.worker_queue_capacity,
          "Tasks queued on the worker pool beyond which new work is refused or not read.");
ABSL_FLAG(int32_t, build_threads, kDefaults.build_threads,
          "Threads one codebook build may use (0 = one per core); the codebook is identical for "
          "any value.");
ABSL_FLAG(int32_t, build_workers, kDefaults.build_workers,
          "Codebook builds (RegisterProfile, EvaluateQuality candidates) run at once, on a pool of "
          "their own so stream pages never wait behind a build; each uses --build-threads threads. "
          "Builds beyond it queue (up to --worker-queue-capacity, then RESOURCE_EXHAUSTED).");
ABSL_FLAG(uint64_t, max_eval_values, kDefaults.max_eval_values,
          "EvaluateQuality: largest keys/values/queries sample, in floats each.");
ABSL_FLAG(uint32_t, max_eval_profiles, kDefaults.max_eval_profiles,
          "EvaluateQuality: most profiles and candidates per call.");
ABSL_FLAG(double, quality_sample_rate, kDefaults.quality_sample_rate,
          "Fraction of CompressPages pages whose quality (MSE, cosine, attention TV with queries) is "
          "measured and exported per profile as fibquant_sampled_page_distortion (0 = off, 1 = every "
          "page; each sampled page costs one extra decode).");
ABSL_FLAG(int32_t, drain_seconds, 30,
          "On SIGTERM/SIGINT: seconds running calls may take to finish before they are cancelled "
          "(codebook builds still running then stop at their next Lloyd iteration).");
ABSL_FLAG(uint64_t, max_buffered_bytes, kDefaults.max_buffered_bytes,
          "Bytes that requests make the server hold at once, server-wide: decoded pages, raw pages "
          "and frames of streams, GetCodebook answers; counted before allocating. A page that does "
          "not fit waits for its stream's earlier pages, else RESOURCE_EXHAUSTED.");
ABSL_FLAG(int32_t, stream_idle_timeout_seconds, kDefaults.stream_idle_timeout_seconds,
          "Streams (and large unary answers) with no progress for this long are cancelled "
          "(0 = never).");
ABSL_FLAG(uint32_t, max_streams_per_connection, 16,
          "HTTP/2 streams (calls) one client connection may have open at once "
          "(SETTINGS_MAX_CONCURRENT_STREAMS): a fair share of --max-concurrent-streams.");
ABSL_FLAG(int32_t, keepalive_seconds, 60,
          "HTTP/2 keepalive ping interval; a connection that does not answer within 20 s is "
          "closed (0 = no server pings).");
ABSL_FLAG(uint64_t, max_unauthenticated_build_cost, kDefaults.max_unauthenticated_build_cost,
          "With --admin-token-file: largest EvaluateQuality candidate build of a caller without the "
          "token (same units as --max-profile-build-cost); such builds run on a pool of their own.");
ABSL_FLAG(uint64_t, max_build_memory_bytes, kDefaults.max_build_memory_bytes,
          "Largest memory one codebook build may take (estimated before it starts).");
ABSL_FLAG(std::string, frame_key_file, "",
          "File of frame keys ('<id> <hex secret>' per line, the first seals): frames are sealed "
          "with HMAC-SHA256 and only frames sealed with one of these keys decode (others are "
          "DATA_LOSS). Re-read on SIGHUP. Empty: frames carry only a corruption checksum.");

namespace fibquant::server {
namespace {

constexpr char kServiceName[] = "fibquant.v1.KvCompressionService";
constexpr char kUsage[] =
    "FibQuant KV-cache compression gRPC server.\n"
    "Usage: fibquant-server [--flag=value ...]   (see docs/OPERATIONS.md)";

void Log(const std::string& line) {
  std::fprintf(stderr, "fibquant-server: %s\n", line.c_str());
  std::fflush(stderr);
}

// The *.json files PreloadDir reads (it fails the startup on any that does not register).
size_t CountSpecFiles(const std::string& dir) {
  std::error_code ec;
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    if (e.path().extension() == ".json" && e.is_regular_file(ec)) ++n;
  }
  return n;
}

int Fail(const absl::Status& status) {
  Log(absl::StrCat("error: ", status.message()));
  return 1;
}

// Flag values that cannot be expressed by the flag types alone.
absl::Status CheckFlagRanges() {
  if (absl::GetFlag(FLAGS_workers) < 0) {
    return absl::InvalidArgumentError("--workers must be >= 0 (0 = one per core)");
  }
  if (absl::GetFlag(FLAGS_build_threads) < 0) {
    return absl::InvalidArgumentError("--build-threads must be >= 0 (0 = one per core)");
  }
  if (absl::GetFlag(FLAGS_build_workers) < 1) {
    return absl::InvalidArgumentError("--build-workers must be >= 1");
  }
  if (const int32_t r = absl::GetFlag(FLAGS_tls_reload_seconds); r < 0 || r > 86400) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls-reload-seconds must be 0 (no reload) or in [1, 86400], got ", r));
  }
  if (const double r = absl::GetFlag(FLAGS_quality_sample_rate); !(r >= 0 && r <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--quality-sample-rate must be in [0, 1], got ", r));
  }
  if (absl::GetFlag(FLAGS_drain_seconds) < 0) {
    return absl::InvalidArgumentError("--drain-seconds must be >= 0");
  }
  if (absl::GetFlag(FLAGS_stream_idle_timeout_seconds) < 0) {
    return absl::InvalidArgumentError("--stream-idle-timeout-seconds must be >= 0 (0 = never)");
  }
  if (absl::GetFlag(FLAGS_keepalive_seconds) < 0) {
    return absl::InvalidArgumentError("--keepalive-seconds must be >= 0");
  }
  if (absl::GetFlag(FLAGS_max_streams_per_connection) == 0 ||
      absl::GetFlag(FLAGS_max_streams_per_connection) > static_cast<uint32_t>(INT32_MAX)) {
    return absl::InvalidArgumentError("--max-streams-per-connection must be >= 1");
  }
  if (absl::GetFlag(FLAGS_max_buffered_bytes) == 0) {
    return absl::InvalidArgumentError("--max-buffered-bytes must be >= 1");
  }
  // gRPC takes the message limit as an int.
  if (absl::GetFlag(FLAGS_max_message_bytes) == 0 ||
      absl::GetFlag(FLAGS_max_message_bytes) > static_cast<uint64_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-message-bytes must be in [1, ", INT32_MAX, "]"));
  }
  return absl::OkStatus();
}

ServiceOptions ServiceOptionsFromFlags() {
  ServiceOptions o;
  o.data_dir = absl::GetFlag(FLAGS_data_dir);
  o.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  o.max_page_bytes = absl::GetFlag(FLAGS_max_page_bytes);
  o.max_inflight_pages_per_stream = absl::GetFlag(FLAGS_max_inflight_pages_per_stream);
  o.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  o.max_profile_build_cost = absl::GetFlag(FLAGS_max_profile_build_cost);
  o.receipt_retention = absl::GetFlag(FLAGS_receipt_retention);
  o.max_profiles = absl::GetFlag(FLAGS_max_profiles);
  o.max_calibrations = absl::GetFlag(FLAGS_max_calibrations);
  o.worker_threads = absl::GetFlag(FLAGS_workers);
  o.worker_queue_capacity = absl::GetFlag(FLAGS_worker_queue_capacity);
  o.build_threads = absl::GetFlag(FLAGS_build_threads);
  o.build_workers = absl::GetFlag(FLAGS_build_workers);
  o.max_eval_values = absl::GetFlag(FLAGS_max_eval_values);
  o.max_eval_profiles = absl::GetFlag(FLAGS_max_eval_profiles);
  o.max_buffered_bytes = absl::GetFlag(FLAGS_max_buffered_bytes);
  o.stream_idle_timeout_seconds = absl::GetFlag(FLAGS_stream_idle_timeout_seconds);
  o.max_unauthenticated_build_cost = absl::GetFlag(FLAGS_max_unauthenticated_build_cost);
  o.max_build_memory_bytes = absl::GetFlag(FLAGS_max_build_memory_bytes);
  o.quality_sample_rate = absl::GetFlag(FLAGS_quality_sample_rate);
  return o;
}

// What SIGHUP re-reads (any may be null).
struct Reloadables {
  TlsReloader* tls = nullptr;
  AdminTokenHolder* admin_token = nullptr;
  FrameKeyHolder* frame_keys = nullptr;
};

// SIGHUP: re-read the TLS files (at once, instead of at the next --tls-reload-seconds check) and
// the admin token file; whatever fails its checks is kept as it was and logged.
void ReloadOnHangup(const Reloadables& r) {
  Log("received SIGHUP: re-reading the tls and admin token files");
  if (r.tls != nullptr) {
    if (absl::Status s = r.tls->CheckNow(); !s.ok()) {
      Log(absl::StrCat("warning: tls files not reloaded: ", s.message()));
    }
  }
  if (r.admin_token != nullptr) {
    if (absl::Status s = r.admin_token->Reload(); !s.ok()) {
      Log(absl::StrCat("warning: admin token not reloaded, the previous one stays in force: ",
                       s.message()));
    } else {
      Log(absl::StrCat("admin token reloaded from '", r.admin_token->path(), "'"));
    }
  }
  if (r.frame_keys != nullptr) {
    if (absl::Status s = r.frame_keys->Reload(); !s.ok()) {
      Log(absl::StrCat("warning: frame keys not reloaded, the previous ones stay in force: ",
                       s.message()));
    } else {
      Log(absl::StrCat("frame keys reloaded from '", r.frame_keys->path(), "': ",
                       r.frame_keys->Describe()));
    }
  }
  if (r.tls == nullptr && r.admin_token == nullptr && r.frame_keys == nullptr) {
    Log("nothing to reload (no tls, admin token or frame keys)");
  }
}

// Waits for SIGTERM/SIGINT, then drains. SIGHUP reloads (ReloadOnHangup) and SIGUSR1/SIGUSR2 are
// logged and ignored: their default action would kill the process without a drain. Returns after
// grpc::Server::Shutdown has returned.
void DrainOnSignal(const sigset_t* signals, grpc::Server* server, KvCompressionServiceImpl* service,
                   int drain_seconds, Reloadables reloadables) {
  int sig = 0;
  for (;;) {
    if (sigwait(signals, &sig) != 0) sig = SIGTERM;  // cannot happen with a valid set
    if (sig == SIGHUP) {
      ReloadOnHangup(reloadables);
      continue;
    }
    if (sig == SIGUSR1 || sig == SIGUSR2) {
      Log(absl::StrCat("received ", sig == SIGUSR1 ? "SIGUSR1" : "SIGUSR2",
                       ": ignored (SIGTERM or SIGINT drains and stops, SIGHUP reloads)"));
      continue;
    }
    break;
  }
  Log(absl::StrCat("received ", sig == SIGINT ? "SIGINT" : "SIGTERM", ", draining"));
  // NOT_SERVING first, so health probes see the drain; Shutdown() of the health service also
  // freezes the status (later SetServingStatus calls are ignored).
  if (auto* health = server->GetHealthCheckService(); health != nullptr) {
    health->SetServingStatus(false);
    health->Shutdown();
  }
  service->StartDrain();
  Log(absl::StrCat("draining: health NOT_SERVING, new calls refused; running calls have ",
                   drain_seconds, " s to finish"));
  // At the drain deadline the builds still running are cancelled: their reactors then finish
  // (Cancelled) and Shutdown returns, so the process exits within the drain plus one Lloyd
  // iteration rather than after the longest build (issue 14 item 8).
  absl::Notification shut_down;
  std::thread canceller([&shut_down, service, drain_seconds] {
    if (!shut_down.WaitForNotificationWithTimeout(absl::Seconds(drain_seconds))) {
      Log("drain deadline reached: cancelling running calls and codebook builds");
      service->CancelBuilds();
    }
  });
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(drain_seconds));
  shut_down.Notify();
  canceller.join();
}

int Run(int argc, char** argv) {
  // Block the shutdown signals before any thread exists: every thread inherits the mask, so only
  // the sigwait thread ever receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  sigaddset(&signals, SIGUSR1);
  sigaddset(&signals, SIGUSR2);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::SetProgramUsageMessage(kUsage);
  std::vector<std::string> args = NormalizeFlagArgs(argc, argv);
  if (WantsHelp(args)) {
    std::fputs(FlagsHelp(kUsage, "server/main.cc").c_str(), stdout);
    return 0;
  }
  std::vector<char*> arg_ptrs;
  for (auto& a : args) arg_ptrs.push_back(a.data());
  std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(arg_ptrs.size()), arg_ptrs.data());
  if (positional.size() > 1) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("unexpected argument '", positional[1], "' (flags are --name=value)")));
  }
  if (absl::Status s = CheckFlagRanges(); !s.ok()) return Fail(s);

  const std::string listen = absl::GetFlag(FLAGS_listen);
  if (absl::Status s = ValidateListenAddress("--listen", listen, /*allow_unix=*/true); !s.ok()) {
    return Fail(s);
  }
  if (const std::string ml = absl::GetFlag(FLAGS_metrics_listen); !ml.empty()) {
    if (absl::Status s = ValidateListenAddress("--metrics-listen", ml, /*allow_unix=*/false);
        !s.ok()) {
      return Fail(s);
    }
  }
  TlsFlags tls{absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
               absl::GetFlag(FLAGS_tls_client_ca)};
  if (absl::Status s = CheckPlaintextAllowed(listen, tls.enabled(),
                                             absl::GetFlag(FLAGS_allow_insecure));
      !s.ok()) {
    return Fail(s);
  }
  // Created before the credentials so the certificate expiry gauge can be set; the exposer starts
  // below. Declared before the reloader, whose thread updates it, so it outlives that thread.
  Metrics metrics;
  CertificateInfo cert_info;
  std::shared_ptr<grpc::ServerCredentials> creds;
  std::unique_ptr<TlsReloader> reloader;  // outlives the server (declared before it)
  const int32_t reload_seconds = absl::GetFlag(FLAGS_tls_reload_seconds);
  if (tls.enabled() && reload_seconds > 0) {
    auto r = TlsReloader::Create(tls, absl::Seconds(reload_seconds), Log,
                                 [&metrics](absl::Time not_after) {
                                   metrics.SetTlsCertificateExpiry(not_after);
                                 });
    if (!r.ok()) return Fail(r.status());
    reloader = *std::move(r);
    creds = reloader->credentials();
    cert_info = reloader->served();
  } else {
    auto c = MakeServerCredentials(tls, &cert_info);
    if (!c.ok()) return Fail(c.status());
    creds = *std::move(c);
    if (tls.enabled()) metrics.SetTlsCertificateExpiry(cert_info.not_after);
  }
  if (tls.enabled()) {
    Log(absl::StrCat("tls certificate ", cert_info.Describe(),
                     reloader ? absl::StrCat(" (files re-checked every ", reload_seconds,
                                             " s; a valid rotation is served without a restart)")
                              : std::string(" (read once; --tls-reload-seconds=0)")));
    // Warn while there is time to rotate: an expiry while the server runs fails every new
    // handshake until renewed files are in place (and, without reload, the server restarted).
    if (const absl::Duration left = cert_info.not_after - absl::Now(); left < absl::Hours(24 * 14)) {
      Log(absl::StrCat("warning: the tls certificate expires in ",
                       absl::FormatDuration(absl::Trunc(left, absl::Minutes(1))),
                       reloader ? "; renew the files before then (they are reloaded without a "
                                  "restart)"
                                : "; renew it and restart the server before then"));
    }
  }

  std::unique_ptr<FrameKeyHolder> frame_keys;
  if (const std::string path = absl::GetFlag(FLAGS_frame_key_file); !path.empty()) {
    auto keys = FrameKeyHolder::FromFile(path);
    if (!keys.ok()) return Fail(keys.status());
    frame_keys = *std::move(keys);
    Log(absl::StrCat("frame keys from '", path, "': ", frame_keys->Describe(),
                     "; frames are sealed and verified (HMAC-SHA256)"));
  }

  std::unique_ptr<AdminTokenHolder> admin_auth;
  if (const std::string path = absl::GetFlag(FLAGS_admin_token_file); !path.empty()) {
    auto auth = AdminTokenAuth::FromFile(path);
    if (!auth.ok()) return Fail(auth.status());
    admin_auth = std::make_unique<AdminTokenHolder>(path, *std::move(auth));
  }

  if (const std::string ml = absl::GetFlag(FLAGS_metrics_listen); !ml.empty()) {
    auto port = metrics.StartExposer(ml);
    if (!port.ok()) return Fail(port.status());
    Log(absl::StrCat("metrics on http://", ml.substr(0, ml.rfind(':')), ":", *port, "/metrics"));
  }

  // Before the service opens the data dir: a second server on the same dir stops here, naming the
  // holder, instead of sharing (and corrupting) its files.
  auto data_dir_lock = DataDirLock::Acquire(absl::GetFlag(FLAGS_data_dir));
  if (!data_dir_lock.ok()) return Fail(data_dir_lock.status());

  ServiceOptions options = ServiceOptionsFromFlags();
  if (admin_auth != nullptr) {
    // admin_auth outlives the service (declared earlier in this scope).
    options.authorize_admin = [auth = admin_auth.get()](const grpc::ServerContextBase& ctx) {
      return auth->Authorize(ctx);
    };
  }
  if (frame_keys != nullptr) {
    // frame_keys outlives the service (declared earlier in this scope).
    options.frame_keys = [keys = frame_keys.get()] { return keys->Current(); };
  }
  metrics.SetQueueCapacities(options.worker_queue_capacity, options.worker_queue_capacity);
  metrics.WatchDataDir(options.data_dir);
  auto service = KvCompressionServiceImpl::Create(options, &metrics);
  if (!service.ok()) return Fail(service.status());
  if (const std::string dir = absl::GetFlag(FLAGS_preload_dir); !dir.empty()) {
    const size_t before = (*service)->profile_count();
    if (absl::Status s = (*service)->PreloadDir(dir); !s.ok()) {
      return Fail(absl::Status(s.code(), absl::StrCat("--preload-dir=", dir, ": ", s.message())));
    }
    // The registry may already hold profiles from the data dir: say what the preload itself did.
    const size_t specs = CountSpecFiles(dir);
    const size_t added = (*service)->profile_count() - before;
    Log(absl::StrCat("preloaded ", specs, " profile spec", specs == 1 ? "" : "s", " from ", dir,
                     " (", added, " newly registered, ", specs - std::min(specs, added),
                     " already in the data dir); ", (*service)->profile_count(),
                     " profiles registered in total"));
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, creds, &port);
  // gRPC sets SO_REUSEPORT by default, which lets a second server bind the same port and take a
  // share of the connections. An address in use must be a startup error instead.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.RegisterService(service->get());
  ReflectionV1Service reflection_v1(ReflectionV1Service::DefaultServices(kServiceName));
  builder.RegisterService(&reflection_v1);
  const int max_message = static_cast<int>(absl::GetFlag(FLAGS_max_message_bytes));
  builder.SetMaxReceiveMessageSize(max_message);
  builder.SetMaxSendMessageSize(max_message);
  // Connection-level bounds (issue 14 item 3): one connection cannot take every stream slot, and a
  // peer that stops answering keepalive pings is dropped with its streams.
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                             static_cast<int>(absl::GetFlag(FLAGS_max_streams_per_connection)));
  if (const int32_t ka = absl::GetFlag(FLAGS_keepalive_seconds); ka > 0) {
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, ka * 1000);
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || (port == 0 && !listen.starts_with("unix"))) {
    return Fail(absl::UnavailableError(absl::StrCat(
        "--listen=", listen, ": cannot listen (address in use, bad address, or TLS files that "
        "do not match)")));
  }
  if (auto* health = server->GetHealthCheckService(); health != nullptr) {
    health->SetServingStatus(true);
    health->SetServingStatus(kServiceName, true);
  }
  const std::string mode = !tls.enabled()              ? "plaintext"
                           : tls.client_ca_file.empty() ? "tls"
                                                        : "mtls";
  const std::string where = listen.starts_with("unix")
                                ? listen
                                : absl::StrCat(listen.substr(0, listen.rfind(':')), ":", port);
  Log(absl::StrCat("serving ", kServiceName, " on ", where, " (", mode, ", admin token ",
                   admin_auth ? "required" : "not required", ", ",
                   (*service)->profile_count(), " profiles)"));

  if (reloader != nullptr) reloader->Start();

  std::thread signal_thread(DrainOnSignal, &signals, server.get(), service->get(),
                            absl::GetFlag(FLAGS_drain_seconds),
                            Reloadables{reloader.get(), admin_auth.get(), frame_keys.get()});
  server->Wait();
  signal_thread.join();
  server.reset();   // the service must outlive the server
  service->reset();
  Log("stopped");
  return 0;
}

}  // namespace
}  // namespace fibquant::server

int main(int argc, char** argv) { return fibquant::server::Run(argc, argv); }
