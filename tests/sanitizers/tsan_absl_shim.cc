// ThreadSanitizer shim for Debian's uninstrumented Abseil (libabsl_synchronization.so, 20220623).
//
// Why: absl::Mutex is built from atomics and futex calls inside a library TSan never instrumented,
// so TSan sees no happens-before edge between an Unlock in one thread and the next Lock in another,
// and reports every absl::Mutex-guarded field of our code (worker pool, registry, service) as a
// race. Those reports are false, and suppressing them would hide real races in our own code.
// Instead this file (linked into the TSan build only, by scripts/ci-sanitizers) interposes the
// exported absl::Mutex / absl::CondVar entry points, calls the real ones via dlsym(RTLD_NEXT) and
// tells TSan about them with its public mutex annotations (<sanitizer/tsan_interface.h>), exactly
// what an Abseil built with -fsanitize=thread does internally. gRPC's own absl::Mutex calls go
// through the same exported symbols, so its locks become visible too.
//
// Waits that release and re-acquire the mutex (Await*, LockWhen*, CondVar::Wait*) are annotated as
// unlock + lock around the call; memory accesses inside the real call (the Condition functions
// absl evaluates) are ignored, since TSan cannot see the lock held there.
#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

// Dynamic annotations exported by the TSan runtime.
extern "C" {
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}

namespace {

void IgnoreBegin() {
  AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
}
void IgnoreEnd() {
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
  AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
}

template <typename Fn>
Fn Real(const char* name) {
  void* p = dlsym(RTLD_NEXT, name);
  if (p == nullptr) {
    std::fprintf(stderr, "tsan_absl_shim: %s not found\n", name);
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}

#define FQ_REAL(type, mangled)                  \
  static const auto real = Real<type>(mangled);

void Locked(void* m, unsigned flags) { __tsan_mutex_post_lock(m, flags, 0); }

// Unlock + (real wait, accesses ignored) + lock.
template <typename Call>
auto AnnotatedWait(void* m, unsigned flags, Call call) {
  __tsan_mutex_pre_unlock(m, flags);
  __tsan_mutex_post_unlock(m, flags);
  IgnoreBegin();
  auto r = call();
  IgnoreEnd();
  __tsan_mutex_pre_lock(m, flags);
  Locked(m, flags);
  return r;
}

// Lock with a condition: (real call, accesses ignored) then the lock annotation when acquired.
template <typename Call>
bool AnnotatedLockWhen(void* m, unsigned flags, Call call) {
  IgnoreBegin();
  const bool r = call();
  IgnoreEnd();
  __tsan_mutex_pre_lock(m, flags);
  Locked(m, flags);
  return r;
}

constexpr unsigned kRead = __tsan_mutex_read_lock;

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

Mutex::~Mutex() {
  FQ_REAL(void (*)(Mutex*), "_ZN4absl7debian35MutexD2Ev");
  __tsan_mutex_destroy(this, 0);
  real(this);
}

void Mutex::Lock() {
  FQ_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex4LockEv");
  __tsan_mutex_pre_lock(this, 0);
  real(this);
  Locked(this, 0);
}

void Mutex::Unlock() {
  FQ_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex6UnlockEv");
  __tsan_mutex_pre_unlock(this, 0);
  real(this);
  __tsan_mutex_post_unlock(this, 0);
}

bool Mutex::TryLock() {
  FQ_REAL(bool (*)(Mutex*), "_ZN4absl7debian35Mutex7TryLockEv");
  __tsan_mutex_pre_lock(this, __tsan_mutex_try_lock);
  const bool ok = real(this);
  __tsan_mutex_post_lock(this, __tsan_mutex_try_lock | (ok ? 0 : __tsan_mutex_try_lock_failed), 0);
  return ok;
}

void Mutex::ReaderLock() {
  FQ_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex10ReaderLockEv");
  __tsan_mutex_pre_lock(this, kRead);
  real(this);
  Locked(this, kRead);
}

void Mutex::ReaderUnlock() {
  FQ_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex12ReaderUnlockEv");
  __tsan_mutex_pre_unlock(this, kRead);
  real(this);
  __tsan_mutex_post_unlock(this, kRead);
}

bool Mutex::ReaderTryLock() {
  FQ_REAL(bool (*)(Mutex*), "_ZN4absl7debian35Mutex13ReaderTryLockEv");
  __tsan_mutex_pre_lock(this, kRead | __tsan_mutex_try_lock);
  const bool ok = real(this);
  __tsan_mutex_post_lock(this, kRead | __tsan_mutex_try_lock | (ok ? 0 : __tsan_mutex_try_lock_failed), 0);
  return ok;
}

void Mutex::Await(const Condition& cond) {
  FQ_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE");
  AnnotatedWait(this, 0, [&] { real(this, cond); return true; });
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
          "_ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  return AnnotatedWait(this, 0, [&] { return real(this, cond, timeout); });
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Time),
          "_ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return AnnotatedWait(this, 0, [&] { return real(this, cond, deadline); });
}

void Mutex::LockWhen(const Condition& cond) {
  FQ_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE");
  AnnotatedLockWhen(this, 0, [&] { real(this, cond); return true; });
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  FQ_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE");
  AnnotatedLockWhen(this, kRead, [&] { real(this, cond); return true; });
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
          "_ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  return AnnotatedLockWhen(this, 0, [&] { return real(this, cond, timeout); });
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Time),
          "_ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return AnnotatedLockWhen(this, 0, [&] { return real(this, cond, deadline); });
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
          "_ZN4absl7debian35Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  return AnnotatedLockWhen(this, kRead, [&] { return real(this, cond, timeout); });
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Time),
          "_ZN4absl7debian35Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  return AnnotatedLockWhen(this, kRead, [&] { return real(this, cond, deadline); });
}

void CondVar::Wait(Mutex* mu) {
  FQ_REAL(void (*)(CondVar*, Mutex*), "_ZN4absl7debian37CondVar4WaitEPNS0_5MutexE");
  AnnotatedWait(mu, 0, [&] { real(this, mu); return true; });
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  FQ_REAL(bool (*)(CondVar*, Mutex*, absl::Duration),
          "_ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  return AnnotatedWait(mu, 0, [&] { return real(this, mu, timeout); });
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  FQ_REAL(bool (*)(CondVar*, Mutex*, absl::Time),
          "_ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  return AnnotatedWait(mu, 0, [&] { return real(this, mu, deadline); });
}

ABSL_NAMESPACE_END
}  // namespace absl
