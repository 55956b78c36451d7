// Fuzz target: KV compression profile JSON (KvCompressionProfile::FromJson, FromSpecJson).
// Invariants: never crash; errors are input errors (InvalidArgument/ResourceExhausted/OutOfRange);
// an accepted profile passes Validate(), and its ToJson parses back (FromJson) to an equal profile
// (a spec profile is unresolved; the full form accepts that) with the same digest when resolved.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/kv_profile.h"
#include "tests/fuzz/fuzz_util.h"

using fibquant::KvCompressionProfile;
using fibquant::fuzz::IsInputError;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view json(reinterpret_cast<const char*>(data), size);
  auto full = KvCompressionProfile::FromJson(json);
  if (full.ok()) {
    FQ_FUZZ_CHECK(full->Validate().ok());
    auto again = KvCompressionProfile::FromJson(full->ToJson());
    FQ_FUZZ_CHECK(again.ok());
    FQ_FUZZ_CHECK(*again == *full);
    if (full->resolved()) {
      auto d1 = full->Digest();
      auto d2 = again->Digest();
      FQ_FUZZ_CHECK(d1.ok() && d2.ok() && *d1 == *d2);
    }
  } else {
    FQ_FUZZ_CHECK(IsInputError(full.status()));
  }
  auto spec = KvCompressionProfile::FromSpecJson(json);
  if (spec.ok()) {
    FQ_FUZZ_CHECK(spec->Validate().ok());
    auto full_form = KvCompressionProfile::FromJson(spec->ToJson());
    FQ_FUZZ_CHECK(full_form.ok());
    FQ_FUZZ_CHECK(*full_form == *spec);
  } else {
    FQ_FUZZ_CHECK(IsInputError(spec.status()));
  }
  return 0;
}
