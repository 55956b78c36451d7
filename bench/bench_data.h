// USE-Lite Q/K/V files for the bench programs (codec_bench, baselines_bench, fidelity_report):
// the full data set in FQ_SHARED_DATA_DIR/use-lite-qkv (../shared/data beside the checkout) when
// it is there, else the 64-token fixture in FQ_TEST_DATA_DIR (tests/data). Both macros are set by
// bench/CMakeLists.txt for every bench target.
//
// Files are raw little-endian f32 arrays named L<layer>_<q|k|v>.f32 ([tokens, heads, d]).
// Thread safety: plain functions without shared state.
#ifndef FIBQUANT_BENCH_BENCH_DATA_H_
#define FIBQUANT_BENCH_BENCH_DATA_H_

#include <cstddef>
#include <fstream>
#include <string>
#include <vector>

namespace fibquant::bench {

enum class UseLiteSource { kShared, kFixture };

// The directory of `src`, ending in '/'.
inline std::string UseLiteDir(UseLiteSource src) {
  return src == UseLiteSource::kShared ? std::string(FQ_SHARED_DATA_DIR) + "/use-lite-qkv/"
                                       : std::string(FQ_TEST_DATA_DIR) + "/";
}

// The whole file as floats; empty if it cannot be opened.
inline std::vector<float> ReadF32(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<float> v;
  if (!f) return v;
  f.seekg(0, std::ios::end);
  v.resize(static_cast<size_t>(f.tellg()) / 4);
  f.seekg(0);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * 4));
  return v;
}

// `file` (e.g. "L1_k.f32") from the shared data set if that copy holds at least `min_values`
// floats, else the fixture's copy (which may be shorter or empty: callers check). `*from` says
// which was returned.
inline std::vector<float> ReadUseLiteF32(const std::string& file, size_t min_values, UseLiteSource* from) {
  std::vector<float> v = ReadF32(UseLiteDir(UseLiteSource::kShared) + file);
  *from = UseLiteSource::kShared;
  if (v.size() >= min_values) return v;
  *from = UseLiteSource::kFixture;
  return ReadF32(UseLiteDir(UseLiteSource::kFixture) + file);
}

// Layer `layer`'s queries, keys and values from `src`. True if all three were read, non-empty
// and of the same size.
inline bool ReadUseLiteQkv(UseLiteSource src, int layer, std::vector<float>* q, std::vector<float>* k,
                           std::vector<float>* v) {
  std::string pre = UseLiteDir(src);
  pre += "L";
  pre += std::to_string(layer);
  pre += "_";
  *q = ReadF32(pre + "q.f32");
  *k = ReadF32(pre + "k.f32");
  *v = ReadF32(pre + "v.f32");
  return !q->empty() && q->size() == k->size() && k->size() == v->size();
}

}  // namespace fibquant::bench

#endif  // FIBQUANT_BENCH_BENCH_DATA_H_
