// Fuzz target: the registry's loader of its own data directory (server/registry.cc), which runs at
// every server start on files a crash, a full disk or an operator may have damaged. A crash here is
// a crash loop; a damaged file loaded as valid is a silent wrong codebook.
// Input: byte 0 bit 0 picks the file kind (0: profiles/<digest>.json, 1: receipts/<id>.json); bit 1
// "reseals" the file so the fuzzer gets past the checksums: for a profile, the "digest" field is set
// to the digest recomputed from its "profile_json" (so mutations reach the codebook checks); for a
// receipt, "sha256" is recomputed over "receipt". The file is named after the digest / receipt_id it
// declares (when that is a plain file name), so the name check is reachable too.
// Invariants: Registry::Open succeeds; the one file is either loaded or quarantined, never both or
// neither; a loaded profile is the one its name and digest say (Lookup, compiled codec digest,
// profile JSON re-digests to it), still in profiles/; a quarantined one is in quarantine/ only; a
// loaded receipt is found by its id.
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/digest.h"
#include "core/kv_profile.h"
#include "server/registry.h"
#include "tests/fuzz/fuzz_util.h"
#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using fibquant::server::Registry;
using fibquant::server::RegistryOptions;
using nlohmann::json;

namespace {

const fs::path& BaseDir() {
  static const fs::path dir = [] {
    std::string tmpl = (fs::temp_directory_path() / "fq_registry_fuzz_XXXXXX").string();
    FQ_FUZZ_CHECK(mkdtemp(tmpl.data()) != nullptr);
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(BaseDir(), ec);
    });
    return fs::path(tmpl);
  }();
  return dir;
}

// `name` if it is a plain, short file name ending in .json; otherwise a fixed one.
std::string SafeName(const std::string& name) {
  if (name.size() < 6 || name.size() > 200 || name.find('/') != std::string::npos ||
      name.find('\0') != std::string::npos || !name.ends_with(".json") || name.starts_with(".")) {
    return "fuzz.json";
  }
  return name;
}

size_t CountFiles(const fs::path& dir) {
  std::error_code ec;
  size_t n = 0;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) ++n;
  return n;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool receipt = (data[0] & 1) != 0;
  const bool reseal = (data[0] & 2) != 0;
  std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);

  std::string name = "fuzz.json";
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_object()) {
    if (!receipt) {
      if (reseal) {
        auto pj = j.find("profile_json");
        if (pj != j.end() && pj->is_string()) {
          auto p = fibquant::KvCompressionProfile::FromJson(pj->get<std::string>());
          if (p.ok()) {
            if (auto d = p->Digest(); d.ok()) j["digest"] = *d;
          }
        }
        text = j.dump();
      }
      auto d = j.find("digest");
      if (d != j.end() && d->is_string()) name = SafeName(Registry::EntryFileName(d->get<std::string>()));
    } else {
      auto body = j.find("receipt");
      if (body != j.end() && body->is_string()) {
        if (reseal) {
          j["sha256"] = fibquant::Sha256Digest(body->get<std::string>());
          text = j.dump();
        }
        json b = json::parse(body->get<std::string>(), nullptr, false);
        if (b.is_object()) {
          for (const char* key : {"receiptId", "receipt_id"}) {
            auto id = b.find(key);
            if (id != b.end() && id->is_string()) name = SafeName(id->get<std::string>() + ".json");
          }
        }
      }
    }
  }

  const fs::path dir = BaseDir() / "d";
  std::error_code ec;
  fs::remove_all(dir, ec);
  const char* kind = receipt ? "receipts" : "profiles";
  fs::create_directories(dir / kind, ec);
  FQ_FUZZ_CHECK(!ec);
  {
    std::ofstream f(dir / kind / name, std::ios::binary);
    f.write(text.data(), static_cast<std::streamsize>(text.size()));
    FQ_FUZZ_CHECK(f.good());
  }

  RegistryOptions options;
  options.data_dir = dir.string();
  auto reg = Registry::Open(options, nullptr);
  FQ_FUZZ_CHECK(reg.ok());
  const size_t loaded = receipt ? (*reg)->receipt_count() : (*reg)->size();
  const uint64_t quarantined = (*reg)->quarantined();
  FQ_FUZZ_CHECK(loaded + quarantined == 1);
  FQ_FUZZ_CHECK(receipt ? (*reg)->size() == 0 : (*reg)->receipt_count() == 0);
  if (quarantined == 1) {
    FQ_FUZZ_CHECK(CountFiles(dir / kind) == 0);
    FQ_FUZZ_CHECK(CountFiles(dir / "quarantine") == 1);
    return 0;
  }
  FQ_FUZZ_CHECK(CountFiles(dir / kind) == 1 && fs::exists(dir / kind / name));
  if (!receipt) {
    auto all = (*reg)->List("", 10);
    FQ_FUZZ_CHECK(all.size() == 1);
    const auto& e = *all[0];
    FQ_FUZZ_CHECK(Registry::EntryFileName(e.digest) == name);
    FQ_FUZZ_CHECK((*reg)->Lookup(e.digest).ok());
    FQ_FUZZ_CHECK(e.codec != nullptr && e.codec->profile_digest() == e.digest);
    auto p = fibquant::KvCompressionProfile::FromJson(e.profile_json);
    FQ_FUZZ_CHECK(p.ok());
    auto d = p->Digest();
    FQ_FUZZ_CHECK(d.ok() && *d == e.digest);
  } else {
    // The loader checked the id against the file name: the id is the name without ".json".
    auto r = (*reg)->GetReceipt(name.substr(0, name.size() - 5));
    FQ_FUZZ_CHECK(r.ok() && r->receipt_id() + ".json" == name);
  }
  return 0;
}
