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
// Built WITHOUT -fsanitize=thread and LD_PRELOADed: the TSan entry points are weak, so in a process
// without the TSan runtime (ctest itself, shell tools) every wrapper just calls the real function.
//
// Nesting: a wrapped call may re-enter another exported entry point (CondVar::WaitWithDeadline
// re-acquires its mutex through Mutex::Lock); only the outermost call is annotated.
//
// Waits that release and re-acquire the mutex (Await*, LockWhen*, CondVar::Wait*) are annotated as
// unlock + lock around the call; memory accesses inside the real call (the Condition functions
// absl evaluates) are ignored, since TSan cannot see the lock held there.
#include <cstring>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tests/sanitizers/tsan_shim_common.h"

namespace {

using fq_tsan_shim::IgnoreBegin;
using fq_tsan_shim::IgnoreEnd;
using fq_tsan_shim::Real;
using fq_tsan_shim::Tsan;

void PreLock(void* m, unsigned f) {
  if (Tsan()) __tsan_mutex_pre_lock(m, f);
}
void PostLock(void* m, unsigned f) {
  if (Tsan()) __tsan_mutex_post_lock(m, f, 0);
}
void PreUnlock(void* m, unsigned f) {
  if (Tsan()) __tsan_mutex_pre_unlock(m, f);
}
void PostUnlock(void* m, unsigned f) {
  if (Tsan()) __tsan_mutex_post_unlock(m, f);
}
thread_local int t_depth = 0;
struct Nested {
  Nested() { ++t_depth; }
  ~Nested() { --t_depth; }
  Nested(const Nested&) = delete;
  Nested& operator=(const Nested&) = delete;
};

// Resolves the real function; inside another wrapper's real call, calls it without annotation.
#define FQ_REAL(type, mangled, ...)                \
  static const auto real = Real<type>(mangled);  \
  if (t_depth > 0) return real(__VA_ARGS__);      \
  const Nested nested_guard;


// Unlock + (real wait, accesses ignored) + lock.
template <typename Call>
auto AnnotatedWait(void* m, unsigned flags, Call call) {
  PreUnlock(m, flags);
  PostUnlock(m, flags);
  IgnoreBegin();
  auto r = call();
  IgnoreEnd();
  PreLock(m, flags);
  PostLock(m, flags);
  return r;
}

// Lock with a condition: (real call, accesses ignored) then the lock annotation when acquired.
template <typename Call>
bool AnnotatedLockWhen(void* m, unsigned flags, Call call) {
  IgnoreBegin();
  const bool r = call();
  IgnoreEnd();
  PreLock(m, flags);
  PostLock(m, flags);
  return r;
}

constexpr unsigned kRead = __tsan_mutex_read_lock;

// True when `pc` lies in Debian's libgrpc / libgrpc++ / libgpr (not instrumented).
bool CalledFromGrpc(void* pc) {
  Dl_info info;
  if (dladdr(pc, &info) == 0 || info.dli_fname == nullptr) return false;
  const char* base = std::strrchr(info.dli_fname, '/');
  base = base ? base + 1 : info.dli_fname;
  return std::strncmp(base, "libgrpc.so", 10) == 0 || std::strncmp(base, "libgrpc++.so", 12) == 0 ||
         std::strncmp(base, "libgpr.so", 9) == 0;
}

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

Mutex::~Mutex() {
  static const auto real = Real<void (*)(Mutex*)>("_ZN4absl7debian35MutexD2Ev");
  // A mutex inside a gRPC object (e.g. ServerContextBase::CompletionOp) is destroyed by whichever thread drops the object's last
  // reference, an atomic decrement in uninstrumented libgrpc that orders it after the other
  // threads' last unlock without TSan seeing it: annotating that destroy would report a race that
  // is not there. Our own mutexes (and their destruction) stay fully checked.
  if (Tsan() && !CalledFromGrpc(__builtin_return_address(0))) __tsan_mutex_destroy(this, 0);
  real(this);
}

void Mutex::Lock() {
  FQ_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex4LockEv", this);
  PreLock(this, 0);
  real(this);
  PostLock(this, 0);
}

void Mutex::Unlock() {
  FQ_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex6UnlockEv", this);
  PreUnlock(this, 0);
  real(this);
  PostUnlock(this, 0);
}

bool Mutex::TryLock() {
  FQ_REAL(bool (*)(Mutex*), "_ZN4absl7debian35Mutex7TryLockEv", this);
  PreLock(this, __tsan_mutex_try_lock);
  const bool ok = real(this);
  PostLock(this, __tsan_mutex_try_lock | (ok ? 0 : __tsan_mutex_try_lock_failed));
  return ok;
}

void Mutex::ReaderLock() {
  FQ_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex10ReaderLockEv", this);
  PreLock(this, kRead);
  real(this);
  PostLock(this, kRead);
}

void Mutex::ReaderUnlock() {
  FQ_REAL(void (*)(Mutex*), "_ZN4absl7debian35Mutex12ReaderUnlockEv", this);
  PreUnlock(this, kRead);
  real(this);
  PostUnlock(this, kRead);
}

bool Mutex::ReaderTryLock() {
  FQ_REAL(bool (*)(Mutex*), "_ZN4absl7debian35Mutex13ReaderTryLockEv", this);
  PreLock(this, kRead | __tsan_mutex_try_lock);
  const bool ok = real(this);
  PostLock(this, kRead | __tsan_mutex_try_lock | (ok ? 0 : __tsan_mutex_try_lock_failed));
  return ok;
}

void Mutex::Await(const Condition& cond) {
  FQ_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE", this, cond);
  AnnotatedWait(this, 0, [&] { real(this, cond); return true; });
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
          "_ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE", this, cond, timeout);
  return AnnotatedWait(this, 0, [&] { return real(this, cond, timeout); });
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Time),
          "_ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE", this, cond, deadline);
  return AnnotatedWait(this, 0, [&] { return real(this, cond, deadline); });
}

void Mutex::LockWhen(const Condition& cond) {
  FQ_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE", this, cond);
  AnnotatedLockWhen(this, 0, [&] { real(this, cond); return true; });
}

void Mutex::ReaderLockWhen(const Condition& cond) {
  FQ_REAL(void (*)(Mutex*, const Condition&), "_ZN4absl7debian35Mutex14ReaderLockWhenERKNS0_9ConditionE", this, cond);
  AnnotatedLockWhen(this, kRead, [&] { real(this, cond); return true; });
}

bool Mutex::LockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
          "_ZN4absl7debian35Mutex19LockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE", this, cond, timeout);
  return AnnotatedLockWhen(this, 0, [&] { return real(this, cond, timeout); });
}

bool Mutex::LockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Time),
          "_ZN4absl7debian35Mutex20LockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE", this, cond, deadline);
  return AnnotatedLockWhen(this, 0, [&] { return real(this, cond, deadline); });
}

bool Mutex::ReaderLockWhenWithTimeout(const Condition& cond, absl::Duration timeout) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Duration),
          "_ZN4absl7debian35Mutex25ReaderLockWhenWithTimeoutERKNS0_9ConditionENS0_8DurationE", this, cond, timeout);
  return AnnotatedLockWhen(this, kRead, [&] { return real(this, cond, timeout); });
}

bool Mutex::ReaderLockWhenWithDeadline(const Condition& cond, absl::Time deadline) {
  FQ_REAL(bool (*)(Mutex*, const Condition&, absl::Time),
          "_ZN4absl7debian35Mutex26ReaderLockWhenWithDeadlineERKNS0_9ConditionENS0_4TimeE", this, cond, deadline);
  return AnnotatedLockWhen(this, kRead, [&] { return real(this, cond, deadline); });
}

void CondVar::Wait(Mutex* mu) {
  FQ_REAL(void (*)(CondVar*, Mutex*), "_ZN4absl7debian37CondVar4WaitEPNS0_5MutexE", this, mu);
  AnnotatedWait(mu, 0, [&] { real(this, mu); return true; });
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  FQ_REAL(bool (*)(CondVar*, Mutex*, absl::Duration),
          "_ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE", this, mu, timeout);
  return AnnotatedWait(mu, 0, [&] { return real(this, mu, timeout); });
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  FQ_REAL(bool (*)(CondVar*, Mutex*, absl::Time),
          "_ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE", this, mu, deadline);
  return AnnotatedWait(mu, 0, [&] { return real(this, mu, deadline); });
}

ABSL_NAMESPACE_END
}  // namespace absl
