// Internal helpers shared by the KV layer's .cc files (JSON field access with precise errors).
// Not part of the public API. Ownership: the KV engineer. Thread safety: pure functions.
#ifndef FIBQUANT_CORE_KV_INTERNAL_H_
#define FIBQUANT_CORE_KV_INTERNAL_H_

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace fibquant::kv_internal {

inline std::string S(std::string_view sv) { return std::string(sv); }

// Duplicate keys (at any depth) are InvalidArgument naming the first one: nlohmann would keep the
// last value silently, so `{"codebook_size": 16, ..., "codebook_size": 4096}` would register a
// profile other than the one a reviewer read (docs/format/profile.md promises the rejection).
[[nodiscard]] inline absl::StatusOr<nlohmann::json> ParseJsonObject(std::string_view text,
                                                                    std::string_view what) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string duplicate;
  bool has_duplicate = false;
  auto callback = [&](int /*depth*/, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    switch (event) {
      case nlohmann::json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case nlohmann::json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case nlohmann::json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second &&
            !has_duplicate) {
          has_duplicate = true;
          duplicate = parsed.get<std::string>();
        }
        break;
      default:
        break;
    }
    return true;
  };
  nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(S(what), ": malformed JSON"));
  if (has_duplicate) {
    return absl::InvalidArgumentError(
        absl::StrCat(S(what), ": duplicate field \"", duplicate, "\""));
  }
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(S(what), ": JSON must be an object"));
  return j;
}

// Rejects keys outside `allowed` and (if `required`) missing ones.
inline absl::Status CheckKeys(const nlohmann::json& obj, std::string_view ctx,
                              std::initializer_list<const char*> allowed,
                              std::initializer_list<const char*> required) {
  if (!obj.is_object()) return absl::InvalidArgumentError(absl::StrCat(S(ctx), " must be a JSON object"));
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    bool ok = false;
    for (const char* a : allowed) ok = ok || it.key() == a;
    if (!ok) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ": unknown field \"", it.key(), "\""));
  }
  for (const char* r : required) {
    if (!obj.contains(r)) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", r, " is required"));
  }
  return absl::OkStatus();
}

[[nodiscard]] inline absl::StatusOr<uint64_t> GetU64(const nlohmann::json& obj, std::string_view ctx,
                                                     const char* f, uint64_t max) {
  if (!obj.contains(f)) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " is required"));
  const nlohmann::json& v = obj.at(f);
  if (!v.is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " must be a non-negative integer"));
  }
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u > max) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " must be <= ", max, "; got ", u));
    return u;
  }
  int64_t i = v.get<int64_t>();
  if (i < 0) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " must be >= 0; got ", i));
  if (static_cast<uint64_t>(i) > max) {
    return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " must be <= ", max, "; got ", i));
  }
  return static_cast<uint64_t>(i);
}

[[nodiscard]] inline absl::StatusOr<uint32_t> GetU32(const nlohmann::json& obj, std::string_view ctx,
                                                     const char* f) {
  auto r = GetU64(obj, ctx, f, std::numeric_limits<uint32_t>::max());
  if (!r.ok()) return r.status();
  return static_cast<uint32_t>(*r);
}

[[nodiscard]] inline absl::StatusOr<std::string> GetString(const nlohmann::json& obj, std::string_view ctx,
                                                           const char* f) {
  if (!obj.contains(f)) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " is required"));
  const nlohmann::json& v = obj.at(f);
  if (!v.is_string()) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " must be a string"));
  return v.get<std::string>();
}

[[nodiscard]] inline absl::StatusOr<bool> GetBool(const nlohmann::json& obj, std::string_view ctx,
                                                  const char* f) {
  if (!obj.contains(f)) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " is required"));
  const nlohmann::json& v = obj.at(f);
  if (!v.is_boolean()) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " must be a boolean"));
  return v.get<bool>();
}

// Optional number: absent or null -> nullopt.
[[nodiscard]] inline absl::StatusOr<std::optional<double>> GetOptDouble(const nlohmann::json& obj,
                                                                        std::string_view ctx, const char* f) {
  if (!obj.contains(f) || obj.at(f).is_null()) return std::optional<double>();
  const nlohmann::json& v = obj.at(f);
  if (!v.is_number()) return absl::InvalidArgumentError(absl::StrCat(S(ctx), ".", f, " must be a number or null"));
  return std::optional<double>(v.get<double>());
}

}  // namespace fibquant::kv_internal

#endif  // FIBQUANT_CORE_KV_INTERNAL_H_
