#include "server/registry.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/rand.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/codebook.h"
#include "core/codec.h"
#include "core/digest.h"
#include "core/status_macros.h"
#include "google/protobuf/util/json_util.h"
#include "server/metrics.h"
#include <nlohmann/json.hpp>

namespace fibquant::server {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Reads of registry files are bounded so a damaged or planted file cannot exhaust memory; real
// files are far smaller (the codebook of N = 65536, k = 8 is 4 MiB of hex).
constexpr uint64_t kMaxRegistryFileBytes = 512ull << 20;

int64_t NowUnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}


// A failed file operation as a status whose code tells the client who can fix it: a full disk or
// quota (RESOURCE_EXHAUSTED) and a read-only or unwritable data dir (FAILED_PRECONDITION) are the
// operator's to fix, not server bugs; anything else stays INTERNAL.
absl::Status FileError(int err, std::string message) {
  absl::StrAppend(&message, ": ", std::strerror(err));
  switch (err) {
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return absl::ResourceExhaustedError(message);
    case EROFS:
    case EACCES:
    case EPERM:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

std::string HexEncode(const void* data, size_t n) {
  static const char* kHex = "0123456789abcdef";
  const auto* p = static_cast<const uint8_t*>(data);
  std::string out(n * 2, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kHex[p[i] >> 4];
    out[2 * i + 1] = kHex[p[i] & 15];
  }
  return out;
}

absl::Status HexDecode(const std::string& hex, std::vector<uint8_t>* out) {
  if (hex.size() % 2 != 0) return absl::DataLossError("codewords hex has odd length");
  out->resize(hex.size() / 2);
  auto nib = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < out->size(); ++i) {
    int hi = nib(hex[2 * i]), lo = nib(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return absl::DataLossError("codewords hex has a non-hex character");
    (*out)[i] = static_cast<uint8_t>(hi * 16 + lo);
  }
  return absl::OkStatus();
}

[[nodiscard]] absl::StatusOr<std::string> ReadFileBounded(const std::string& path) {
  std::error_code ec;
  uint64_t size = fs::file_size(path, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", ec.message()));
  if (size > kMaxRegistryFileBytes) {
    return absl::DataLossError(absl::StrCat(path, " is ", size, " bytes, above the registry file limit ",
                                            kMaxRegistryFileBytes));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InternalError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json ReportToJson(const LloydReport& r) {
  json events = json::array();
  for (const RepairEvent& e : r.repair_events) {
    events.push_back({{"restart", e.restart},
                      {"iteration", e.iteration},
                      {"empty_cell", e.empty_cell},
                      {"donor_cell", e.donor_cell},
                      {"donor_count_before", e.donor_count_before},
                      {"donor_distortion", e.donor_distortion},
                      {"residual_norm", e.residual_norm}});
  }
  return {{"restarts", r.restarts},       {"iterations", r.iterations}, {"training_samples", r.training_samples},
          {"init_mse", r.init_mse},       {"best_mse", r.best_mse},     {"best_restart", r.best_restart},
          {"repair_events", events},      {"seed", r.seed}};
}

// Checked integer fields of a registry file. nlohmann's get<integer>() converts a float or an
// out-of-range number with a plain cast (undefined for a float beyond the type's range: a damaged
// "seed": 1.9e19 was found by registry_fuzz), so only a JSON integer within range is accepted.
// Throws std::invalid_argument naming the field; the readers turn it into DataLoss.
template <typename T>
T IntField(const json& j, const char* key) {
  const json& v = j.at(key);
  bool ok = false;
  if (v.is_number_unsigned()) {
    ok = v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
  } else if (v.is_number_integer()) {
    const int64_t x = v.get<int64_t>();
    ok = std::numeric_limits<T>::is_signed && x >= static_cast<int64_t>(std::numeric_limits<T>::min());
  }
  if (!ok) {
    throw std::invalid_argument(absl::StrCat("\"", key, "\" is not an integer in [",
                                             std::numeric_limits<T>::min(), ", ",
                                             std::numeric_limits<T>::max(), "]"));
  }
  return v.is_number_unsigned() ? static_cast<T>(v.get<uint64_t>()) : static_cast<T>(v.get<int64_t>());
}

// Throws json::exception on a missing or wrongly typed field, std::invalid_argument on an integer
// field that is not an in-range integer.
LloydReport ReportFromJson(const json& j) {
  LloydReport r;
  r.restarts = IntField<uint32_t>(j, "restarts");
  r.iterations = IntField<uint32_t>(j, "iterations");
  r.training_samples = IntField<uint32_t>(j, "training_samples");
  r.init_mse = j.at("init_mse").get<double>();
  r.best_mse = j.at("best_mse").get<double>();
  r.best_restart = IntField<uint32_t>(j, "best_restart");
  r.seed = IntField<uint64_t>(j, "seed");
  for (const json& e : j.at("repair_events")) {
    RepairEvent ev;
    ev.restart = IntField<uint32_t>(e, "restart");
    ev.iteration = IntField<uint32_t>(e, "iteration");
    ev.empty_cell = IntField<uint32_t>(e, "empty_cell");
    ev.donor_cell = IntField<uint32_t>(e, "donor_cell");
    ev.donor_count_before = IntField<uint64_t>(e, "donor_count_before");
    ev.donor_distortion = e.at("donor_distortion").get<double>();
    ev.residual_norm = e.at("residual_norm").get<double>();
    r.repair_events.push_back(ev);
  }
  return r;
}

std::string SerializeEntry(const ProfileEntry& e) {
  json j;
  j["schema"] = std::string(kRegistryProfileSchema);
  j["digest"] = e.digest;
  j["profile_json"] = e.profile_json;
  j["registered_unix_seconds"] = e.registered_unix_seconds;
  j["build_seconds"] = e.build_seconds;
  j["build_threads"] = e.build_threads;
  const auto& q = e.codec->quantizer();
  if (q) {
    const Codebook& cb = q->codebook();
    j["codebook"] = {{"digest", cb.digest()},
                     {"codewords_f32le_hex",
                      HexEncode(cb.codewords().data(), cb.codewords().size() * sizeof(float))},
                     {"report", ReportToJson(cb.report())}};
  } else {
    j["codebook"] = nullptr;
  }
  return j.dump(1);
}

std::string SerializeReceipt(const fibquant::v1::Receipt& r, uint64_t seq) {
  std::string body;
  google::protobuf::util::JsonPrintOptions opts;
  opts.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(r, &body, opts);
  json j;
  j["schema"] = std::string(kRegistryReceiptSchema);
  j["seq"] = seq;
  j["sha256"] = Sha256Digest(body);
  j["receipt"] = body;
  return j.dump(1);
}

uint64_t ReceiptSeq(const std::string& id) { return Registry::ReceiptSeqOf(id).value_or(0); }

// 8 hex digits from OpenSSL's CSPRNG: tells this process's receipts apart from those of earlier
// runs on the same data dir and of other replicas.
std::string NewInstanceId() {
  unsigned char b[4] = {0, 0, 0, 0};
  if (RAND_bytes(b, sizeof(b)) != 1) {
    // No entropy source: fall back on pid and time, still distinct across restarts in practice.
    const uint64_t x = (static_cast<uint64_t>(::getpid()) << 32) ^
                       static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    for (int i = 0; i < 4; ++i) b[i] = static_cast<unsigned char>((x >> (8 * i)) ^ (x >> (8 * i + 32)));
  }
  return absl::StrFormat("%02x%02x%02x%02x", b[0], b[1], b[2], b[3]);
}

// The `*.json` files of a registry subdirectory, sorted by name (a deterministic load order).
// Leftovers of interrupted atomic writes (`*.tmp.*`) are never complete and are removed on the way.
absl::StatusOr<std::vector<std::string>> ListStoredJsonFiles(const fs::path& dir) {
  std::error_code ec;
  std::vector<std::string> files;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    if (it->path().filename().string().find(".tmp.") != std::string::npos) {
      std::error_code ignored;
      fs::remove(it->path(), ignored);
      continue;
    }
    if (it->path().extension() == ".json") files.push_back(it->path().string());
  }
  if (ec) return absl::InternalError(absl::StrCat("cannot list ", dir.string(), ": ", ec.message()));
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

absl::Status WriteFileAtomically(const std::string& path, const std::string& contents) {
  fs::path p(path);
  std::string dir = p.parent_path().string();
  std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  // O_NOFOLLOW: a symlink planted at the temp name must not redirect the write.
  // 0600: receipts name what was compressed and when; nobody but the server's user needs them.
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return FileError(errno, absl::StrCat("cannot create ", tmp));
  // On any failure the temp file goes: a full disk must not keep a half-written file around.
  auto fail = [&](int err, std::string what) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return FileError(err, std::move(what));
  };
  size_t off = 0;
  while (off < contents.size()) {
    ssize_t n = ::write(fd, contents.data() + off, contents.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail(errno, absl::StrCat("cannot write ", tmp));
    }
    off += static_cast<size_t>(n);
  }
  // tmpfs and some network file systems report ENOSPC only here.
  if (::fsync(fd) != 0) return fail(errno, absl::StrCat("cannot fsync ", tmp));
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return FileError(err, absl::StrCat("cannot close ", tmp));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return FileError(err, absl::StrCat("cannot rename ", tmp, " to ", path));
  }
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // make the rename durable
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

std::string Registry::EntryFileName(const std::string& digest) {
  std::string hex = digest.substr(digest.find(':') == std::string::npos ? 0 : digest.find(':') + 1);
  return absl::StrCat(hex, ".json");
}

Registry::Registry(const RegistryOptions& options, Metrics* metrics)
    : options_(options), metrics_(metrics), instance_id_(NewInstanceId()) {}

absl::StatusOr<std::unique_ptr<Registry>> Registry::Open(const RegistryOptions& options, Metrics* metrics) {
  std::unique_ptr<Registry> r(new Registry(options, metrics));
  if (!options.data_dir.empty()) {
    // Directories the server creates are 0700 (only its user reads receipts and profiles). An
    // existing directory keeps the mode its operator gave it: changing it at every start would undo
    // a deliberate choice (a read-only data dir, a group shared with a backup job).
    std::error_code ec;
    const fs::path root(options.data_dir);
    if (!fs::exists(root, ec)) {
      if (root.has_parent_path()) fs::create_directories(root.parent_path(), ec);
      if (::mkdir(root.c_str(), 0700) != 0 && errno != EEXIST) {
        return FileError(errno, absl::StrCat("cannot create data dir ", options.data_dir));
      }
    }
    for (const char* sub : {"profiles", "receipts", "quarantine", "calibrations"}) {
      const fs::path d = root / sub;
      if (::mkdir(d.c_str(), 0700) != 0 && errno != EEXIST) {
        return FileError(errno, absl::StrCat("cannot create data dir ", options.data_dir, "/", sub));
      }
    }
    FQ_RETURN_IF_ERROR(r->Load());
  }
  r->UpdateSizeMetric(r->size());
  return r;
}

absl::Status Registry::Load() {
  FQ_RETURN_IF_ERROR(LoadCalibrations());
  FQ_RETURN_IF_ERROR(LoadProfiles());
  return LoadReceipts();
}

void Registry::Quarantine(const std::string& path, const absl::Status& why) {
  fs::path src(path);
  fs::path dst = fs::path(options_.data_dir) / "quarantine" /
                 absl::StrCat(src.filename().string(), ".", NowUnixSeconds());
  std::error_code ec;
  fs::rename(src, dst, ec);
  std::fprintf(stderr, "fibquant-server: registry: quarantined %s -> %s: %s%s\n", path.c_str(), dst.c_str(),
               std::string(why.message()).c_str(), ec ? (" (move failed: " + ec.message() + ")").c_str() : "");
  {
    absl::MutexLock lock(&mu_);
    ++quarantined_;
  }
  if (metrics_) metrics_->RegistryFileQuarantined();
}

absl::StatusOr<ProfileEntry> Registry::ReadProfileFile(const std::string& path) const {
  FQ_ASSIGN_OR_RETURN(std::string text, ReadFileBounded(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return absl::DataLossError("not a JSON object");
  ProfileEntry e;
  std::string codebook_hex, codebook_digest;
  LloydReport report;
  bool has_codebook = false;
  try {
    if (j.at("schema").get<std::string>() != kRegistryProfileSchema) {
      return absl::DataLossError("unknown registry file schema");
    }
    e.digest = j.at("digest").get<std::string>();
    e.profile_json = j.at("profile_json").get<std::string>();
    e.registered_unix_seconds = IntField<int64_t>(j, "registered_unix_seconds");
    e.build_seconds = j.at("build_seconds").get<double>();
    e.build_threads = IntField<int>(j, "build_threads");
    const json& cb = j.at("codebook");
    if (!cb.is_null()) {
      has_codebook = true;
      codebook_digest = cb.at("digest").get<std::string>();
      codebook_hex = cb.at("codewords_f32le_hex").get<std::string>();
      report = ReportFromJson(cb.at("report"));
    }
  } catch (const std::exception& ex) {  // json::exception or IntField's std::invalid_argument
    return absl::DataLossError(absl::StrCat("malformed registry file: ", ex.what()));
  }
  if (fs::path(path).filename().string() != EntryFileName(e.digest)) {
    return absl::DataLossError(absl::StrCat("file name does not match its digest ", e.digest));
  }
  auto profile = KvCompressionProfile::FromJson(e.profile_json);
  if (!profile.ok()) return absl::DataLossError(absl::StrCat("stored profile invalid: ", profile.status().message()));
  auto digest = profile->Digest();
  if (!digest.ok()) return absl::DataLossError(absl::StrCat("stored profile: ", digest.status().message()));
  if (*digest != e.digest) {
    return absl::DataLossError(absl::StrCat("profile digest mismatch: file says ", e.digest, ", recomputed ", *digest));
  }
  std::shared_ptr<const Quantizer> quantizer;
  if (profile->fib_profile.has_value()) {
    if (!has_codebook) return absl::DataLossError("profile has a FibQuant part but the file has no codebook");
    if (codebook_digest != profile->codebook_digest) {
      return absl::DataLossError("stored codebook digest differs from the profile's");
    }
    std::vector<uint8_t> bytes;
    FQ_RETURN_IF_ERROR(HexDecode(codebook_hex, &bytes));
    if (bytes.size() % sizeof(float) != 0) return absl::DataLossError("codewords length is not a multiple of 4");
    std::vector<float> codewords(bytes.size() / sizeof(float));
    std::memcpy(codewords.data(), bytes.data(), bytes.size());
    auto codebook = Codebook::FromStored(*profile->fib_profile, std::move(codewords), std::move(report),
                                         profile->codebook_digest);
    if (!codebook.ok()) {
      return absl::DataLossError(absl::StrCat("stored codebook failed verification: ", codebook.status().message()));
    }
    FQ_ASSIGN_OR_RETURN(quantizer, Quantizer::Create(*std::move(codebook)));
  }
  std::shared_ptr<const KvCalibration> calibration;
  if (profile->channel_transform == KvChannelTransform::kCalibration) {
    auto c = LookupCalibration(profile->calibration_digest);
    if (!c.ok()) return absl::DataLossError(absl::StrCat("stored profile: its calibration ", c.status().message()));
    calibration = *std::move(c);
  }
  auto codec = KvCodec::Create(*std::move(profile), std::move(quantizer), std::move(calibration));
  if (!codec.ok()) return absl::DataLossError(absl::StrCat("stored profile: ", codec.status().message()));
  if ((*codec)->profile_digest() != e.digest) return absl::DataLossError("compiled profile digest differs");
  e.codec = *std::move(codec);
  e.loaded_from_disk = true;
  return e;
}

absl::Status Registry::LoadProfiles() {
  fs::path dir = fs::path(options_.data_dir) / "profiles";
  FQ_ASSIGN_OR_RETURN(const std::vector<std::string> files, ListStoredJsonFiles(dir));
  for (const std::string& f : files) {
    auto e = ReadProfileFile(f);
    if (!e.ok()) {
      Quarantine(f, e.status());
      continue;
    }
    absl::MutexLock lock(&mu_);
    std::string key = e->digest;
    profiles_[key] = std::make_shared<const ProfileEntry>(*std::move(e));
  }
  return absl::OkStatus();
}

absl::Status Registry::LoadCalibrations() {
  fs::path dir = fs::path(options_.data_dir) / "calibrations";
  FQ_ASSIGN_OR_RETURN(const std::vector<std::string> files, ListStoredJsonFiles(dir));
  for (const std::string& f : files) {
    absl::StatusOr<KvCalibration> c = [&]() -> absl::StatusOr<KvCalibration> {
      FQ_ASSIGN_OR_RETURN(std::string text, ReadFileBounded(f));
      auto cal = KvCalibration::FromJson(text);  // digest recomputed
      if (!cal.ok()) return absl::DataLossError(absl::StrCat("calibration file: ", cal.status().message()));
      if (EntryFileName(cal->digest) != fs::path(f).filename().string()) {
        return absl::DataLossError("calibration file name does not match its digest");
      }
      return cal;
    }();
    if (!c.ok()) {
      Quarantine(f, c.status());
      continue;
    }
    absl::MutexLock lock(&mu_);
    std::string key = c->digest;
    calibrations_[key] = std::make_shared<const KvCalibration>(*std::move(c));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const KvCalibration>> Registry::LookupCalibration(const std::string& digest) const {
  absl::MutexLock lock(&mu_);
  auto it = calibrations_.find(digest);
  if (it == calibrations_.end()) return absl::NotFoundError(absl::StrCat("calibration ", digest, " is not registered"));
  return it->second;
}

absl::StatusOr<std::shared_ptr<const KvCalibration>> Registry::InsertCalibration(KvCalibration calibration,
                                                                               bool* inserted) {
  *inserted = false;
  absl::MutexLock io(&io_mu_);
  {
    absl::MutexLock lock(&mu_);
    auto it = calibrations_.find(calibration.digest);
    if (it != calibrations_.end()) return it->second;
    if (calibrations_.size() >= options_.max_calibrations) {
      return absl::ResourceExhaustedError(absl::StrCat("registry holds ", calibrations_.size(),
                                                       " calibrations, the limit max_calibrations is ",
                                                       options_.max_calibrations));
    }
  }
  if (!options_.data_dir.empty()) {
    FQ_RETURN_IF_ERROR(WriteFileAtomically(
        (fs::path(options_.data_dir) / "calibrations" / EntryFileName(calibration.digest)).string(),
        calibration.ToJson()));
  }
  auto shared = std::make_shared<const KvCalibration>(std::move(calibration));
  absl::MutexLock lock(&mu_);
  calibrations_[shared->digest] = shared;
  *inserted = true;
  return shared;
}

size_t Registry::calibration_count() const {
  absl::MutexLock lock(&mu_);
  return calibrations_.size();
}

absl::StatusOr<fibquant::v1::Receipt> Registry::ReadReceiptFile(const std::string& path) const {
  FQ_ASSIGN_OR_RETURN(std::string text, ReadFileBounded(path));
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return absl::DataLossError("not a JSON object");
  std::string body, sum;
  try {
    if (j.at("schema").get<std::string>() != kRegistryReceiptSchema) {
      return absl::DataLossError("unknown receipt file schema");
    }
    body = j.at("receipt").get<std::string>();
    sum = j.at("sha256").get<std::string>();
    (void)IntField<uint64_t>(j, "seq");
  } catch (const std::exception& ex) {  // json::exception or IntField's std::invalid_argument
    return absl::DataLossError(absl::StrCat("malformed receipt file: ", ex.what()));
  }
  if (Sha256Digest(body) != sum) return absl::DataLossError("receipt checksum mismatch");
  fibquant::v1::Receipt r;
  auto st = google::protobuf::util::JsonStringToMessage(body, &r);
  if (!st.ok()) return absl::DataLossError(absl::StrCat("receipt JSON: ", st.ToString()));
  if (absl::StrCat(r.receipt_id(), ".json") != fs::path(path).filename().string()) {
    return absl::DataLossError("receipt file name does not match its id");
  }
  return r;
}

absl::Status Registry::LoadReceipts() {
  fs::path dir = fs::path(options_.data_dir) / "receipts";
  FQ_ASSIGN_OR_RETURN(const std::vector<std::string> files, ListStoredJsonFiles(dir));
  std::vector<fibquant::v1::Receipt> loaded;
  for (const std::string& f : files) {
    auto r = ReadReceiptFile(f);
    if (!r.ok()) {
      Quarantine(f, r.status());
      continue;
    }
    loaded.push_back(*std::move(r));
  }
  std::sort(loaded.begin(), loaded.end(), [](const auto& a, const auto& b) {
    return ReceiptSeq(a.receipt_id()) < ReceiptSeq(b.receipt_id());
  });
  std::vector<std::string> drop;
  {
    absl::MutexLock lock(&mu_);
    for (auto& r : loaded) {
      receipt_counter_ = std::max(receipt_counter_, ReceiptSeq(r.receipt_id()) + 1);
      receipts_.push_back(std::move(r));
    }
    while (receipts_.size() > options_.receipt_retention) {
      drop.push_back(receipts_.front().receipt_id());
      receipts_.pop_front();
    }
  }
  std::error_code ec;
  for (const auto& id : drop) fs::remove(dir / absl::StrCat(id, ".json"), ec);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const ProfileEntry>> Registry::Lookup(const std::string& digest) const {
  absl::MutexLock lock(&mu_);
  auto it = profiles_.find(digest);
  if (it == profiles_.end()) {
    return absl::NotFoundError(absl::StrCat("profile ", digest, " is not registered"));
  }
  return it->second;
}

absl::Status Registry::CheckCapacity() const {
  absl::MutexLock lock(&mu_);
  if (profiles_.size() >= options_.max_profiles) {
    return absl::ResourceExhaustedError(absl::StrCat("registry holds ", profiles_.size(),
                                                     " profiles, the limit max_profiles is ",
                                                     options_.max_profiles));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const ProfileEntry>> Registry::Insert(ProfileEntry entry, bool* inserted) {
  *inserted = false;
  absl::MutexLock io(&io_mu_);  // one writer at a time: the check and the write stay consistent
  {
    absl::MutexLock lock(&mu_);
    auto it = profiles_.find(entry.digest);
    if (it != profiles_.end()) return it->second;
    if (profiles_.size() >= options_.max_profiles) {
      return absl::ResourceExhaustedError(absl::StrCat("registry holds ", profiles_.size(),
                                                       " profiles, the limit max_profiles is ",
                                                       options_.max_profiles));
    }
  }
  if (entry.registered_unix_seconds == 0) entry.registered_unix_seconds = NowUnixSeconds();
  if (!options_.data_dir.empty()) {
    FQ_RETURN_IF_ERROR(WriteFileAtomically(
        (fs::path(options_.data_dir) / "profiles" / EntryFileName(entry.digest)).string(), SerializeEntry(entry)));
  }
  auto shared = std::make_shared<const ProfileEntry>(std::move(entry));
  size_t n;
  {
    absl::MutexLock lock(&mu_);
    profiles_[shared->digest] = shared;
    n = profiles_.size();
  }
  UpdateSizeMetric(n);
  *inserted = true;
  return shared;
}

std::vector<std::shared_ptr<const ProfileEntry>> Registry::List(const std::string& after, size_t limit) const {
  std::vector<std::shared_ptr<const ProfileEntry>> out;
  absl::MutexLock lock(&mu_);
  for (auto it = profiles_.upper_bound(after); it != profiles_.end() && out.size() < limit; ++it) {
    out.push_back(it->second);
  }
  return out;
}

size_t Registry::size() const {
  absl::MutexLock lock(&mu_);
  return profiles_.size();
}

void Registry::UpdateSizeMetric(size_t n) {
  if (metrics_) metrics_->SetRegistrySize(static_cast<int64_t>(n));
}

std::optional<uint64_t> Registry::ReceiptSeqOf(const std::string& id) {
  // "rcpt-<seq>" (before issue 14) or "rcpt-<unix seconds>-<instance>-<seq>": the local order is
  // the last dash-separated field.
  if (id.rfind("rcpt-", 0) != 0) return std::nullopt;
  const size_t dash = id.rfind('-');
  uint64_t seq = 0;
  if (!absl::SimpleAtoi(absl::string_view(id).substr(dash + 1), &seq)) return std::nullopt;
  return seq;
}

absl::StatusOr<fibquant::v1::Receipt> Registry::AddReceipt(fibquant::v1::Receipt receipt) {
  absl::MutexLock io(&io_mu_);
  uint64_t seq;
  {
    absl::MutexLock lock(&mu_);
    seq = receipt_counter_++;
  }
  if (receipt.recorded_unix_seconds() == 0) receipt.set_recorded_unix_seconds(NowUnixSeconds());
  // Unique across restarts (the counter restarts after receipts that were never persisted) and
  // across replicas: time, this process's random instance id, then the local sequence number.
  receipt.set_receipt_id(absl::StrFormat("rcpt-%d-%s-%012d", receipt.recorded_unix_seconds(),
                                         instance_id_, seq));
  fs::path dir = fs::path(options_.data_dir) / "receipts";
  if (!options_.data_dir.empty()) {
    // A receipt that cannot be written (full or read-only disk) is kept in memory and marked, not
    // turned into a failed stream: the client already holds every frame of it.
    receipt.set_persisted(true);
    absl::Status w = WriteFileAtomically((dir / absl::StrCat(receipt.receipt_id(), ".json")).string(),
                                         SerializeReceipt(receipt, seq));
    if (!w.ok()) {
      receipt.set_persisted(false);
      std::fprintf(stderr, "fibquant-server: registry: receipt %s kept in memory only: %s\n", receipt.receipt_id().c_str(),
                   std::string(w.message()).c_str());
    }
  }
  if (metrics_) metrics_->ReceiptRecorded(receipt.persisted());
  std::vector<std::string> drop;
  {
    absl::MutexLock lock(&mu_);
    receipts_.push_back(receipt);
    while (receipts_.size() > options_.receipt_retention) {
      drop.push_back(receipts_.front().receipt_id());
      receipts_.pop_front();
    }
  }
  if (!options_.data_dir.empty()) {
    std::error_code ec;
    for (const auto& id : drop) fs::remove(dir / absl::StrCat(id, ".json"), ec);
  }
  return receipt;
}

void Registry::RemoveReceipt(const std::string& id) {
  absl::MutexLock io(&io_mu_);
  bool found = false;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = receipts_.begin(); it != receipts_.end(); ++it) {
      if (it->receipt_id() == id) {
        receipts_.erase(it);
        found = true;
        break;
      }
    }
  }
  if (found && !options_.data_dir.empty()) {
    std::error_code ec;
    fs::remove(fs::path(options_.data_dir) / "receipts" / absl::StrCat(id, ".json"), ec);
  }
}

absl::StatusOr<fibquant::v1::Receipt> Registry::GetReceipt(const std::string& id) const {
  absl::MutexLock lock(&mu_);
  for (const auto& r : receipts_) {
    if (r.receipt_id() == id) return r;
  }
  return absl::NotFoundError(absl::StrCat("receipt ", id, " is not stored (unknown, or dropped by retention)"));
}

std::vector<fibquant::v1::Receipt> Registry::ListReceipts(const std::string& profile_digest, uint64_t before_seq,
                                                         size_t limit, bool* more) const {
  std::vector<fibquant::v1::Receipt> out;
  *more = false;
  absl::MutexLock lock(&mu_);
  for (auto it = receipts_.rbegin(); it != receipts_.rend(); ++it) {
    if (!profile_digest.empty() && it->profile_digest() != profile_digest) continue;
    if (ReceiptSeq(it->receipt_id()) >= before_seq) continue;
    if (out.size() == limit) {
      *more = true;
      break;
    }
    out.push_back(*it);
  }
  return out;
}

size_t Registry::receipt_count() const {
  absl::MutexLock lock(&mu_);
  return receipts_.size();
}

uint64_t Registry::quarantined() const {
  absl::MutexLock lock(&mu_);
  return quarantined_;
}

}  // namespace fibquant::server
