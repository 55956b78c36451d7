// Fuzz target: the service's request handling over an in-process channel (no ports).
// Input: byte 0 picks the RPC (mod 3): 0 RegisterProfile (the rest is one serialized
// RegisterProfileRequest), 1 CompressPages, 2 DecompressPages (the rest is a sequence of
// [u16 little-endian length][serialized request] chunks, each sent as one stream message;
// unparsable chunks are skipped). A stream header whose profile_digest is "@" is given the digest of
// a profile registered at start-up, so the fuzzer reaches page and frame handling.
// Invariants: never crash or leak; no INTERNAL/UNKNOWN/DEADLINE status (each call has a 20 s
// deadline); after every call the service has no open stream left (within 5 s).
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "server/service.h"
#include "tests/fuzz/fuzz_profiles.h"
#include "tests/fuzz/fuzz_util.h"

namespace v1 = ::fibquant::v1;
using fibquant::server::KvCompressionServiceImpl;
using fibquant::server::ServiceOptions;

namespace {

struct Env {
  std::unique_ptr<KvCompressionServiceImpl> svc;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<v1::KvCompressionService::Stub> stub;
  std::string digest;  // of the profile registered at start-up
};

Env* g_env = nullptr;

std::chrono::system_clock::time_point Deadline() {
  return std::chrono::system_clock::now() + std::chrono::seconds(20);
}

void CheckStatus(const grpc::Status& s) {
  const grpc::StatusCode c = s.error_code();
  if (c == grpc::StatusCode::INTERNAL || c == grpc::StatusCode::UNKNOWN ||
      c == grpc::StatusCode::DEADLINE_EXCEEDED) {
    std::fprintf(stderr, "bad status %d: %s\n", static_cast<int>(c), s.error_message().c_str());
    __builtin_trap();
  }
}

void WaitNoOpenStreams() {
  for (int i = 0; i < 5000 && g_env->svc->open_streams() != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  FQ_FUZZ_CHECK(g_env->svc->open_streams() == 0);
}

std::vector<std::string> Chunks(const uint8_t* data, size_t size) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos + 2 <= size && out.size() < 64) {
    const size_t len = data[pos] | (size_t{data[pos + 1]} << 8);
    pos += 2;
    const size_t n = len < size - pos ? len : size - pos;
    out.emplace_back(reinterpret_cast<const char*>(data + pos), n);
    pos += n;
  }
  return out;
}

template <typename Req, typename Resp, typename Open>
void RunStream(const std::vector<std::string>& chunks, Open open) {
  grpc::ClientContext ctx;
  ctx.set_deadline(Deadline());
  auto stream = open(&ctx);
  std::thread writer([&] {
    for (const std::string& c : chunks) {
      Req r;
      if (!r.ParseFromString(c)) continue;
      if (r.has_header() && r.header().profile_digest() == "@") {
        r.mutable_header()->set_profile_digest(g_env->digest);
      }
      if (!stream->Write(r)) break;
    }
    stream->WritesDone();
  });
  Resp resp;
  int reads = 0;
  while (stream->Read(&resp) && ++reads < 1000) {
  }
  writer.join();
  CheckStatus(stream->Finish());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_env = new Env;
  ServiceOptions o;
  o.worker_threads = 2;
  o.build_threads = 1;
  o.max_profile_build_cost = 5'000'000;  // fuzzed specs build only small codebooks
  o.max_profiles = 64;
  auto svc = KvCompressionServiceImpl::Create(o, nullptr);
  if (!svc.ok()) {
    std::fprintf(stderr, "service: %s\n", svc.status().ToString().c_str());
    std::abort();
  }
  g_env->svc = *std::move(svc);
  grpc::ServerBuilder b;
  b.RegisterService(g_env->svc.get());
  g_env->server = b.BuildAndStart();
  g_env->stub = v1::KvCompressionService::NewStub(g_env->server->InProcessChannel(grpc::ChannelArguments()));
  grpc::ClientContext ctx;
  v1::RegisterProfileRequest req;
  req.set_spec_json(fibquant::fuzz::FuzzSpecs()[0]);
  v1::RegisterProfileResponse resp;
  grpc::Status s = g_env->stub->RegisterProfile(&ctx, req, &resp);
  if (!s.ok()) {
    std::fprintf(stderr, "register: %s\n", s.error_message().c_str());
    std::abort();
  }
  g_env->digest = resp.profile().digest();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  switch (data[0] % 3) {
    case 0: {
      v1::RegisterProfileRequest req;
      if (!req.ParseFromArray(data + 1, static_cast<int>(size - 1))) return 0;
      grpc::ClientContext ctx;
      ctx.set_deadline(Deadline());
      v1::RegisterProfileResponse resp;
      CheckStatus(g_env->stub->RegisterProfile(&ctx, req, &resp));
      break;
    }
    case 1:
      RunStream<v1::CompressPagesRequest, v1::CompressPagesResponse>(
          Chunks(data + 1, size - 1), [](grpc::ClientContext* c) { return g_env->stub->CompressPages(c); });
      break;
    default:
      RunStream<v1::DecompressPagesRequest, v1::DecompressPagesResponse>(
          Chunks(data + 1, size - 1), [](grpc::ClientContext* c) { return g_env->stub->DecompressPages(c); });
      break;
  }
  WaitNoOpenStreams();
  return 0;
}
