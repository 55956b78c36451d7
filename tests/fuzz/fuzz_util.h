// Shared helpers of the libFuzzer targets (tests/fuzz/). A target aborts (__builtin_trap) when an
// invariant breaks, so libFuzzer records the input as a crash.
#ifndef FIBQUANT_TESTS_FUZZ_FUZZ_UTIL_H_
#define FIBQUANT_TESTS_FUZZ_FUZZ_UTIL_H_

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"

#define FQ_FUZZ_CHECK(cond)                                                      \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      __builtin_trap();                                                          \
    }                                                                            \
  } while (0)

namespace fibquant::fuzz {

// Codes a parser may return for bad input; anything else (Internal, Unknown, OK-with-garbage) is a bug.
inline bool IsInputError(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kOutOfRange:
      return true;
    default:
      return false;
  }
}

}  // namespace fibquant::fuzz

#endif  // FIBQUANT_TESTS_FUZZ_FUZZ_UTIL_H_
