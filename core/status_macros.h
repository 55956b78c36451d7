// Status propagation macros. Abseil 20220623 ships no status_macros.h, so the project keeps
// these two small ones. Thread safety: macros only.
#ifndef FIBQUANT_CORE_STATUS_MACROS_H_
#define FIBQUANT_CORE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define FQ_CONCAT_INNER_(a, b) a##b
#define FQ_CONCAT_(a, b) FQ_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function if it is not OK.
#define FQ_RETURN_IF_ERROR(expr)                  \
  do {                                            \
    ::absl::Status fq_status_ = (expr);           \
    if (!fq_status_.ok()) return fq_status_;      \
  } while (0)

// `lhs` = value of `rexpr` (an absl::StatusOr<T>), or returns its status from the enclosing function.
#define FQ_ASSIGN_OR_RETURN(lhs, rexpr) \
  FQ_ASSIGN_OR_RETURN_IMPL_(FQ_CONCAT_(fq_statusor_, __LINE__), lhs, rexpr)
#define FQ_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                              \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()

#endif  // FIBQUANT_CORE_STATUS_MACROS_H_
