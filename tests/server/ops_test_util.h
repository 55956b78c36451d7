// Helpers for the ops tests: run the real fibquant-server binary as a child process on 127.0.0.1,
// find the port it bound, signal it, collect its exit status; a health check over a generic
// stub (no generated health code needed); and a minimal HTTP GET for /metrics.
//
// Ownership: a ServerProcess owns its child; the destructor kills (SIGKILL) and reaps a child that
// is still running, so a failing test never leaves a server behind.
// Thread safety: none; use from the test thread.
#ifndef FIBQUANT_TESTS_SERVER_OPS_TEST_UTIL_H_
#define FIBQUANT_TESTS_SERVER_OPS_TEST_UTIL_H_

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"

namespace fibquant::server::testing {

inline std::string ReadWholeFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void WriteWholeFile(const std::filesystem::path& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

// A fresh directory under TEST_TMPDIR (or /tmp), removed by the destructor.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TEST_TMPDIR");
    std::string tmpl = std::string(base != nullptr ? base : "/tmp") + "/fq-ops-XXXXXX";
    char* made = mkdtemp(tmpl.data());
    path_ = made != nullptr ? made : tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// The repository root, derived from the test data dir the build passes in.
inline std::filesystem::path SourceRoot() {
  return std::filesystem::path(FQ_TEST_DATA_DIR).parent_path().parent_path();
}

// Bounded waits: generous so a loaded 2-core machine never flakes; they bound a hang, they do not
// assert speed.
inline constexpr std::chrono::seconds kStartTimeout{120};
inline constexpr std::chrono::seconds kExitTimeout{120};

class ServerProcess {
 public:
  ServerProcess() = default;
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;
  ~ServerProcess() {
    if (pid_ > 0 && !exit_status_) {
      kill(pid_, SIGKILL);
      int st = 0;
      waitpid(pid_, &st, 0);
    }
  }

  // Starts `binary` (default FQ_SERVER_BINARY) with `args`; stdout and stderr go to a log file in
  // `log_dir`.
  void Start(const std::vector<std::string>& args, const std::filesystem::path& log_dir,
             const std::string& binary = FQ_SERVER_BINARY) {
    log_path_ = log_dir / "server.log";
    std::vector<std::string> argv_store{binary};
    argv_store.insert(argv_store.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_store) argv.push_back(a.data());
    argv.push_back(nullptr);
    const std::string log = log_path_.string();
    // Truncated here, before the fork: truncating in the child raced with WaitForPort, which could
    // read the "serving" line of the previous server run with the same log dir and signal the new
    // child before it had blocked SIGTERM.
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    pid_ = fork();
    if (pid_ == 0) {
      if (fd >= 0) {
        dup2(fd, 1);  // dup2 clears O_CLOEXEC on the copies
        dup2(fd, 2);
      }
      execv(argv[0], argv.data());
      _exit(127);
    }
    if (fd >= 0) close(fd);
  }

  // Waits until the server logs its "serving ... on host:port" line and returns the port, or
  // nullopt if it exits (or hangs) first.
  std::optional<int> WaitForPort() {
    static const std::regex kServing(R"(serving \S+ on [^ ]+:(\d+) )");
    const auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
    while (std::chrono::steady_clock::now() < deadline) {
      std::smatch m;
      std::string log = Log();
      if (std::regex_search(log, m, kServing)) return std::stoi(m[1]);
      if (Poll()) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return std::nullopt;
  }

  // Waits for the process to exit; returns its exit code (128+signal if killed by a signal), or
  // nullopt if it is still running after kExitTimeout.
  std::optional<int> WaitForExit() {
    const auto deadline = std::chrono::steady_clock::now() + kExitTimeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (Poll()) return exit_status_;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return std::nullopt;
  }

  void Signal(int sig) {
    if (pid_ > 0 && !exit_status_) kill(pid_, sig);
  }

  std::string Log() const { return ReadWholeFile(log_path_); }

  // The child's process id (-1 before Start); e.g. to read /proc/<pid>/status.
  pid_t pid() const { return pid_; }

 private:
  // True once the child has exited (and records its status).
  bool Poll() {
    if (exit_status_) return true;
    int st = 0;
    pid_t r = waitpid(pid_, &st, WNOHANG);
    if (r != pid_) return false;
    exit_status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return true;
  }

  pid_t pid_ = -1;
  std::optional<int> exit_status_;
  std::filesystem::path log_path_;
};

// grpc.health.v1.Health/Check over a generic stub. Request: field 1 (service, string). Response:
// field 1 (status, enum): 1 = SERVING, 2 = NOT_SERVING. Returns the gRPC status and the enum value.
struct HealthResult {
  grpc::Status status;
  int serving_status = 0;
};

inline HealthResult CheckHealth(const std::shared_ptr<grpc::Channel>& channel,
                                const std::string& service) {
  std::string req;
  if (!service.empty()) {
    req.push_back(0x0a);
    req.push_back(static_cast<char>(service.size()));  // names here are < 128 bytes
    req += service;
  }
  grpc::Slice slice(req);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::GenericStub stub(channel);
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status s) { done.set_value(std::move(s)); });
  HealthResult result;
  result.status = done.get_future().get();
  if (result.status.ok()) {
    std::vector<grpc::Slice> slices;
    (void)response.Dump(&slices);
    std::string bytes;
    for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
    // An all-default response (UNKNOWN = 0) is empty; otherwise 0x08 <varint status>.
    result.serving_status = bytes.size() >= 2 && bytes[0] == 0x08 ? bytes[1] : 0;
  }
  return result;
}

// Minimal HTTP/1.0 GET of http://127.0.0.1:<port><path>; returns the whole response ("" when the
// connection fails).
inline std::string HttpGet(int port, const std::string& path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string out;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (write(fd, req.data(), req.size()) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      ssize_t n;
      while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
    }
  }
  close(fd);
  return out;
}

}  // namespace fibquant::server::testing

#endif  // FIBQUANT_TESTS_SERVER_OPS_TEST_UTIL_H_
