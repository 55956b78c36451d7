// Receipt RPCs of KvCompressionServiceImpl: GetReceipt and ListReceipts.
#include "server/service.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "core/codebook.h"
#include "core/codec.h"
#include "core/digest.h"
#include "core/kv_codec.h"
#include "core/kv_frame.h"
#include "core/kv_profile.h"
#include "core/kv_receipt.h"
#include "core/status_macros.h"
#include "server/metrics.h"
#include "server/registry.h"
#include "server/status_util.h"
#include "server/worker_pool.h"
#include <nlohmann/json.hpp>
#include "server/service_internal.h"

namespace fibquant::server {
namespace {
namespace v1 = ::fibquant::v1;
namespace fs = std::filesystem;
using nlohmann::json;
using namespace ::fibquant::server::internal;  // NOLINT(build/namespaces): this service's own internals
}  // namespace

grpc::ServerUnaryReactor* KvCompressionServiceImpl::GetReceipt(grpc::CallbackServerContext* ctx,
                                                               const v1::GetReceiptRequest* req,
                                                               v1::GetReceiptResponse* resp) {
  return UnaryNow(metrics_, ctx, "GetReceipt", [&]() -> absl::Status {
    if (req->receipt_id().empty()) return absl::InvalidArgumentError("receipt_id is required");
    FQ_ASSIGN_OR_RETURN(*resp->mutable_receipt(), registry_->GetReceipt(req->receipt_id()));
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvCompressionServiceImpl::ListReceipts(grpc::CallbackServerContext* ctx,
                                                                 const v1::ListReceiptsRequest* req,
                                                                 v1::ListReceiptsResponse* resp) {
  return UnaryNow(metrics_, ctx, "ListReceipts", [&]() -> absl::Status {
    // The token is the id of the last receipt returned: ids only grow, so pages stay stable while
    // new receipts arrive.
    uint64_t before = std::numeric_limits<uint64_t>::max();
    if (!req->page_token().empty()) {
      const std::string& t = req->page_token();
      if (t.rfind("rcpt-", 0) != 0 || !absl::SimpleAtoi(t.substr(5), &before)) {
        return absl::InvalidArgumentError("page_token is not a token returned by ListReceipts");
      }
    }
    uint32_t n = req->page_size() == 0 ? kDefaultListPageSize : std::min(req->page_size(), kMaxListPageSize);
    bool more = false;
    auto receipts = registry_->ListReceipts(req->profile_digest(), before, n, &more);
    if (more && !receipts.empty()) resp->set_next_page_token(receipts.back().receipt_id());
    for (auto& r : receipts) *resp->add_receipts() = std::move(r);
    return absl::OkStatus();
  });
}

}  // namespace fibquant::server
