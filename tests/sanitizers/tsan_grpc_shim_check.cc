// Self-check of tests/sanitizers/tsan_grpc_shim.cc, run by scripts/ci-sanitizers before the TSan
// tests. A callback-API bidi reactor (the shape of our PageStream) receives messages over an
// in-process channel from a client on another thread:
//  - default mode: the reactor touches its plain (unlocked) fields and reads every byte the client
//    wrote into the message, then starts the next read. gRPC orders each OnReadDone after the read
//    it completes, so this must give no report with the shim (without it TSan reports both the
//    fields and the bytes);
//  - "race": the reactor touches the same field again *after* starting the next read, a real race
//    with the next OnReadDone that gRPC does not order; TSan must still report it.
// So the shim removes the false reports of uninstrumented gRPC without hiding real races.
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace {

bool g_race = false;
constexpr int kMessages = 1000;
constexpr size_t kBytes = 4096;  // refcounted slices, shared by the in-process transport

class Reactor final : public grpc::ServerGenericBidiReactor {
 public:
  Reactor() { StartRead(&buf_); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      std::lock_guard<std::mutex> lock(mu_);
      Finish(count_ == kMessages && sum_ == uint64_t{kMessages} * kBytes * 7
                 ? grpc::Status::OK
                 : grpc::Status(grpc::StatusCode::DATA_LOSS, "wrong count or bytes"));
      return;
    }
    ++count_;
    ++touched_;
    std::vector<grpc::Slice> slices;
    if (!buf_.Dump(&slices).ok()) std::abort();
    for (const grpc::Slice& s : slices) {
      for (const uint8_t* p = s.begin(); p != s.end(); ++p) sum_ += *p;
    }
    StartRead(&buf_);
    if (g_race) ++touched_;  // after the hand-off: races with the next OnReadDone
  }

  // As PageStream does (Finish under its mutex, OnDone takes it before deleting): gRPC runs OnDone
  // after Finish completed, but for this generic handler (instantiated inside libgrpc++) through a
  // reference count TSan cannot see; the mutex is the edge our own reactors have anyway.
  void OnDone() override {
    { std::lock_guard<std::mutex> lock(mu_); }
    delete this;
  }

 private:
  std::mutex mu_;
  grpc::ByteBuffer buf_;
  int count_ = 0;      // plain fields: only ordered by gRPC's read contract
  uint64_t sum_ = 0;
  int touched_ = 0;
};

class Service final : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    return new Reactor;
  }
};

void* Tag(intptr_t i) { return reinterpret_cast<void*>(i); }

bool Next(grpc::CompletionQueue& cq, intptr_t want) {
  void* tag = nullptr;
  bool ok = false;
  if (!cq.Next(&tag, &ok) || tag != Tag(want)) std::abort();
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  g_race = argc > 1 && std::strcmp(argv[1], "race") == 0;
  Service service;
  grpc::ServerBuilder builder;
  builder.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();

  grpc::GenericStub stub(server->InProcessChannel(grpc::ChannelArguments()));
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  auto call = stub.PrepareCall(&ctx, "/check.Check/Stream", &cq);
  call->StartCall(Tag(1));
  if (!Next(cq, 1)) std::abort();
  for (int i = 0; i < kMessages; ++i) {
    grpc::Slice slice(kBytes);
    std::memset(const_cast<uint8_t*>(slice.begin()), 7, kBytes);  // written by this thread
    grpc::ByteBuffer msg(&slice, 1);
    call->Write(msg, Tag(2));
    if (!Next(cq, 2)) std::abort();
  }
  call->WritesDone(Tag(3));
  Next(cq, 3);
  grpc::Status status;
  call->Finish(&status, Tag(4));
  Next(cq, 4);
  server->Shutdown();
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
  if (!status.ok()) {
    std::fprintf(stderr, "tsan_grpc_shim_check: stream failed: %s\n", status.error_message().c_str());
    return 1;
  }
  return 0;
}
