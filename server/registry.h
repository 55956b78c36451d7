// Registry: the server's registered KV profiles (keyed by KV profile digest, each with its compiled
// KvCodec) and its bounded list of stream receipts, persisted in a data directory.
//
// On-disk layout (docs/OPERATIONS.md):
//   <data_dir>/profiles/<hex digest>.json   one profile: full profile JSON + codebook + stats
//   <data_dir>/receipts/<receipt id>.json   one receipt (proto JSON) + its SHA-256
//   <data_dir>/quarantine/                  files that failed verification, moved aside at load
// Every file is written atomically: temp file, fsync, rename, fsync of the directory. At load every
// profile is verified (profile digests recomputed, codebook re-assembled and checked against its
// digest, file name == digest) and every receipt's checksum is checked; a bad file is moved to
// quarantine/ with a log line and a metric, never loaded and never fatal.
//
// Ownership: the service owns the registry; entries are shared_ptr<const>, so a stream keeps its
// profile alive even if it is later dropped. Thread safety: all methods are thread-safe.
#ifndef FIBQUANT_SERVER_REGISTRY_H_
#define FIBQUANT_SERVER_REGISTRY_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/kv_codec.h"
#include "fibquant/v1/kv_compression.pb.h"

namespace fibquant::server {

class Metrics;

inline constexpr std::string_view kRegistryProfileSchema = "fq_registry_profile_v1";
inline constexpr std::string_view kRegistryReceiptSchema = "fq_registry_receipt_v1";

struct ProfileEntry {
  std::string digest;                    // KV profile digest (registry key)
  std::shared_ptr<const KvCodec> codec;  // compiled codec (profile + quantizer)
  std::string profile_json;              // full validated profile JSON
  double build_seconds = 0;
  int build_threads = 0;
  bool loaded_from_disk = false;
  int64_t registered_unix_seconds = 0;
};

struct RegistryOptions {
  std::string data_dir;  // empty: memory only
  uint32_t max_profiles = 256;
  uint32_t receipt_retention = 1000;
  uint32_t max_calibrations = 256;
};

class Registry {
 public:
  // Creates the directories if needed and loads everything (bad files quarantined). Fails only
  // when the data dir cannot be created or listed.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Registry>> Open(const RegistryOptions& options,
                                                                      Metrics* metrics);

  // NotFound naming the digest.
  [[nodiscard]] absl::StatusOr<std::shared_ptr<const ProfileEntry>> Lookup(const std::string& digest) const;

  // Stores a new entry (persisted first, then visible). If the digest is already present the
  // stored entry is returned and *inserted is false. ResourceExhausted naming max_profiles when
  // full; Internal if the file cannot be written.
  [[nodiscard]] absl::StatusOr<std::shared_ptr<const ProfileEntry>> Insert(ProfileEntry entry, bool* inserted);

  // ResourceExhausted naming max_profiles if one more profile would not fit (checked before a
  // build; Insert checks again).
  absl::Status CheckCapacity() const;

  // Entries with digest > after, ascending, at most `limit`.
  std::vector<std::shared_ptr<const ProfileEntry>> List(const std::string& after, size_t limit) const;
  size_t size() const;

  // Assigns receipt_id and recorded time if empty, persists (a write failure is logged and leaves
  // persisted = false: the receipt is then kept in memory only), and keeps at most
  // receipt_retention receipts (the oldest are dropped, files too). Returns the stored receipt.
  [[nodiscard]] absl::StatusOr<fibquant::v1::Receipt> AddReceipt(fibquant::v1::Receipt receipt);
  [[nodiscard]] absl::StatusOr<fibquant::v1::Receipt> GetReceipt(const std::string& id) const;
  // Withdraws a stored receipt (memory and file): a stream whose final status was not OK after its
  // receipt was stored (the client cancelled or its deadline passed while the receipt was being
  // written) must not leave one behind. Unknown ids are ignored.
  void RemoveReceipt(const std::string& id);
  // The local sequence number of a receipt id ("rcpt-<seq>" or
  // "rcpt-<unix seconds>-<instance>-<seq>"), or nullopt when `id` is not of that form.
  static std::optional<uint64_t> ReceiptSeqOf(const std::string& id);
  // The random id of this process's receipts (8 hex digits).
  const std::string& instance_id() const { return instance_id_; }
  // Newest first, only receipts whose sequence number (the digits of "rcpt-<seq>") is below
  // `before_seq`, optionally only those of one profile digest.
  std::vector<fibquant::v1::Receipt> ListReceipts(const std::string& profile_digest, uint64_t before_seq,
                                                 size_t limit, bool* more) const;
  size_t receipt_count() const;

  // Calibration artifacts (<data_dir>/calibrations/<hex>.json, the artifact's JSON; verified at load
  // like profiles, loaded before them because calibrated profiles need theirs). NotFound naming the
  // digest; Insert returns the stored one (and *inserted false) for a known digest,
  // ResourceExhausted naming max_calibrations when full.
  [[nodiscard]] absl::StatusOr<std::shared_ptr<const KvCalibration>> LookupCalibration(
      const std::string& digest) const;
  [[nodiscard]] absl::StatusOr<std::shared_ptr<const KvCalibration>> InsertCalibration(KvCalibration calibration,
                                                                                     bool* inserted);
  size_t calibration_count() const;

  // Files moved to quarantine/ since Open (for tests and logs).
  uint64_t quarantined() const;

  // Serialisation of one profile entry (exposed for tests that corrupt files).
  static std::string EntryFileName(const std::string& digest);

 private:
  Registry(const RegistryOptions& options, Metrics* metrics);
  absl::Status Load();
  absl::Status LoadProfiles();
  absl::Status LoadReceipts();
  absl::Status LoadCalibrations();
  [[nodiscard]] absl::StatusOr<ProfileEntry> ReadProfileFile(const std::string& path) const;
  [[nodiscard]] absl::StatusOr<fibquant::v1::Receipt> ReadReceiptFile(const std::string& path) const;
  void Quarantine(const std::string& path, const absl::Status& why);
  void UpdateSizeMetric(size_t n);

  const RegistryOptions options_;
  Metrics* const metrics_;
  const std::string instance_id_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<const ProfileEntry>> profiles_ ABSL_GUARDED_BY(mu_);
  std::deque<fibquant::v1::Receipt> receipts_ ABSL_GUARDED_BY(mu_);  // oldest first
  std::map<std::string, std::shared_ptr<const KvCalibration>> calibrations_ ABSL_GUARDED_BY(mu_);
  uint64_t receipt_counter_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t quarantined_ ABSL_GUARDED_BY(mu_) = 0;
  // Serialises file writes so a drop never races a write of the same receipt.
  mutable absl::Mutex io_mu_;
};

// Writes `contents` to `path` atomically (temp file in the same directory, fsync, rename, fsync of
// the directory); the temp file never survives a failure. The error names the path and errno:
// ResourceExhausted for a full disk or quota (ENOSPC, EDQUOT, EFBIG), FailedPrecondition for a
// read-only or unwritable directory (EROFS, EACCES, EPERM), Internal otherwise.
absl::Status WriteFileAtomically(const std::string& path, const std::string& contents);

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_REGISTRY_H_
