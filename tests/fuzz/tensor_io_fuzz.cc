// Fuzz target: the `fibquant` CLI's tensor readers (client/cli/tensor_io.h). Byte 0 picks the
// reader: bit 0 clear = ParseNpy (bit 1 = bf16_from_u16), set = ReadSafetensors (the rest of the
// input written to a memfd, read back through /proc/self/fd). Limits are small (1 MiB data) so a
// header claiming a huge tensor must be refused, not allocated.
// Invariants: never crash; errors are InvalidArgument/DataLoss/ResourceExhausted/OutOfRange; an
// accepted tensor has data.size() == product(shape) * DTypeSize(dtype) and rank <= max_rank.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "client/cli/tensor_io.h"
#include "tests/fuzz/fuzz_util.h"

using fibquant::fuzz::IsInputError;

namespace {

void Check(const absl::StatusOr<fibquant::cli::Tensor>& t, const fibquant::cli::TensorLimits& limits) {
  if (!t.ok()) {
    FQ_FUZZ_CHECK(IsInputError(t.status()));
    return;
  }
  FQ_FUZZ_CHECK(t->shape.size() <= limits.max_rank);
  unsigned __int128 n = 1;
  for (uint64_t d : t->shape) n *= d;
  FQ_FUZZ_CHECK(n * fibquant::DTypeSize(t->dtype) == t->data.size());
  FQ_FUZZ_CHECK(t->data.size() <= limits.max_data_bytes);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  fibquant::cli::TensorLimits limits;
  limits.max_data_bytes = 1 << 20;
  limits.max_header_bytes = 1 << 16;
  const std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  if ((data[0] & 1) == 0) {
    Check(fibquant::cli::ParseNpy(rest, "fuzz.npy", (data[0] & 2) != 0, limits), limits);
    return 0;
  }
  const int fd = memfd_create("fuzz.safetensors", MFD_CLOEXEC);
  if (fd < 0) return 0;
  if (write(fd, rest.data(), rest.size()) == static_cast<ssize_t>(rest.size())) {
    Check(fibquant::cli::ReadSafetensors("/proc/self/fd/" + std::to_string(fd), "", limits), limits);
  }
  close(fd);
  return 0;
}
