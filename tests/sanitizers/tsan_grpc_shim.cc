// ThreadSanitizer shim for Debian's uninstrumented gRPC (libgrpc 1.51): the happens-before edges
// of gRPC's operation contract, made visible to TSan.
//
// Why: gRPC guarantees that everything a thread did before starting a batch of operations
// (grpc_call_start_batch: a read, a write, a finish) happens before the completion of that batch
// is delivered, on whatever thread delivers it: the callback API's functor (a reactor's
// OnReadDone / OnWriteDone, the parse of a received message) or the tag returned by
// grpc_completion_queue_next / _pluck (the synchronous API). Inside Debian's libgrpc that hand-off
// goes through atomics and lock-free queues TSan never instrumented, so TSan reports every field a
// reactor touches in two consecutive callbacks, and every message grpcpp's inline code serialises
// on one thread and parses or frees on another, as a race (71 reports in five service tests).
// Suppressing those reports would also hide real races in our reactors. Instead this file, built
// into the same LD_PRELOADed library as tsan_absl_shim.cc, interposes the exported entry points
// and annotates exactly that contract with TSan's public __tsan_release / __tsan_acquire:
//
//  - grpc_call_start_batch(call, ops, n, tag) and grpc_server_request_registered_call (whose
//    tag completes with a unary request's payload): release on `tag`; release on the bytes of every
//    refcounted slice of a SEND_MESSAGE (the in-process transport hands those very bytes to the
//    peer's RECV_MESSAGE); remember where a RECV_MESSAGE will store its buffer. For a callback-API
//    tag (a grpc_completion_queue_functor, recognised because its first word points into
//    executable code, where every other grpcpp tag starts with a vtable pointer) the functor's
//    run function is replaced by Trampoline, which performs the acquires below before running
//    the original.
//  - completion (Trampoline, or grpc_completion_queue_next / _pluck returning OP_COMPLETE):
//    acquire on the tag, and on the bytes of every slice of the received message;
//  - grpc_byte_buffer_reader_init (where every reader of a received message starts, including a
//    unary request's payload that arrives with the call, not through a batch): acquire on the bytes.
//
// Nothing here orders two operations that gRPC does not order: a read's completion acquires only
// what was released before that read (and before earlier operations on the same tag) was started.
// The shim's own bookkeeping is guarded by a spin lock on an uninstrumented std::atomic, never an
// intercepted mutex, so it adds no edge of its own. gRPC's internal memory traffic (its own
// malloc/free/memcpy of call state) is covered by `called_from_lib` lines in tsan.supp.
//
// Built WITHOUT -fsanitize=thread; the TSan entry points are weak, so in a process without the
// TSan runtime every wrapper only forwards to the real function. scripts/ci-sanitizers runs
// tsan_grpc_shim_check.cc first, which proves the annotations both ways.
#include <dlfcn.h>
#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <link.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <unordered_map>
#include <vector>

#include "tests/sanitizers/tsan_shim_common.h"

namespace {

using fq_tsan_shim::IgnoreBegin;
using fq_tsan_shim::IgnoreEnd;
using fq_tsan_shim::Real;
using fq_tsan_shim::Tsan;

// Spin lock on an atomic of this uninstrumented library: invisible to TSan by design.
class SpinLock {
 public:
  void Lock() {
    while (flag_.exchange(true, std::memory_order_acquire)) {
    }
  }
  void Unlock() { flag_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> flag_{false};
};

// Holds the spin lock and hides the bookkeeping's own memory traffic (the map's allocations,
// which go through TSan's malloc/free interceptors) from TSan: it is ordered by the spin lock,
// which TSan cannot see.
class Guard {
 public:
  explicit Guard(SpinLock& l) : l_(l) {
    l_.Lock();
    IgnoreBegin();
  }
  ~Guard() {
    IgnoreEnd();
    l_.Unlock();
  }

 private:
  SpinLock& l_;
};

using FunctorRun = void (*)(grpc_completion_queue_functor*, int);

struct TagState {
  FunctorRun original = nullptr;             // set for callback-API tags
  grpc_byte_buffer** recv_message = nullptr;  // where the pending RECV_MESSAGE stores its buffer
};

SpinLock g_lock;
std::unordered_map<void*, TagState>* g_tags = new std::unordered_map<void*, TagState>();
std::vector<std::pair<uintptr_t, uintptr_t>>* g_exec = new std::vector<std::pair<uintptr_t, uintptr_t>>();

int CollectExec(dl_phdr_info* info, size_t, void* out) {
  auto* ranges = static_cast<std::vector<std::pair<uintptr_t, uintptr_t>>*>(out);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X)) {
      uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
      ranges->emplace_back(lo, lo + ph.p_memsz);
    }
  }
  return 0;
}

// Under g_lock. Refreshes the list once on a miss (a library loaded since).
bool IsCode(uintptr_t p) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    for (const auto& [lo, hi] : *g_exec) {
      if (p >= lo && p < hi) return true;
    }
    if (attempt == 0) {
      g_exec->clear();
      dl_iterate_phdr(CollectExec, g_exec);
    }
  }
  return false;
}

void ForEachSliceBytes(const grpc_byte_buffer* bb, void (*fn)(void*)) {
  if (bb == nullptr || bb->type != GRPC_BB_RAW) return;
  const grpc_slice_buffer& sb = bb->data.raw.slice_buffer;
  for (size_t i = 0; i < sb.count; ++i) {
    // Inlined slices are copied by value; only refcounted bytes are shared between threads.
    if (sb.slices[i].refcount != nullptr) fn(sb.slices[i].data.refcounted.bytes);
  }
}

void Release(void* p) { __tsan_release(p); }
void Acquire(void* p) { __tsan_acquire(p); }

// The acquire side of a completed batch on `tag`.
void Completed(void* tag) {
  grpc_byte_buffer** recv = nullptr;
  {
    Guard g(g_lock);
    auto it = g_tags->find(tag);
    if (it != g_tags->end()) recv = it->second.recv_message;
  }
  __tsan_acquire(tag);
  if (recv != nullptr) ForEachSliceBytes(*recv, Acquire);
}

void Trampoline(grpc_completion_queue_functor* f, int ok) {
  FunctorRun original = nullptr;
  {
    Guard g(g_lock);
    auto it = g_tags->find(f);
    if (it != g_tags->end()) original = it->second.original;
  }
  if (original == nullptr) {
    std::fprintf(stderr, "tsan_grpc_shim: completion of an unknown functor %p\n", static_cast<void*>(f));
    std::abort();
  }
  Completed(f);
  original(f, ok);
}

}  // namespace

namespace {

// The release side, before a batch (or a server call request) with `tag` is handed to gRPC.
void Started(void* tag, grpc_byte_buffer** recv) {
  if (!Tsan() || tag == nullptr || reinterpret_cast<uintptr_t>(tag) % alignof(void*) != 0) return;
  {
    Guard g(g_lock);
    TagState& st = (*g_tags)[tag];
    st.recv_message = recv;
    // grpcpp's tags are either functors (first word: the run function) or objects with a vtable
    // (first word: a pointer into read-only data).
    auto* functor = static_cast<grpc_completion_queue_functor*>(tag);
    FunctorRun run = functor->functor_run;
    if (run != &Trampoline && IsCode(reinterpret_cast<uintptr_t>(run))) {
      st.original = run;
      functor->functor_run = &Trampoline;
    }
  }
  __tsan_release(tag);
}

}  // namespace

extern "C" grpc_call_error grpc_call_start_batch(grpc_call* call, const grpc_op* ops, size_t nops,
                                                 void* tag, void* reserved) {
  static const auto real =
      Real<grpc_call_error (*)(grpc_call*, const grpc_op*, size_t, void*, void*)>("grpc_call_start_batch");
  if (Tsan()) {
    grpc_byte_buffer** recv = nullptr;
    for (size_t i = 0; i < nops; ++i) {
      if (ops[i].op == GRPC_OP_SEND_MESSAGE) ForEachSliceBytes(ops[i].data.send_message.send_message, Release);
      if (ops[i].op == GRPC_OP_RECV_MESSAGE) recv = ops[i].data.recv_message.recv_message;
    }
    Started(tag, recv);
  }
  return real(call, ops, nops, tag, reserved);
}

// A server's request for the next call of a registered method: for unary and server-streaming
// methods the request message arrives with it (optional_payload), not through a RECV_MESSAGE batch.
extern "C" grpc_call_error grpc_server_request_registered_call(
    grpc_server* server, void* registered_method, grpc_call** call, gpr_timespec* deadline,
    grpc_metadata_array* request_metadata, grpc_byte_buffer** optional_payload,
    grpc_completion_queue* cq_bound_to_call, grpc_completion_queue* cq_for_notification, void* tag) {
  static const auto real =
      Real<grpc_call_error (*)(grpc_server*, void*, grpc_call**, gpr_timespec*, grpc_metadata_array*,
                               grpc_byte_buffer**, grpc_completion_queue*, grpc_completion_queue*, void*)>(
          "grpc_server_request_registered_call");
  Started(tag, optional_payload);
  return real(server, registered_method, call, deadline, request_metadata, optional_payload,
              cq_bound_to_call, cq_for_notification, tag);
}

// Every reader of a received message (grpcpp's ProtoBufferReader, ByteBuffer::Dump) starts here, on
// the thread about to read its bytes: acquire them. This covers the messages that arrive without a
// RECV_MESSAGE batch, e.g. a unary request's payload delivered with the call itself.
extern "C" int grpc_byte_buffer_reader_init(grpc_byte_buffer_reader* reader, grpc_byte_buffer* buffer) {
  static const auto real =
      Real<int (*)(grpc_byte_buffer_reader*, grpc_byte_buffer*)>("grpc_byte_buffer_reader_init");
  if (Tsan()) ForEachSliceBytes(buffer, Acquire);
  return real(reader, buffer);
}

extern "C" grpc_event grpc_completion_queue_next(grpc_completion_queue* cq, gpr_timespec deadline,
                                                 void* reserved) {
  static const auto real =
      Real<grpc_event (*)(grpc_completion_queue*, gpr_timespec, void*)>("grpc_completion_queue_next");
  grpc_event ev = real(cq, deadline, reserved);
  if (Tsan() && ev.type == GRPC_OP_COMPLETE) Completed(ev.tag);
  return ev;
}

extern "C" grpc_event grpc_completion_queue_pluck(grpc_completion_queue* cq, void* tag,
                                                  gpr_timespec deadline, void* reserved) {
  static const auto real = Real<grpc_event (*)(grpc_completion_queue*, void*, gpr_timespec, void*)>(
      "grpc_completion_queue_pluck");
  grpc_event ev = real(cq, tag, deadline, reserved);
  if (Tsan() && ev.type == GRPC_OP_COMPLETE) Completed(ev.tag);
  return ev;
}
