// The `fibquant` command line: argument parsing and every command (profile register/get/list,
// compress, decompress, receipt, eval, info, health, bench). main.cc only forwards argv here, so
// the whole CLI is one library function tests can call. The commands live in client/cli/cli*.cc,
// split by command family (client/cli/cli_internal.h lists them).
//
// Exit codes: 0 success; 1 failure (RPC error, bad input file, failed round-trip check); 2 usage
// error (unknown command or flag, missing or malformed flag value); 3 `eval` ran but a report is
// over its quality budget. `health` exits 1 when the service is not SERVING. Results are printed to stdout (JSON), messages and the progress bar to
// stderr ("fibquant <command>: error: <CODE>: <message>").
//
// Ownership: the CLI engineer. Thread safety: RunCli is reentrant (no global state besides the
// output streams it is given).
#ifndef FIBQUANT_CLIENT_CLI_CLI_H_
#define FIBQUANT_CLIENT_CLI_CLI_H_

#include <ostream>
#include <string>
#include <vector>

namespace fibquant::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitOverBudget = 3;

// `args` excludes the program name.
int RunCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace fibquant::cli

#endif  // FIBQUANT_CLIENT_CLI_CLI_H_
