#include "server/data_dir_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace fibquant::server {
namespace {

absl::Status ErrnoStatus(int err, const std::string& what) {
  return absl::ErrnoToStatus(err, absl::StrCat(what, ": ", std::strerror(err)));
}

// The pid the holder wrote (best effort: the holder may be between truncate and write).
std::string HolderPid(int fd) {
  char buf[32] = {};
  const ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
  int64_t pid = 0;
  if (n > 0 && absl::SimpleAtoi(absl::StripAsciiWhitespace(std::string(buf, n)), &pid) && pid > 0) {
    return absl::StrCat("pid ", pid);
  }
  return "pid unknown";
}

}  // namespace

absl::StatusOr<std::unique_ptr<DataDirLock>> DataDirLock::Acquire(const std::string& data_dir) {
  // The data dir is created 0700 like the registry's (docs/OPERATIONS.md, "Data directory
  // permissions"): the lock is taken before the registry opens, so it creates the directory first.
  std::error_code ec;
  const std::filesystem::path root(data_dir);
  if (!std::filesystem::exists(root, ec)) {
    if (root.has_parent_path()) std::filesystem::create_directories(root.parent_path(), ec);
    if (::mkdir(root.c_str(), 0700) != 0 && errno != EEXIST) {
      return ErrnoStatus(errno, absl::StrCat("--data-dir=", data_dir, ": cannot create"));
    }
  }
  std::string path = (root / "LOCK").string();
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("--data-dir: cannot open ", path));
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err == EWOULDBLOCK) {
      std::string holder = HolderPid(fd);
      close(fd);
      return absl::FailedPreconditionError(absl::StrCat(
          "--data-dir=", data_dir, " is in use by another fibquant-server (", holder, ", lock ",
          path, "); one data dir belongs to one server process: give each server its own"));
    }
    close(fd);
    return ErrnoStatus(err, absl::StrCat("--data-dir: cannot lock ", path));
  }
  // Ours now. Replace whatever a previous (dead) holder wrote with our pid.
  const std::string pid = absl::StrCat(getpid(), "\n");
  if (ftruncate(fd, 0) != 0 || pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    const int err = errno;
    close(fd);
    return ErrnoStatus(err, absl::StrCat("--data-dir: cannot write ", path));
  }
  return std::unique_ptr<DataDirLock>(new DataDirLock(fd, std::move(path)));
}

DataDirLock::~DataDirLock() {
  // Empty the pid before unlocking so the file never names a process that no longer holds it. The
  // file itself stays: unlinking it would let a third process lock a fresh inode while a second
  // one waits on the old one.
  if (ftruncate(fd_, 0) != 0) {
    // Nothing to do: the lock is released by close() either way.
  }
  close(fd_);
}

}  // namespace fibquant::server
