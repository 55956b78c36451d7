// Pieces shared by the LD_PRELOADed ThreadSanitizer shims (tsan_absl_shim.cc, tsan_grpc_shim.cc),
// which are built into one library WITHOUT -fsanitize=thread: the TSan runtime's annotation entry
// points, declared weak so that in a process without the runtime (ctest, shell tools) every
// wrapper only forwards; the "is TSan here" test; the lookup of the interposed real function; and
// the ignore-begin/end pair. Header-only, internal linkage; no state.
#ifndef FIBQUANT_TESTS_SANITIZERS_TSAN_SHIM_COMMON_H_
#define FIBQUANT_TESTS_SANITIZERS_TSAN_SHIM_COMMON_H_

#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>

extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#pragma weak __tsan_acquire
#pragma weak __tsan_release
#pragma weak AnnotateIgnoreReadsBegin
#pragma weak AnnotateIgnoreReadsEnd
#pragma weak AnnotateIgnoreWritesBegin
#pragma weak AnnotateIgnoreWritesEnd
#pragma weak __tsan_mutex_destroy
#pragma weak __tsan_mutex_pre_lock
#pragma weak __tsan_mutex_post_lock
#pragma weak __tsan_mutex_pre_unlock
#pragma weak __tsan_mutex_post_unlock

namespace fq_tsan_shim {

// True when the process runs with the TSan runtime.
inline bool Tsan() {
  static const bool on = &__tsan_mutex_pre_lock != nullptr;
  return on;
}

// The next definition of `name` after the shim (the real library function).
template <typename Fn>
Fn Real(const char* name) {
  void* p = dlsym(RTLD_NEXT, name);
  if (p == nullptr) {
    std::fprintf(stderr, "fq tsan shim: %s not found\n", name);
    std::abort();
  }
  return reinterpret_cast<Fn>(p);
}

// Memory accesses between these are not checked (by this thread).
inline void IgnoreBegin() {
  if (!Tsan()) return;
  AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
}
inline void IgnoreEnd() {
  if (!Tsan()) return;
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
  AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
}

}  // namespace fq_tsan_shim

#endif  // FIBQUANT_TESTS_SANITIZERS_TSAN_SHIM_COMMON_H_
