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

}  // namespace fibquant::server
