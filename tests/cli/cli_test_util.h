// Helpers for the end-to-end tests of the `fibquant` binary (tests/cli/*_e2e_test.cc): run the
// real CLI as a child process bounded by timeout(1) and capture its exit code, stdout and stderr;
// and CliServer, a real fibquant-server on 127.0.0.1 with a free port and a scratch directory
// that CLI runs are pointed at. Server processes, temp dirs and file helpers come from
// tests/server/ops_test_util.h; this header adds only the CLI side.
//
// Needs FQ_CLI_BINARY, FQ_SERVER_BINARY and FQ_TEST_DATA_DIR (tests/cli/CMakeLists.txt).
// Ownership: a CliServer owns its server process and directory (both removed by the destructor).
// Thread safety: none; use from the test thread.
#ifndef FIBQUANT_TESTS_CLI_CLI_TEST_UTIL_H_
#define FIBQUANT_TESTS_CLI_CLI_TEST_UTIL_H_

#include <sys/wait.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tests/server/ops_test_util.h"

namespace fibquant::cli::testing {

using ::fibquant::server::testing::ReadWholeFile;
using ::fibquant::server::testing::ServerProcess;
using ::fibquant::server::testing::TempDir;
using ::fibquant::server::testing::WriteWholeFile;

struct RunResult {
  int code = -1;  // exit code; -1 when killed by a signal
  std::string out;
  std::string err;
};

// Runs `binary args...` (each argument single-quoted for the shell) under `timeout
// <timeout_seconds>`, stdout and stderr to numbered files in `scratch_dir`.
inline RunResult RunCliBinary(const std::vector<std::string>& args, const std::filesystem::path& scratch_dir,
                              int timeout_seconds = 300, const std::string& binary = FQ_CLI_BINARY) {
  static std::atomic<int> counter{0};
  const int n = counter.fetch_add(1);
  const std::string out = (scratch_dir / ("run" + std::to_string(n) + ".out")).string();
  const std::string err = (scratch_dir / ("run" + std::to_string(n) + ".err")).string();
  std::string cmd = "timeout " + std::to_string(timeout_seconds) + " " + binary;
  for (const auto& a : args) cmd += " '" + a + "'";
  cmd += " >" + out + " 2>" + err;
  const int st = std::system(cmd.c_str());
  RunResult r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = ReadWholeFile(out);
  r.err = ReadWholeFile(err);
  return r;
}

// A fibquant-server (plaintext, 127.0.0.1, free port, no metrics listener, 2 workers, data dir in
// its own TempDir) and CLI runs against it.
class CliServer {
 public:
  // Starts the server with the flags above plus `extra_args`; returns the server log if it does
  // not come up (nullopt when it does).
  std::optional<std::string> Start(const std::vector<std::string>& extra_args = {}) {
    std::vector<std::string> args = {"--listen=127.0.0.1:0", "--metrics-listen=", "--workers=2",
                                     "--data-dir=" + (dir_.path() / "data").string()};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    server_.Start(args, dir_.path());
    auto port = server_.WaitForPort();
    if (!port) return server_.Log();
    address_ = "127.0.0.1:" + std::to_string(*port);
    return std::nullopt;
  }

  // "127.0.0.1:<port>" once started.
  const std::string& address() const { return address_; }
  // A file in the scratch directory.
  std::string Path(const std::string& name) const { return (dir_.path() / name).string(); }
  const std::filesystem::path& dir() const { return dir_.path(); }
  ServerProcess& server() { return server_; }

  // Runs the CLI with --server=<this server> appended (unless `with_server` is false).
  RunResult Run(std::vector<std::string> args, bool with_server = true) const {
    if (with_server) args.push_back("--server=" + address_);
    return RunCliBinary(args, dir_.path());
  }

 private:
  TempDir dir_;  // declared first: destroyed after the server that writes into it
  ServerProcess server_;
  std::string address_;
};

}  // namespace fibquant::cli::testing

#endif  // FIBQUANT_TESTS_CLI_CLI_TEST_UTIL_H_
