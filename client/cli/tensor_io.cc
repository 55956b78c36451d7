#include "client/cli/tensor_io.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace fibquant::cli {
namespace {

// Random access to the input: a file (read on demand, so only validated ranges are allocated) or
// bytes already in memory.
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  virtual uint64_t size() const = 0;
  // Reads [offset, offset+n); the caller has checked the range against size().
  virtual absl::Status Read(uint64_t offset, uint64_t n, std::string* out) = 0;
};

class MemorySource : public ByteSource {
 public:
  explicit MemorySource(std::string_view bytes) : bytes_(bytes) {}
  uint64_t size() const override { return bytes_.size(); }
  absl::Status Read(uint64_t offset, uint64_t n, std::string* out) override {
    out->assign(bytes_.substr(offset, n));
    return absl::OkStatus();
  }

 private:
  std::string_view bytes_;
};

class FileSource : public ByteSource {
 public:
  static absl::StatusOr<std::unique_ptr<FileSource>> Open(const std::string& path) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) {
      return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    }
    if (std::filesystem::is_directory(path, ec)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": is a directory"));
    }
    auto src = std::unique_ptr<FileSource>(new FileSource(path));
    if (!src->in_) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot open for reading"));
    src->in_.seekg(0, std::ios::end);
    const std::streamoff end = src->in_.tellg();
    if (end < 0) return absl::InternalError(absl::StrCat(path, ": cannot determine the file size"));
    src->size_ = static_cast<uint64_t>(end);
    return src;
  }
  uint64_t size() const override { return size_; }
  absl::Status Read(uint64_t offset, uint64_t n, std::string* out) override {
    out->resize(n);
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(out->data(), static_cast<std::streamsize>(n));
    if (static_cast<uint64_t>(in_.gcount()) != n) {
      return absl::DataLossError(absl::StrCat(path_, ": short read at offset ", offset,
                                              " (file changed while reading?)"));
    }
    return absl::OkStatus();
  }

 private:
  explicit FileSource(const std::string& path) : path_(path), in_(path, std::ios::binary) {}
  std::string path_;
  std::ifstream in_;
  uint64_t size_ = 0;
};

uint64_t LoadLe(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

void AppendLe(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// product(shape) * element_size with overflow detection.
absl::StatusOr<uint64_t> ByteSize(std::string_view name, const std::vector<uint64_t>& shape,
                                  size_t element_size) {
  uint64_t n = element_size;
  for (uint64_t d : shape) {
    if (d != 0 && n > std::numeric_limits<uint64_t>::max() / d) {
      return absl::InvalidArgumentError(absl::StrCat(
          std::string(name), ": declared shape [", absl::StrJoin(shape, ", "),
          "] overflows a 64-bit byte count"));
    }
    n *= d;
  }
  return n;
}

std::string ShapeText(const std::vector<uint64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Checks a declared payload of `need` bytes at `offset` against the source and the limits, in the
// order that makes a lying header cheap: truncation first (DataLoss), then the memory limit.
// `declared_by` says where `need` comes from ("the header declares", or the flags for raw files,
// which have no header).
absl::Status CheckPayload(std::string_view name, uint64_t offset, uint64_t need, uint64_t have_total,
                          const TensorLimits& limits,
                          std::string_view declared_by = "the header declares") {
  const uint64_t have = have_total > offset ? have_total - offset : 0;
  if (need > have) {
    return absl::DataLossError(absl::StrCat(std::string(name), ": truncated: ", std::string(declared_by), " ",
                                            need, " data bytes but the file has ", have));
  }
  if (need > limits.max_data_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(std::string(name), ": tensor of ", need,
                                                     " bytes is above the limit of ",
                                                     limits.max_data_bytes, " bytes"));
  }
  return absl::OkStatus();
}

// ---- .npy header dict: {'descr': '<f4', 'fortran_order': False, 'shape': (64, 4, 128), }

class DictParser {
 public:
  DictParser(std::string_view text, std::string_view name) : s_(text), name_(name) {}

  struct Value {
    std::optional<std::string> str;
    std::optional<bool> boolean;
    std::optional<std::vector<uint64_t>> tuple;
  };

  absl::StatusOr<std::map<std::string, Value>> Parse() {
    std::map<std::string, Value> out;
    SkipWs();
    if (!Eat('{')) return Err("header does not start with '{'");
    while (true) {
      SkipWs();
      if (Eat('}')) break;
      auto key = ParseString();
      if (!key.ok()) return key.status();
      SkipWs();
      if (!Eat(':')) return Err(absl::StrCat("expected ':' after key '", *key, "'"));
      SkipWs();
      Value v;
      if (Peek() == '\'' || Peek() == '"') {
        auto str = ParseString();
        if (!str.ok()) return str.status();
        v.str = *str;
      } else if (s_.substr(pos_, 4) == "True") {
        pos_ += 4;
        v.boolean = true;
      } else if (s_.substr(pos_, 5) == "False") {
        pos_ += 5;
        v.boolean = false;
      } else if (Eat('(')) {
        std::vector<uint64_t> dims;
        while (true) {
          SkipWs();
          if (Eat(')')) break;
          size_t start = pos_;
          while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
          if (start == pos_) return Err("shape tuple holds a non-integer");
          uint64_t d = 0;
          if (!absl::SimpleAtoi(std::string(s_.substr(start, pos_ - start)), &d)) {
            return Err("shape dimension does not fit in 64 bits");
          }
          if (dims.size() >= 64) return Err("shape tuple has more than 64 dimensions");
          dims.push_back(d);
          SkipWs();
          if (Eat(')')) break;
          if (!Eat(',')) return Err("expected ',' or ')' in the shape tuple");
        }
        v.tuple = std::move(dims);
      } else {
        return Err(absl::StrCat("unsupported value for key '", *key, "'"));
      }
      if (out.count(*key) != 0) return Err(absl::StrCat("duplicate key '", *key, "'"));
      out[*key] = std::move(v);
      SkipWs();
      if (Eat('}')) break;
      if (!Eat(',')) return Err("expected ',' or '}' in the header dict");
    }
    SkipWs();
    if (pos_ != s_.size()) return Err("trailing characters after the header dict");
    return out;
  }

 private:
  absl::Status Err(std::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(name_), ": malformed .npy header: ", std::string(what)));
  }
  char Peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  bool Eat(char c) {
    if (Peek() != c) return false;
    ++pos_;
    return true;
  }
  void SkipWs() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\t' ||
                                s_[pos_] == '\r' || s_[pos_] == '\x0c'))
      ++pos_;
  }
  absl::StatusOr<std::string> ParseString() {
    const char q = Peek();
    if (q != '\'' && q != '"') return Err("expected a quoted string");
    ++pos_;
    size_t start = pos_;
    while (pos_ < s_.size() && s_[pos_] != q) {
      if (s_[pos_] == '\\') return Err("escape sequences are not supported in header strings");
      ++pos_;
    }
    if (pos_ >= s_.size()) return Err("unterminated string");
    std::string out(s_.substr(start, pos_ - start));
    ++pos_;
    return out;
  }

  std::string_view s_;
  std::string_view name_;
  size_t pos_ = 0;
};

absl::StatusOr<Tensor> ReadNpyFrom(ByteSource& src, std::string_view name, bool bf16_from_u16,
                                   const TensorLimits& limits) {
  const std::string n(name);
  constexpr std::string_view kMagic("\x93NUMPY", 6);
  if (src.size() < 10) {
    // Distinguish "not an npy file at all" from "an npy file cut short".
    std::string head;
    absl::Status st = src.Read(0, src.size(), &head);
    if (!st.ok()) return st;
    if (head.size() >= 6 && std::string_view(head).substr(0, 6) == kMagic) {
      return absl::DataLossError(absl::StrCat(n, ": truncated .npy preamble (", src.size(), " bytes)"));
    }
    return absl::InvalidArgumentError(absl::StrCat(n, ": not a .npy file (bad magic)"));
  }
  std::string pre;
  absl::Status st = src.Read(0, 10, &pre);
  if (!st.ok()) return st;
  if (std::string_view(pre).substr(0, 6) != kMagic) {
    return absl::InvalidArgumentError(absl::StrCat(n, ": not a .npy file (bad magic)"));
  }
  const int major = static_cast<uint8_t>(pre[6]);
  const int minor = static_cast<uint8_t>(pre[7]);
  uint64_t header_len = 0;
  uint64_t header_start = 0;
  if (major == 1) {
    header_len = LoadLe(pre.data() + 8, 2);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (src.size() < 12) return absl::DataLossError(absl::StrCat(n, ": truncated .npy preamble"));
    st = src.Read(0, 12, &pre);
    if (!st.ok()) return st;
    header_len = LoadLe(pre.data() + 8, 4);
    header_start = 12;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(n, ": unsupported .npy format version ", major, ".", minor, " (1, 2, 3 are read)"));
  }
  if (header_len > src.size() - header_start) {
    return absl::DataLossError(absl::StrCat(n, ": truncated .npy header: declares ", header_len,
                                            " bytes, file has ", src.size() - header_start));
  }
  if (header_len > limits.max_header_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(n, ": .npy header of ", header_len,
                                                     " bytes is above the limit of ",
                                                     limits.max_header_bytes));
  }
  std::string header;
  st = src.Read(header_start, header_len, &header);
  if (!st.ok()) return st;
  if (major < 3) {
    for (unsigned char c : header) {
      if (c >= 0x80) {
        return absl::InvalidArgumentError(
            absl::StrCat(n, ": malformed .npy header: non-ASCII byte in a version ", major, " header"));
      }
    }
  }
  auto dict = DictParser(header, name).Parse();
  if (!dict.ok()) return dict.status();
  for (const char* key : {"descr", "fortran_order", "shape"}) {
    if (dict->count(key) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(n, ": malformed .npy header: missing '", key, "'"));
    }
  }
  if (dict->size() != 3) {
    return absl::InvalidArgumentError(absl::StrCat(n, ": malformed .npy header: unexpected keys"));
  }
  const auto& descr = (*dict)["descr"].str;
  const auto& fortran = (*dict)["fortran_order"].boolean;
  const auto& shape = (*dict)["shape"].tuple;
  if (!descr) return absl::InvalidArgumentError(absl::StrCat(n, ": malformed .npy header: 'descr' is not a string"));
  if (!fortran) return absl::InvalidArgumentError(absl::StrCat(n, ": malformed .npy header: 'fortran_order' is not a bool"));
  if (!shape) return absl::InvalidArgumentError(absl::StrCat(n, ": malformed .npy header: 'shape' is not a tuple"));
  if (*fortran) {
    return absl::InvalidArgumentError(absl::StrCat(n, ": fortran_order arrays are not supported (save it in C order)"));
  }
  Tensor t;
  if (*descr == "<f4") {
    t.dtype = DType::kF32;
  } else if (*descr == "<f2") {
    t.dtype = DType::kF16;
  } else if (*descr == "<u2" || *descr == "|V2" || *descr == "<V2") {
    if (!bf16_from_u16) {
      return absl::InvalidArgumentError(absl::StrCat(
          n, ": dtype '", *descr, "' is 2-byte integer/void data; pass --npy-bf16 if it holds bfloat16"));
    }
    t.dtype = DType::kBF16;
  } else if (!descr->empty() && descr->front() == '>') {
    return absl::InvalidArgumentError(absl::StrCat(n, ": big-endian dtype '", *descr, "' is not supported"));
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        n, ": unsupported dtype '", *descr, "' (supported: '<f4', '<f2', bf16 as '<u2'/'|V2' with --npy-bf16)"));
  }
  if (shape->size() > limits.max_rank) {
    return absl::InvalidArgumentError(absl::StrCat(n, ": rank ", shape->size(), " is above the limit of ", limits.max_rank));
  }
  t.shape = *shape;
  auto bytes = ByteSize(name, t.shape, DTypeSize(t.dtype));
  if (!bytes.ok()) return bytes.status();
  const uint64_t data_start = header_start + header_len;
  st = CheckPayload(name, data_start, *bytes, src.size(), limits);
  if (!st.ok()) return st;
  if (src.size() - data_start != *bytes) {
    return absl::InvalidArgumentError(absl::StrCat(n, ": ", src.size() - data_start - *bytes,
                                                   " bytes after the data of shape ", ShapeText(t.shape)));
  }
  st = src.Read(data_start, *bytes, &t.data);
  if (!st.ok()) return st;
  return t;
}

absl::StatusOr<DType> SafetensorsDType(std::string_view name, const std::string& tensor,
                                       const std::string& dtype) {
  if (dtype == "F32") return DType::kF32;
  if (dtype == "F16") return DType::kF16;
  if (dtype == "BF16") return DType::kBF16;
  return absl::InvalidArgumentError(absl::StrCat(std::string(name), ": tensor '", tensor,
                                                 "' has unsupported dtype '", dtype,
                                                 "' (supported: F32, F16, BF16)"));
}

}  // namespace

uint64_t Tensor::element_count() const {
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<Tensor> ReadNpy(const std::string& path, bool bf16_from_u16, const TensorLimits& limits) {
  auto src = FileSource::Open(path);
  if (!src.ok()) return src.status();
  return ReadNpyFrom(**src, path, bf16_from_u16, limits);
}

absl::StatusOr<Tensor> ParseNpy(std::string_view bytes, std::string_view name, bool bf16_from_u16,
                                const TensorLimits& limits) {
  MemorySource src(bytes);
  return ReadNpyFrom(src, name, bf16_from_u16, limits);
}

absl::StatusOr<Tensor> ReadSafetensors(const std::string& path, const std::string& tensor_name,
                                       const TensorLimits& limits) {
  auto opened = FileSource::Open(path);
  if (!opened.ok()) return opened.status();
  ByteSource& src = **opened;
  if (src.size() < 8) {
    return absl::DataLossError(absl::StrCat(path, ": truncated safetensors file (", src.size(),
                                            " bytes, the header length alone is 8)"));
  }
  std::string pre;
  absl::Status st = src.Read(0, 8, &pre);
  if (!st.ok()) return st;
  const uint64_t header_len = LoadLe(pre.data(), 8);
  if (header_len > src.size() - 8) {
    return absl::DataLossError(absl::StrCat(path, ": truncated safetensors header: declares ",
                                            header_len, " bytes, file has ", src.size() - 8));
  }
  if (header_len > limits.max_header_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(path, ": safetensors header of ", header_len,
                                                     " bytes is above the limit of ",
                                                     limits.max_header_bytes));
  }
  std::string header;
  st = src.Read(8, header_len, &header);
  if (!st.ok()) return st;
  nlohmann::json doc = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": safetensors header is not a JSON object"));
  }
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = src.size() - data_start;
  std::vector<std::string> names;
  for (auto it = doc.begin(); it != doc.end(); ++it) {
    if (it.key() != "__metadata__") names.push_back(it.key());
  }
  std::string chosen = tensor_name;
  if (chosen.empty()) {
    if (names.size() != 1) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": holds ", names.size(),
                                                     " tensors; pick one with --tensor (",
                                                     absl::StrJoin(names, ", "), ")"));
    }
    chosen = names[0];
  } else if (chosen == "__metadata__" || !doc.contains(chosen)) {
    return absl::NotFoundError(absl::StrCat(path, ": no tensor named '", chosen, "' (have: ",
                                            absl::StrJoin(names, ", "), ")"));
  }
  const nlohmann::json& e = doc[chosen];
  auto bad = [&](std::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tensor '", chosen, "': ", std::string(what)));
  };
  if (!e.is_object()) return bad("entry is not an object");
  if (!e.contains("dtype") || !e["dtype"].is_string()) return bad("missing string 'dtype'");
  if (!e.contains("shape") || !e["shape"].is_array()) return bad("missing array 'shape'");
  if (!e.contains("data_offsets") || !e["data_offsets"].is_array() || e["data_offsets"].size() != 2) {
    return bad("'data_offsets' must be [begin, end]");
  }
  auto dtype = SafetensorsDType(path, chosen, e["dtype"].get<std::string>());
  if (!dtype.ok()) return dtype.status();
  Tensor t;
  t.dtype = *dtype;
  if (e["shape"].size() > limits.max_rank) {
    return bad(absl::StrCat("rank ", e["shape"].size(), " is above the limit of ", limits.max_rank));
  }
  for (const auto& d : e["shape"]) {
    if (!d.is_number_unsigned()) return bad("shape holds a value that is not a non-negative integer");
    t.shape.push_back(d.get<uint64_t>());
  }
  for (const auto& o : e["data_offsets"]) {
    if (!o.is_number_unsigned()) return bad("data_offsets hold a value that is not a non-negative integer");
  }
  const uint64_t begin = e["data_offsets"][0].get<uint64_t>();
  const uint64_t end = e["data_offsets"][1].get<uint64_t>();
  if (begin > end) return bad(absl::StrCat("data_offsets begin ", begin, " > end ", end));
  auto bytes = ByteSize(path, t.shape, DTypeSize(t.dtype));
  if (!bytes.ok()) return bytes.status();
  if (end > data_size) {
    return absl::DataLossError(absl::StrCat(path, ": tensor '", chosen, "': data_offsets end ", end,
                                            " is past the end of the data section (", data_size,
                                            " bytes)"));
  }
  if (end - begin != *bytes) {
    return bad(absl::StrCat("data_offsets span ", end - begin, " bytes but shape ", ShapeText(t.shape),
                            " of ", std::string(DTypeName(t.dtype)), " needs ", *bytes));
  }
  st = CheckPayload(path, data_start + begin, *bytes, src.size(), limits);
  if (!st.ok()) return st;
  st = src.Read(data_start + begin, *bytes, &t.data);
  if (!st.ok()) return st;
  return t;
}

absl::StatusOr<Tensor> ReadRaw(const std::string& path, DType dtype, const std::vector<uint64_t>& shape,
                               const TensorLimits& limits) {
  auto opened = FileSource::Open(path);
  if (!opened.ok()) return opened.status();
  ByteSource& src = **opened;
  if (shape.empty() || shape.size() > limits.max_rank) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": --shape needs 1 to ", limits.max_rank, " dimensions"));
  }
  auto bytes = ByteSize(path, shape, DTypeSize(dtype));
  if (!bytes.ok()) return bytes.status();
  const std::string declared = absl::StrCat("--shape ", ShapeText(shape), " of ",
                                            std::string(DTypeName(dtype)), " needs");
  absl::Status st = CheckPayload(path, 0, *bytes, src.size(), limits, declared);
  if (!st.ok()) return st;
  if (src.size() != *bytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": file has ", src.size(), " bytes but --shape ",
                                                   ShapeText(shape), " of ", std::string(DTypeName(dtype)),
                                                   " needs ", *bytes));
  }
  Tensor t;
  t.dtype = dtype;
  t.shape = shape;
  st = src.Read(0, *bytes, &t.data);
  if (!st.ok()) return st;
  return t;
}

absl::StatusOr<std::vector<uint64_t>> ParseShapeFlag(std::string_view text) {
  std::vector<uint64_t> out;
  if (text.empty()) return absl::InvalidArgumentError("--shape is empty (expected e.g. 64,4,128)");
  for (absl::string_view part : absl::StrSplit(absl::string_view(text.data(), text.size()), ',')) {
    uint64_t d = 0;
    if (!absl::SimpleAtoi(part, &d) || d == 0) {
      return absl::InvalidArgumentError(absl::StrCat("--shape '", std::string(text),
                                                     "': every dimension must be a positive integer"));
    }
    out.push_back(d);
  }
  return out;
}

std::string EncodeNpyWithHeader(std::string_view header_dict, std::string_view payload, int major_version) {
  // Pad with spaces and a final newline so the data starts on a 64-byte boundary (the format's rule).
  const size_t pre = major_version == 1 ? 10 : 12;
  std::string header(header_dict);
  size_t total = pre + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::string out("\x93NUMPY", 6);
  out.push_back(static_cast<char>(major_version));
  out.push_back(0);
  AppendLe(&out, header.size(), major_version == 1 ? 2 : 4);
  out += header;
  out.append(payload);
  return out;
}

std::string EncodeNpy(const Tensor& tensor) {
  const char* descr = tensor.dtype == DType::kF32 ? "<f4" : tensor.dtype == DType::kF16 ? "<f2" : "<u2";
  // Python tuple syntax: (), (a,), (a, b).
  std::string shape = absl::StrJoin(tensor.shape, ", ");
  if (tensor.shape.size() == 1) shape += ",";
  std::string dict = absl::StrCat("{'descr': '", descr, "', 'fortran_order': False, 'shape': (",
                                  shape, "), }");
  return EncodeNpyWithHeader(dict, tensor.data, dict.size() + 11 > 65535 ? 2 : 1);
}

std::string EncodeSafetensors(const std::vector<NamedTensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  std::string data;
  for (const auto& nt : tensors) {
    const char* dt = nt.tensor->dtype == DType::kF32 ? "F32" : nt.tensor->dtype == DType::kF16 ? "F16" : "BF16";
    header[nt.name] = {{"dtype", dt},
                       {"shape", nt.tensor->shape},
                       {"data_offsets", {offset, offset + nt.tensor->data.size()}}};
    offset += nt.tensor->data.size();
    data += nt.tensor->data;
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::string out;
  AppendLe(&out, h.size(), 8);
  out += h;
  out += data;
  return out;
}

absl::StatusOr<std::string> ReadFile(const std::string& path, uint64_t max_bytes) {
  auto src = FileSource::Open(path);
  if (!src.ok()) return src.status();
  if ((*src)->size() > max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(path, ": file of ", (*src)->size(),
                                                     " bytes is above the limit of ", max_bytes));
  }
  std::string out;
  absl::Status st = (*src)->Read(0, (*src)->size(), &out);
  if (!st.ok()) return st;
  return out;
}

absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes) {
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  {
    errno = 0;
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) {
      const int e = errno;
      const std::string msg = absl::StrCat(path, ": cannot create ", tmp, ": ", std::strerror(e));
      if (e == ENOENT || e == ENOTDIR) return absl::NotFoundError(msg);
      if (e == EACCES || e == EPERM || e == EROFS) return absl::PermissionDeniedError(msg);
      return absl::InternalError(msg);
    }
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      return absl::InternalError(absl::StrCat(path, ": write failed (disk full?)"));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(path, ": cannot rename ", tmp, ": ", ec.message()));
  }
  return absl::OkStatus();
}

}  // namespace fibquant::cli
