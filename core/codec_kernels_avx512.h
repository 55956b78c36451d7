// Internal to the codec's search kernels (codec_kernels.cc and codec_kernels_avx512.cc): the
// AVX-512 entry points and the counters and helpers the two files share. Nothing else includes it.
// Owner: codec module. Thread safety: the counters are thread-local; the kernels are reentrant.
#ifndef FIBQUANT_CORE_CODEC_KERNELS_AVX512_H_
#define FIBQUANT_CORE_CODEC_KERNELS_AVX512_H_

#include <cstddef>
#include <cstdint>

namespace fibquant::codec_internal {

class SearchTable;

// AVX-512F + AVX-512 VNNI present (and the OS saves the ZMM state), ignoring the test hook.
bool CpuSupportsAvx512Vnni();
// This thread's diagnostic counters (see SearchTable::GroupsVisitedOnThisThread and
// ScreenFallbacksOnThisThread).
uint64_t& GroupsVisitedCounter();
uint64_t& ScreenFallbackCounter();
// 0, 1, ..., n-1: the ids of a table in index order (a thread-local array grown on demand).
const int32_t* IotaIds(uint32_t n);

// Only when Avx512Active(). The f32 blocks-across-lanes brute force (any k; the caller counts
// the groups visited) and the k = 4 screening (counts its own).
void Avx512LaneBrute(const SearchTable& t, const float* y, size_t count, uint32_t* out);
void Avx512Screen4(const SearchTable& t, const float* y, size_t count, uint32_t* out);

}  // namespace fibquant::codec_internal

#endif  // FIBQUANT_CORE_CODEC_KERNELS_AVX512_H_
