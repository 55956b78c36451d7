// How the CLI maps a tensor file onto a KV compression profile's pages, and back.
//
// Accepted tensor layouts (C order), by rank:
//   2  [tokens, head_dim]                  one sequence: layer 0, kv_head 0
//   3  [tokens, heads, head_dim]           layer 0, kv_head h (the layout of tests/data/*.f32 and of
//                                          a per-layer K or V tensor in most inference engines)
//   4  [layers, heads, tokens, head_dim]   the profile's canonical layout with batch 0
// The file must fit the profile's shape: head_dim equal, layers <= shape.layers, heads <=
// shape.kv_heads, tokens <= shape.tokens, and, when tokens < shape.tokens, a multiple of
// tokens_per_page (pages must sit on the profile's page grid, whose last page is the only short
// one). Pages are cut per (layer, head) from token 0 in steps of tokens_per_page, ordered layer,
// then head, then token_start; each page is [token_count, head_dim] token-major, converted to the
// profile's dtype (exact when the file already has it; f32 -> f16/bf16 rounds to nearest even).
//
// Ownership: the CLI engineer. Thread safety: pure functions.
#ifndef FIBQUANT_CLIENT_CLI_KV_PAGES_H_
#define FIBQUANT_CLIENT_CLI_KV_PAGES_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "client/cli/tensor_io.h"
#include "core/kv_frame.h"
#include "core/kv_shape.h"

namespace fibquant::cli {

struct TensorLayout {
  uint32_t rank = 0;
  uint32_t layers = 1;
  uint32_t heads = 1;
  uint32_t tokens = 0;
  uint32_t head_dim = 0;
  // Element index of (layer, head, token, 0).
  uint64_t RowOffset(uint32_t l, uint32_t h, uint32_t t) const;
  uint64_t element_count() const { return uint64_t{layers} * heads * tokens * head_dim; }
};

// InvalidArgument for ranks other than 2-4, zero dimensions or dimensions above 2^32-1.
[[nodiscard]] absl::StatusOr<TensorLayout> LayoutOf(const std::vector<uint64_t>& shape,
                                                    std::string_view name);

// The rules above (InvalidArgument naming the file, the dimension and the profile's value).
absl::Status CheckLayoutFitsProfile(const TensorLayout& layout, const KvTensorShape& shape,
                                    uint32_t tokens_per_page, std::string_view name);

// Pages of the grid: layers x heads x ceil(tokens / tokens_per_page), computed without
// enumerating them (0 when tokens_per_page is 0). Check it against a limit before PlanPages: a
// hostile shape can declare billions of pages.
uint64_t PageCount(const TensorLayout& layout, uint32_t tokens_per_page);

// Page coordinates in stream order (empty when tokens_per_page is 0). Allocates PageCount entries.
std::vector<KvPageCoords> PlanPages(const TensorLayout& layout, uint32_t tokens_per_page);

// Bytes of one page: token_count * head_dim elements of `out_dtype`.
std::string GatherPage(const Tensor& tensor, const TensorLayout& layout, const KvPageCoords& c,
                       DType out_dtype);

// Reassembles decoded pages into a tensor of `layout` (and `shape`, the file's original dims).
// Every page's coordinates must lie on the grid of the layout and every page of the grid must be
// present exactly once: DataLoss otherwise (naming the page).
class TensorAssembler {
 public:
  TensorAssembler(const TensorLayout& layout, std::vector<uint64_t> shape, uint32_t tokens_per_page,
                  DType dtype);
  absl::Status Add(const KvPageCoords& c, std::string_view data);
  [[nodiscard]] absl::StatusOr<Tensor> Finish();

 private:
  TensorLayout layout_;
  uint32_t tpp_;
  std::vector<bool> seen_;
  size_t added_ = 0;
  Tensor out_;
};

}  // namespace fibquant::cli

#endif  // FIBQUANT_CLIENT_CLI_KV_PAGES_H_
