// Command-line plumbing of fibquant-server: dashed flag names on top of Abseil flags, and a --help
// text that lists every server flag with its default.
//
// Abseil flag names are C identifiers (`data_dir`); operators type `--data-dir`. The argument
// vector is rewritten before absl::ParseCommandLine so both spellings work, and --help prints the
// dashed spelling.
// Ownership: plain functions over values. Thread safety: call from main before starting threads
// (Abseil's flag registry is process-wide).
#ifndef FIBQUANT_SERVER_OPTIONS_FLAGS_H_
#define FIBQUANT_SERVER_OPTIONS_FLAGS_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

namespace fibquant::server {

// Copies argv, turning '-' into '_' in the name part of every `--name[=value]` argument (not in
// values, not after a bare `--`, not in single-dash arguments).
std::vector<std::string> NormalizeFlagArgs(int argc, const char* const* argv);

// True when the arguments ask for help (`--help`, `-h`, `-help`).
bool WantsHelp(const std::vector<std::string>& args);

// Usage text: `summary`, then every registered flag defined in a source file whose path ends with
// `defined_in` (e.g. "server/main.cc"), sorted by name, as `--dashed-name=<default>` plus its help.
std::string FlagsHelp(std::string_view summary, std::string_view defined_in);

// Checks a listen address before anything binds it: `host:port` or `[v6]:port` with a decimal port
// in [0, 65535] (gRPC would silently wrap 99999 to 34463), or `unix:`/`unix-abstract:` for gRPC.
// InvalidArgument naming `flag` otherwise.
absl::Status ValidateListenAddress(std::string_view flag, const std::string& listen,
                                   bool allow_unix);

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_OPTIONS_FLAGS_H_
