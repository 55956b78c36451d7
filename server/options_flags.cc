#include "server/options_flags.h"

#include <algorithm>
#include <utility>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"

namespace fibquant::server {

std::vector<std::string> NormalizeFlagArgs(int argc, const char* const* argv) {
  std::vector<std::string> out;
  out.reserve(static_cast<size_t>(argc));
  bool flags_done = false;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (i > 0 && !flags_done) {
      if (arg == "--") {
        flags_done = true;
      } else if (arg.size() > 2 && arg[0] == '-' && arg[1] == '-') {
        const size_t end = std::min(arg.find('='), arg.size());
        std::replace(arg.begin() + 2, arg.begin() + static_cast<std::ptrdiff_t>(end), '-', '_');
      }
    }
    out.push_back(std::move(arg));
  }
  return out;
}

bool WantsHelp(const std::vector<std::string>& args) {
  for (size_t i = 1; i < args.size(); ++i) {
    if (args[i] == "--") break;
    if (args[i] == "--help" || args[i] == "-h" || args[i] == "-help") return true;
  }
  return false;
}

std::string FlagsHelp(std::string_view summary, std::string_view defined_in) {
  std::vector<const absl::CommandLineFlag*> flags;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    const std::string file = flag->Filename();
    if (file.size() >= defined_in.size() &&
        file.compare(file.size() - defined_in.size(), defined_in.size(), defined_in) == 0) {
      flags.push_back(flag);
    }
  }
  std::sort(flags.begin(), flags.end(), [](const auto* a, const auto* b) {
    return a->Name() < b->Name();
  });
  std::string out = std::string(summary);
  out += "\n\nFlags (also accepted with underscores, e.g. --data_dir):\n";
  for (const auto* flag : flags) {
    std::string name = absl::StrReplaceAll(flag->Name(), {{"_", "-"}});
    std::string def = flag->DefaultValue();
    if (def.empty()) def = "\"\"";
    absl::StrAppend(&out, "  --", name, "  (default: ", def, ")\n      ", flag->Help(), "\n");
  }
  return out;
}

absl::Status ValidateListenAddress(std::string_view flag, const std::string& listen,
                                   bool allow_unix) {
  auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(flag), "=", listen, ": ",
                                                   std::string(why)));
  };
  if (listen.starts_with("unix:") || listen.starts_with("unix-abstract:")) {
    if (!allow_unix) return bad("Unix sockets are not supported here");
    return absl::OkStatus();
  }
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) return bad("expected host:port");
  if (listen.front() == '[' && listen[colon - 1] != ']') return bad("expected [v6-address]:port");
  const std::string port = listen.substr(colon + 1);
  if (port.empty() || port.size() > 5 ||
      port.find_first_not_of("0123456789") != std::string::npos || std::stoul(port) > 65535) {
    return bad("port must be a number in [0, 65535]");
  }
  return absl::OkStatus();
}

}  // namespace fibquant::server
