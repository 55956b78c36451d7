#include "client/cli/kv_pages.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/half.h"

namespace fibquant::cli {

uint64_t TensorLayout::RowOffset(uint32_t l, uint32_t h, uint32_t t) const {
  switch (rank) {
    case 2:
      return uint64_t{t} * head_dim;
    case 3:
      return (uint64_t{t} * heads + h) * head_dim;
    default:
      return ((uint64_t{l} * heads + h) * tokens + t) * head_dim;
  }
}

absl::StatusOr<TensorLayout> LayoutOf(const std::vector<uint64_t>& shape, std::string_view name) {
  const std::string n(name);
  if (shape.size() < 2 || shape.size() > 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        n, ": rank ", shape.size(),
        " tensor; expected [tokens, head_dim], [tokens, heads, head_dim] or [layers, heads, tokens, head_dim]"));
  }
  for (uint64_t d : shape) {
    if (d == 0 || d > std::numeric_limits<uint32_t>::max()) {
      return absl::InvalidArgumentError(absl::StrCat(n, ": every dimension must be in [1, 2^32-1], got ", d));
    }
  }
  TensorLayout l;
  l.rank = static_cast<uint32_t>(shape.size());
  if (shape.size() == 2) {
    l.tokens = static_cast<uint32_t>(shape[0]);
    l.head_dim = static_cast<uint32_t>(shape[1]);
  } else if (shape.size() == 3) {
    l.tokens = static_cast<uint32_t>(shape[0]);
    l.heads = static_cast<uint32_t>(shape[1]);
    l.head_dim = static_cast<uint32_t>(shape[2]);
  } else {
    l.layers = static_cast<uint32_t>(shape[0]);
    l.heads = static_cast<uint32_t>(shape[1]);
    l.tokens = static_cast<uint32_t>(shape[2]);
    l.head_dim = static_cast<uint32_t>(shape[3]);
  }
  return l;
}

absl::Status CheckLayoutFitsProfile(const TensorLayout& l, const KvTensorShape& s, uint32_t tpp,
                                    std::string_view name) {
  const std::string n(name);
  if (l.head_dim != s.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(n, ": head_dim ", l.head_dim, " != the profile's head_dim ", s.head_dim));
  }
  if (l.layers > s.layers) {
    return absl::InvalidArgumentError(absl::StrCat(n, ": ", l.layers, " layers > the profile's ", s.layers));
  }
  if (l.heads > s.kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat(n, ": ", l.heads, " heads > the profile's kv_heads ", s.kv_heads));
  }
  if (l.tokens > s.tokens) {
    return absl::InvalidArgumentError(absl::StrCat(n, ": ", l.tokens, " tokens > the profile's ", s.tokens));
  }
  if (l.tokens != s.tokens && (tpp == 0 || l.tokens % tpp != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        n, ": ", l.tokens, " tokens is neither the profile's ", s.tokens,
        " nor a multiple of its tokens_per_page ", tpp, " (pages must sit on the page grid)"));
  }
  return absl::OkStatus();
}

uint64_t PageCount(const TensorLayout& l, uint32_t tpp) {
  if (tpp == 0) return 0;
  // layers, heads < 2^32 and pages per sequence <= 2^32: the product can pass 2^64 only for
  // absurd shapes; saturate rather than wrap.
  const uint64_t per_seq = (uint64_t{l.tokens} + tpp - 1) / tpp;
  const uint64_t seqs = uint64_t{l.layers} * l.heads;
  if (per_seq != 0 && seqs > UINT64_MAX / per_seq) return UINT64_MAX;
  return seqs * per_seq;
}

std::vector<KvPageCoords> PlanPages(const TensorLayout& l, uint32_t tpp) {
  std::vector<KvPageCoords> out;
  if (tpp == 0) return out;
  out.reserve(PageCount(l, tpp));
  for (uint32_t layer = 0; layer < l.layers; ++layer) {
    for (uint32_t h = 0; h < l.heads; ++h) {
      // 64-bit: with tokens near 2^32, t + tpp would wrap a uint32_t and never reach `tokens`.
      for (uint64_t t = 0; t < l.tokens; t += tpp) {
        const auto start = static_cast<uint32_t>(t);
        out.push_back(KvPageCoords{0, layer, h, start, std::min(tpp, l.tokens - start)});
      }
    }
  }
  return out;
}

std::string GatherPage(const Tensor& tensor, const TensorLayout& l, const KvPageCoords& c, DType out_dtype) {
  const size_t in_size = DTypeSize(tensor.dtype);
  const size_t out_size = DTypeSize(out_dtype);
  std::string page(size_t{c.token_count} * l.head_dim * out_size, '\0');
  const auto* src = reinterpret_cast<const uint8_t*>(tensor.data.data());
  auto* dst = reinterpret_cast<uint8_t*>(page.data());
  for (uint32_t t = 0; t < c.token_count; ++t) {
    const uint64_t row = l.RowOffset(c.layer, c.kv_head, c.token_start + t);
    if (tensor.dtype == out_dtype) {
      std::memcpy(dst + size_t{t} * l.head_dim * out_size, src + row * in_size, size_t{l.head_dim} * in_size);
    } else {
      for (uint32_t d = 0; d < l.head_dim; ++d) {
        StoreElement(out_dtype, LoadElement(tensor.dtype, src, row + d), dst, size_t{t} * l.head_dim + d);
      }
    }
  }
  return page;
}

TensorAssembler::TensorAssembler(const TensorLayout& layout, std::vector<uint64_t> shape, uint32_t tpp,
                                 DType dtype)
    : layout_(layout), tpp_(tpp) {
  out_.dtype = dtype;
  out_.shape = std::move(shape);
  const uint64_t per_seq = tpp == 0 ? 0 : (uint64_t{layout.tokens} + tpp - 1) / tpp;
  seen_.assign(uint64_t{layout.layers} * layout.heads * per_seq, false);
  out_.data.assign(layout.element_count() * DTypeSize(dtype), '\0');
}

absl::Status TensorAssembler::Add(const KvPageCoords& c, std::string_view data) {
  const std::string where = absl::StrCat("page (layer ", c.layer, ", head ", c.kv_head, ", tokens ",
                                         c.token_start, "+", c.token_count, ")");
  if (c.batch != 0 || c.layer >= layout_.layers || c.kv_head >= layout_.heads || tpp_ == 0 ||
      c.token_start >= layout_.tokens || c.token_start % tpp_ != 0 ||
      c.token_count != std::min(tpp_, layout_.tokens - c.token_start)) {
    return absl::DataLossError(absl::StrCat(where, " does not fit the container's tensor layout"));
  }
  const size_t es = DTypeSize(out_.dtype);
  if (data.size() != size_t{c.token_count} * layout_.head_dim * es) {
    return absl::DataLossError(absl::StrCat(where, ": ", data.size(), " bytes, expected ",
                                            size_t{c.token_count} * layout_.head_dim * es));
  }
  const uint64_t per_seq = (uint64_t{layout_.tokens} + tpp_ - 1) / tpp_;
  const uint64_t idx = (uint64_t{c.layer} * layout_.heads + c.kv_head) * per_seq + c.token_start / tpp_;
  if (seen_[idx]) return absl::DataLossError(absl::StrCat(where, " appears twice"));
  seen_[idx] = true;
  ++added_;
  for (uint32_t t = 0; t < c.token_count; ++t) {
    const uint64_t row = layout_.RowOffset(c.layer, c.kv_head, c.token_start + t);
    std::memcpy(out_.data.data() + row * es, data.data() + size_t{t} * layout_.head_dim * es,
                size_t{layout_.head_dim} * es);
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> TensorAssembler::Finish() {
  if (added_ != seen_.size()) {
    return absl::DataLossError(absl::StrCat("container holds ", added_, " of the ", seen_.size(),
                                            " pages of its tensor"));
  }
  return std::move(out_);
}

}  // namespace fibquant::cli
