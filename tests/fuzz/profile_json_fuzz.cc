// Fuzz target: FibQuant profile JSON (Profile::FromJson, Profile::FromSpecJson).
// Invariants: never crash; errors are InvalidArgument/ResourceExhausted; an accepted profile is
// valid, has a digest, and its ToJson parses back to an equal profile with the same digest.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/profile.h"
#include "tests/fuzz/fuzz_util.h"

using fibquant::Profile;
using fibquant::fuzz::IsInputError;

namespace {

void CheckAccepted(const Profile& p) {
  FQ_FUZZ_CHECK(p.Validate().ok());
  auto digest = p.Digest();
  FQ_FUZZ_CHECK(digest.ok());
  auto again = Profile::FromJson(p.ToJson());
  FQ_FUZZ_CHECK(again.ok());
  FQ_FUZZ_CHECK(*again == p);
  FQ_FUZZ_CHECK(*again->Digest() == *digest);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view json(reinterpret_cast<const char*>(data), size);
  auto full = Profile::FromJson(json);
  if (full.ok()) {
    CheckAccepted(*full);
  } else {
    FQ_FUZZ_CHECK(IsInputError(full.status()));
  }
  auto spec = Profile::FromSpecJson(json);
  if (spec.ok()) {
    CheckAccepted(*spec);
  } else {
    FQ_FUZZ_CHECK(IsInputError(spec.status()));
  }
  return 0;
}
