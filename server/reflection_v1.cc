#include "server/reflection_v1.h"

#include <algorithm>
#include <utility>

#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"
#include "grpc/health/v1/health.pb.h"

namespace fibquant::server {
namespace {

namespace v1 = grpc::reflection::v1;
using google::protobuf::DescriptorPool;
using google::protobuf::FileDescriptor;

void SetError(v1::ServerReflectionResponse* response, grpc::StatusCode code,
              const std::string& message) {
  response->mutable_error_response()->set_error_code(static_cast<int32_t>(code));
  response->mutable_error_response()->set_error_message(message);
}

// The file first, then its transitive dependencies, each once per response. (Every response is
// complete on its own, as gRPC's v1alpha answers are: clients may not keep earlier answers.)
void AddFile(const FileDescriptor* file, v1::ServerReflectionResponse* response) {
  std::vector<const FileDescriptor*> pending{file};
  std::vector<std::string> sent;
  while (!pending.empty()) {
    const FileDescriptor* f = pending.back();
    pending.pop_back();
    if (std::find(sent.begin(), sent.end(), f->name()) != sent.end()) continue;
    sent.push_back(f->name());
    google::protobuf::FileDescriptorProto proto;
    f->CopyTo(&proto);
    proto.SerializeToString(
        response->mutable_file_descriptor_response()->add_file_descriptor_proto());
    for (int i = 0; i < f->dependency_count(); ++i) pending.push_back(f->dependency(i));
  }
}

class Reactor final
    : public grpc::ServerBidiReactor<v1::ServerReflectionRequest, v1::ServerReflectionResponse> {
 public:
  explicit Reactor(const ReflectionV1Service* service) : service_(service) { StartRead(&request_); }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed (or the call ended): the stream is complete
      Finish(grpc::Status::OK);
      return;
    }
    response_ = service_->Answer(request_);
    StartWrite(&response_);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "reflection response not delivered"));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override { delete this; }

 private:
  const ReflectionV1Service* service_;
  v1::ServerReflectionRequest request_;
  v1::ServerReflectionResponse response_;
};

}  // namespace

ReflectionV1Service::ReflectionV1Service(std::vector<std::string> services)
    : services_(std::move(services)) {
  // Nothing else references grpc/health/v1/health.pb.o (gRPC's health service encodes by hand), so
  // a static link would drop it and its descriptor with it; this use keeps it in every binary that
  // serves reflection.
  (void)grpc::health::v1::HealthCheckRequest::descriptor();
}

std::vector<std::string> ReflectionV1Service::DefaultServices(const std::string& main_service) {
  return {main_service, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
          "grpc.reflection.v1alpha.ServerReflection"};
}

grpc::ServerBidiReactor<v1::ServerReflectionRequest, v1::ServerReflectionResponse>*
ReflectionV1Service::ServerReflectionInfo(grpc::CallbackServerContext*) {
  return new Reactor(this);
}

v1::ServerReflectionResponse ReflectionV1Service::Answer(
    const v1::ServerReflectionRequest& request) const {
  const DescriptorPool* pool = DescriptorPool::generated_pool();
  v1::ServerReflectionResponse response;
  response.set_valid_host(request.host());
  *response.mutable_original_request() = request;
  switch (request.message_request_case()) {
    case v1::ServerReflectionRequest::kFileByFilename: {
      const FileDescriptor* f = pool->FindFileByName(request.file_by_filename());
      if (f == nullptr) {
        SetError(&response, grpc::StatusCode::NOT_FOUND, "File not found.");
      } else {
        AddFile(f, &response);
      }
      break;
    }
    case v1::ServerReflectionRequest::kFileContainingSymbol: {
      const FileDescriptor* f = pool->FindFileContainingSymbol(request.file_containing_symbol());
      if (f == nullptr) {
        SetError(&response, grpc::StatusCode::NOT_FOUND, "Symbol not found.");
      } else {
        AddFile(f, &response);
      }
      break;
    }
    case v1::ServerReflectionRequest::kFileContainingExtension: {
      const auto& ext = request.file_containing_extension();
      const auto* type = pool->FindMessageTypeByName(ext.containing_type());
      const auto* field =
          type == nullptr ? nullptr : pool->FindExtensionByNumber(type, ext.extension_number());
      if (field == nullptr) {
        SetError(&response, grpc::StatusCode::NOT_FOUND, "Extension not found.");
      } else {
        AddFile(field->file(), &response);
      }
      break;
    }
    case v1::ServerReflectionRequest::kAllExtensionNumbersOfType: {
      const auto* type = pool->FindMessageTypeByName(request.all_extension_numbers_of_type());
      if (type == nullptr) {
        SetError(&response, grpc::StatusCode::NOT_FOUND, "Type not found.");
        break;
      }
      std::vector<const google::protobuf::FieldDescriptor*> fields;
      pool->FindAllExtensions(type, &fields);
      auto* out = response.mutable_all_extension_numbers_response();
      out->set_base_type_name(type->full_name());
      for (const auto* f : fields) out->add_extension_number(f->number());
      break;
    }
    case v1::ServerReflectionRequest::kListServices:
      for (const auto& name : services_) {
        response.mutable_list_services_response()->add_service()->set_name(name);
      }
      break;
    default:
      SetError(&response, grpc::StatusCode::UNIMPLEMENTED, "The request is not supported.");
      break;
  }
  return response;
}

}  // namespace fibquant::server
