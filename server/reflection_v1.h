// grpc.reflection.v1.ServerReflection: the reflection service under its v1 name.
//
// Debian's gRPC 1.51 serves reflection only as grpc.reflection.v1alpha (its plugin), while grpcurl
// and newer clients ask for grpc.reflection.v1 first. The two protocols are the same messages under
// another package, so this service answers v1 from the same source the v1alpha plugin uses: the
// process's generated descriptor pool (which also holds grpc.health.v1, compiled into fq_proto so
// that reflection clients can describe and call Health).
//
// Ownership: the service holds the list of service names it advertises; gRPC owns each stream's
// reactor and deletes it in OnDone.
// Thread safety: the service is immutable after construction; one reactor serves one stream and its
// callbacks are serialized by the read -> write -> read chain (never two operations at once).
#ifndef FIBQUANT_SERVER_REFLECTION_V1_H_
#define FIBQUANT_SERVER_REFLECTION_V1_H_

#include <string>
#include <vector>

#include "grpc/reflection/v1/reflection.grpc.pb.h"

namespace fibquant::server {

class ReflectionV1Service final : public grpc::reflection::v1::ServerReflection::CallbackService {
 public:
  // `services`: full names answered to list_services, e.g. "fibquant.v1.KvCompressionService".
  explicit ReflectionV1Service(std::vector<std::string> services);

  grpc::ServerBidiReactor<grpc::reflection::v1::ServerReflectionRequest,
                          grpc::reflection::v1::ServerReflectionResponse>*
  ServerReflectionInfo(grpc::CallbackServerContext* context) override;

  // The answer to one request (file requests: the file and its transitive dependencies).
  grpc::reflection::v1::ServerReflectionResponse Answer(
      const grpc::reflection::v1::ServerReflectionRequest& request) const;

  // The names every reflection service of fibquant-server advertises.
  static std::vector<std::string> DefaultServices(const std::string& main_service);

 private:
  std::vector<std::string> services_;
};

}  // namespace fibquant::server

#endif  // FIBQUANT_SERVER_REFLECTION_V1_H_
