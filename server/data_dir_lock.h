// Exclusive ownership of a --data-dir by one server process.
//
// Two servers writing one data dir would interleave receipt ids, overwrite each other's profile
// files and quarantine each other's half-written files at restart; the operator meant one of them
// to fail. DataDirLock takes an exclusive flock(2) on `<data-dir>/LOCK` and writes the holder's pid
// into it (for the refusal message and for people). flock belongs to the open file description, so
// the kernel releases it when the process exits in any way (SIGKILL, OOM kill, crash): a LOCK file
// left behind by a dead process is stale by construction and simply locked again; the pid inside
// it is only a hint, never trusted to decide ownership.
//
// Ownership: the object owns the descriptor; destroying it (or process exit) releases the lock.
// Thread safety: not thread-safe; acquire once in main() before the data dir is opened.
#ifndef FIBQUANT_SERVER_DATA_DIR_LOCK_H_
#define FIBQUANT_SERVER_DATA_DIR_LOCK_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace fibquant::server {

class DataDirLock {
 public:
  // Creates `data_dir` if missing and locks `<data_dir>/LOCK`. FailedPrecondition naming the
  // holder's pid when another process holds it; the errno's status (e.g. PermissionDenied) naming
  // the path when the file cannot be created or locked.
  static absl::StatusOr<std::unique_ptr<DataDirLock>> Acquire(const std::string& data_dir);

  ~DataDirLock();
  DataDirLock(const DataDirLock&) = delete;
  DataDirLock& operator=(const DataDirLock&) = delete;

  const std::string& path() const { return path_; }

 private:
  DataDirLock(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  int fd_;
  std::string path_;
};

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_DATA_DIR_LOCK_H_
