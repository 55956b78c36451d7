// The one place where absl::Status becomes grpc::Status. Both follow google.rpc.Code, so the code
// is cast unchanged; the message is kept. Thread safety: pure functions.
#ifndef FIBQUANT_SERVER_STATUS_UTIL_H_
#define FIBQUANT_SERVER_STATUS_UTIL_H_

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace fibquant::server {

inline grpc::Status ToGrpcStatus(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

inline absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_STATUS_UTIL_H_
