// Fault tests with the real fibquant-server binary on 127.0.0.1 (issue 7):
//  * kill -9 during profile registration, many times at random points (bounded count and time),
//    then restart on the same data dir: every acknowledged profile is present with its digest,
//    nothing unrequested or partial is loaded, no temp file survives, nothing is quarantined;
//  * a read-only data directory and a full one (a small tmpfs in a private mount namespace):
//    registering a new profile fails with a clear error naming the path (FAILED_PRECONDITION,
//    RESOURCE_EXHAUSTED), while compress/decompress of an existing profile keep working.
// As root (CI containers) the server child drops to nobody so file permissions apply.
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "fibquant/v1/kv_compression.grpc.pb.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "tests/server/ops_test_util.h"

namespace fibquant::server {
namespace {

namespace fs = std::filesystem;
namespace v1 = ::fibquant::v1;
using ::fibquant::server::testing::ReadWholeFile;
using ::fibquant::server::testing::TempDir;
using ::testing::HasSubstr;

constexpr uid_t kNobody = 65534;
constexpr int kKillIterations = 12;
constexpr auto kKillLoopBudget = std::chrono::seconds(240);

// A 16x16 f32 key profile; `samples`/`size` make the codebook build take longer (a wider window
// for the kill to land inside the build, the write, or the rename).
std::string Spec(const std::string& id, int codebook_size = 6, int samples = 400) {
  return absl::StrCat(R"({"profile_id":")", id,
                      R"(","shape":{"role":"key","attention_kind":"mha","batch":1,"layers":1,"kv_heads":1,)",
                      R"("query_heads":1,"tokens":16,"head_dim":16,"dtype":"f32","rope_state":"post_rope"},)",
                      R"("axis_policy":"per_token","tokens_per_page":16,"fibquant":{"block_dim":4,"codebook_size":)",
                      codebook_size, R"(,"seed":3,"training_samples":)", samples,
                      R"(,"lloyd_restarts":1,"lloyd_iterations":4}})");
}

// The server binary as a child; as root it runs as nobody. The destructor SIGKILLs and reaps it.
class Child {
 public:
  ~Child() { Kill9(); }
  // A non-empty `launcher` runs first and must end by exec'ing the server (so pid() is the
  // server's); such a child keeps its privileges (it may need them to set up a namespace).
  void Start(const std::vector<std::string>& args, const fs::path& log,
             const std::vector<std::string>& launcher = {}) {
    log_ = log;
    std::vector<std::string> store = launcher;
    store.push_back(FQ_SERVER_BINARY);
    store.insert(store.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : store) argv.push_back(a.data());
    argv.push_back(nullptr);
    const std::string log_s = log.string();
    const bool drop = geteuid() == 0 && launcher.empty();
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(log_s.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0666);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
      }
      if (drop && (setgroups(0, nullptr) != 0 || setgid(kNobody) != 0 || setuid(kNobody) != 0)) _exit(126);
      execvp(argv[0], argv.data());
      _exit(127);
    }
  }
  std::optional<int> WaitForPort() {
    static const std::regex kServing(R"(serving \S+ on [^ ]+:(\d+) )");
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (std::chrono::steady_clock::now() < deadline) {
      std::smatch m;
      const std::string log = ReadWholeFile(log_);
      if (std::regex_search(log, m, kServing)) return std::stoi(m[1]);
      int st = 0;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return std::nullopt;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return std::nullopt;
  }
  void Kill9() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      int st = 0;
      waitpid(pid_, &st, 0);
      pid_ = -1;
    }
  }
  // SIGTERM and wait (bounded); returns the exit code or -1.
  int Stop() {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 1200; ++i) {
      int st = 0;
      if (waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    Kill9();
    return -1;
  }
  std::string Log() const { return ReadWholeFile(log_); }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  fs::path log_;
};

// A data dir the (possibly unprivileged) server child can use.
fs::path MakeDataDir(const TempDir& tmp) {
  const fs::path d = tmp.path() / "data";
  fs::create_directories(d);
  if (geteuid() == 0) {
    EXPECT_EQ(chown(tmp.path().c_str(), kNobody, kNobody), 0);
    EXPECT_EQ(chown(d.c_str(), kNobody, kNobody), 0);
  }
  return d;
}

void ChownTree(const fs::path& root) {
  if (geteuid() != 0) return;
  for (const auto& e : fs::recursive_directory_iterator(root)) (void)lchown(e.path().c_str(), kNobody, kNobody);
}

std::vector<std::string> ServerArgs(const fs::path& data) {
  // Up to kKillIterations x 40 registrations can be acknowledged when the machine is quiet, far
  // above the default --max-profiles (256): the limit is raised so the test measures kill -9
  // durability, not the profile cap, whatever the timing.
  return {"--listen=127.0.0.1:0", "--metrics-listen=", "--workers=2", "--build-threads=1",
          "--data-dir=" + data.string(), "--drain-seconds=5", "--max-profiles=100000"};
}

std::unique_ptr<v1::KvCompressionService::Stub> Connect(int port) {
  auto ch = grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials());
  return v1::KvCompressionService::NewStub(ch);
}

std::chrono::system_clock::time_point In(int seconds) {
  return std::chrono::system_clock::now() + std::chrono::seconds(seconds);
}

grpc::Status Register(v1::KvCompressionService::Stub* stub, const std::string& spec, v1::RegisterProfileResponse* resp) {
  grpc::ClientContext ctx;
  ctx.set_deadline(In(60));
  v1::RegisterProfileRequest req;
  req.set_spec_json(spec);
  return stub->RegisterProfile(&ctx, req, resp);
}

// profile_id -> digest of every profile the server lists.
std::map<std::string, std::string> ListAll(v1::KvCompressionService::Stub* stub) {
  std::map<std::string, std::string> out;
  std::string token;
  for (int page = 0; page < 100; ++page) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(30));
    v1::ListProfilesRequest req;
    req.set_page_token(token);
    v1::ListProfilesResponse resp;
    grpc::Status s = stub->ListProfiles(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    for (const auto& p : resp.profiles()) out[p.profile_id()] = p.digest();
    token = resp.next_page_token();
    if (!s.ok() || token.empty()) break;
  }
  return out;
}

TEST(FaultKill, KillNineDuringRegistrationLosesNoAcknowledgedProfile) {
  TempDir tmp;
  const fs::path data = MakeDataDir(tmp);
  std::mt19937 rng(20261126);
  std::map<std::string, std::string> acked;  // profile_id -> digest, acknowledged to the client
  std::set<std::string> requested;
  int next_id = 0, kills_mid_call = 0, iterations = 0, tmp_files_seen = 0;
  const auto loop_end = std::chrono::steady_clock::now() + kKillLoopBudget;
  for (int it = 0; it < kKillIterations && std::chrono::steady_clock::now() < loop_end; ++it) {
    Child server;
    server.Start(ServerArgs(data), tmp.path() / absl::StrCat("server-", it, ".log"));
    auto port = server.WaitForPort();
    ASSERT_TRUE(port.has_value()) << server.Log();
    auto stub = Connect(*port);
    // After the restart: every acknowledged profile is there with the same digest, and nothing
    // that was never requested (a partial or foreign file) was loaded.
    const auto listed = ListAll(stub.get());
    for (const auto& [id, digest] : acked) {
      auto f = listed.find(id);
      ASSERT_NE(f, listed.end()) << "acknowledged profile " << id << " lost after kill -9 (iteration " << it << ")";
      EXPECT_EQ(f->second, digest) << id;
    }
    for (const auto& [id, digest] : listed) EXPECT_TRUE(requested.count(id)) << "unrequested profile " << id;
    size_t files = 0;
    for (const auto& e : fs::directory_iterator(data / "profiles")) {
      const std::string name = e.path().filename().string();
      EXPECT_EQ(name.find(".tmp."), std::string::npos) << "temp file left after load: " << name;
      if (e.path().extension() == ".json") ++files;
    }
    EXPECT_EQ(files, listed.size()) << "a profile file on disk was not loaded";
    EXPECT_TRUE(fs::is_empty(data / "quarantine")) << "a kill -9 left a file that failed verification";
    for (const auto& [id, digest] : listed) acked.emplace(id, digest);  // durable now, whatever the ack

    // Register profiles one after another on a client thread; kill -9 at a random moment.
    std::mutex mu;
    std::vector<std::pair<std::string, std::string>> new_acks;
    std::atomic<bool> in_call{false};
    std::vector<std::string> ids;
    for (int k = 0; k < 40; ++k) ids.push_back(absl::StrCat("fault.kill.", next_id++));
    for (const auto& id : ids) requested.insert(id);
    std::thread client([&] {
      for (size_t k = 0; k < ids.size(); ++k) {
        v1::RegisterProfileResponse resp;
        in_call = true;
        grpc::Status s = Register(stub.get(), Spec(ids[k], k % 2 ? 64 : 6, k % 2 ? 4000 : 400), &resp);
        in_call = false;
        if (!s.ok()) {
          EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
          return;
        }
        std::lock_guard<std::mutex> l(mu);
        new_acks.emplace_back(ids[k], resp.profile().digest());
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 300)(rng)));
    if (in_call) ++kills_mid_call;
    server.Kill9();
    client.join();
    for (const auto& e : fs::directory_iterator(data / "profiles")) {
      if (e.path().filename().string().find(".tmp.") != std::string::npos) ++tmp_files_seen;
    }
    std::lock_guard<std::mutex> l(mu);
    for (const auto& [id, digest] : new_acks) acked.emplace(id, digest);
    ++iterations;
  }
  // A final restart checks the last round too, then proves the registry still works.
  Child server;
  server.Start(ServerArgs(data), tmp.path() / "server-final.log");
  auto port = server.WaitForPort();
  ASSERT_TRUE(port.has_value()) << server.Log();
  auto stub = Connect(*port);
  const auto listed = ListAll(stub.get());
  for (const auto& [id, digest] : acked) {
    auto f = listed.find(id);
    ASSERT_NE(f, listed.end()) << "acknowledged profile " << id << " lost after the last kill -9";
    EXPECT_EQ(f->second, digest);
  }
  EXPECT_TRUE(fs::is_empty(data / "quarantine"));
  v1::RegisterProfileResponse resp;
  ASSERT_TRUE(Register(stub.get(), Spec("fault.kill.after"), &resp).ok());
  EXPECT_EQ(server.Stop(), 0) << server.Log();
  EXPECT_GE(iterations, 3);
  EXPECT_GT(acked.size(), 0u);
  std::printf("kill -9 iterations %d (mid-call %d), acknowledged profiles %zu, temp files seen after kill %d\n",
              iterations, kills_mid_call, acked.size(), tmp_files_seen);
  RecordProperty("iterations", iterations);
  RecordProperty("kills_mid_call", kills_mid_call);
  RecordProperty("acknowledged", static_cast<int>(acked.size()));
}

// One 16x16 f32 page through CompressPages then DecompressPages; returns the final statuses.
std::pair<grpc::Status, grpc::Status> RoundTrip(v1::KvCompressionService::Stub* stub, const std::string& digest,
                                                std::vector<float>* decoded, v1::Receipt* receipt = nullptr) {
  std::vector<float> page(16 * 16);
  for (size_t i = 0; i < page.size(); ++i) page[i] = static_cast<float>((i * 37) % 23) / 7.0f - 1.5f;
  std::string frame;
  grpc::Status cs, ds;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(60));
    auto stream = stub->CompressPages(&ctx);
    v1::CompressPagesRequest h;
    h.mutable_header()->set_profile_digest(digest);
    h.mutable_header()->set_input_dtype(v1::DTYPE_F32);
    v1::CompressPagesRequest p;
    p.mutable_page()->mutable_coordinates()->set_token_count(16);
    p.mutable_page()->set_data(reinterpret_cast<const char*>(page.data()), page.size() * sizeof(float));
    if (stream->Write(h) && stream->Write(p)) stream->WritesDone();
    v1::CompressPagesResponse r;
    while (stream->Read(&r)) {
      if (r.has_page()) frame = r.page().frame();
      if (r.has_receipt() && receipt != nullptr) *receipt = r.receipt();
    }
    cs = stream->Finish();
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(60));
    auto stream = stub->DecompressPages(&ctx);
    v1::DecompressPagesRequest h;
    h.mutable_header()->set_output_dtype(v1::DTYPE_F32);
    v1::DecompressPagesRequest f;
    f.mutable_frame()->set_frame(frame);
    if (stream->Write(h) && stream->Write(f)) stream->WritesDone();
    v1::DecompressPagesResponse r;
    while (stream->Read(&r)) {
      if (r.has_page()) {
        decoded->resize(r.page().data().size() / sizeof(float));
        std::memcpy(decoded->data(), r.page().data().data(), decoded->size() * sizeof(float));
      }
    }
    ds = stream->Finish();
  }
  return {cs, ds};
}

TEST(FaultReadOnly, RegistrationFailsClearlyExistingProfilesKeepWorking) {
  TempDir tmp;
  const fs::path data = MakeDataDir(tmp);
  std::string digest;
  std::vector<float> before;
  {
    Child server;
    server.Start(ServerArgs(data), tmp.path() / "rw.log");
    auto port = server.WaitForPort();
    ASSERT_TRUE(port.has_value()) << server.Log();
    auto stub = Connect(*port);
    v1::RegisterProfileResponse resp;
    grpc::Status s = Register(stub.get(), Spec("fault.ro.existing"), &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    digest = resp.profile().digest();
    auto [cs, ds] = RoundTrip(stub.get(), digest, &before);
    ASSERT_TRUE(cs.ok()) << cs.error_message();
    ASSERT_TRUE(ds.ok()) << ds.error_message();
    ASSERT_EQ(before.size(), 256u);
    EXPECT_EQ(server.Stop(), 0);
  }
  // Everything read-only, the data dir included.
  ChownTree(data);
  for (const auto& e : fs::recursive_directory_iterator(data)) {
    if (e.is_directory()) fs::permissions(e.path(), fs::perms(0555));
  }
  fs::permissions(data, fs::perms(0555));
  Child server;
  server.Start(ServerArgs(data), tmp.path() / "ro.log");
  auto port = server.WaitForPort();
  ASSERT_TRUE(port.has_value()) << "the server must start on a read-only data dir\n" << server.Log();
  auto stub = Connect(*port);
  EXPECT_EQ(ListAll(stub.get()).count("fault.ro.existing"), 1u);
  v1::RegisterProfileResponse resp;
  grpc::Status s = Register(stub.get(), Spec("fault.ro.new"), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr((data / "profiles").string()));
  EXPECT_THAT(s.error_message(), HasSubstr("Permission denied"));
  // The failed registration is not visible either.
  EXPECT_EQ(ListAll(stub.get()).count("fault.ro.new"), 0u);
  std::vector<float> after;
  auto [cs, ds] = RoundTrip(stub.get(), digest, &after);
  EXPECT_TRUE(cs.ok()) << cs.error_code() << " " << cs.error_message();
  EXPECT_TRUE(ds.ok()) << ds.error_code() << " " << ds.error_message();
  EXPECT_EQ(after, before);
  EXPECT_EQ(server.Stop(), 0) << server.Log();
  for (const auto& e : fs::recursive_directory_iterator(data)) {
    if (e.is_directory()) fs::permissions(e.path(), fs::perms(0755));
  }
  fs::permissions(data, fs::perms(0755));
}

// The launcher that gives the server a private mount namespace with a `size`-byte tmpfs on `dir`:
// root uses `unshare -m`, anyone else a user namespace too (`unshare -Urm`). Empty when this machine
// cannot create one (no unshare, or namespaces disabled), which the caller turns into a skip.
std::vector<std::string> TmpfsLauncher(const fs::path& dir, size_t size) {
  const std::string unshare_flags = geteuid() == 0 ? "-m" : "-Urm";
  const std::string probe = "unshare " + unshare_flags + " sh -c 'mount -t tmpfs -o size=64k tmpfs \"$0\"' '" +
                            dir.string() + "' >/dev/null 2>&1";
  if (std::system(probe.c_str()) != 0) return {};
  return {"unshare", unshare_flags, "sh", "-c",
          absl::StrCat("mount -t tmpfs -o size=", size, ",mode=0755 tmpfs \"$0\" && exec \"$@\""), dir.string()};
}

TEST(FaultDiskFull, RegistrationFailsClearlyExistingProfilesKeepWorking) {
  TempDir tmp;
  const fs::path data = tmp.path() / "data";
  fs::create_directories(data);
  // 1 MiB: room for the directories, a few profiles and receipts, then filled on purpose.
  std::vector<std::string> launcher = TmpfsLauncher(data, 1 << 20);
  if (launcher.empty()) GTEST_SKIP() << "cannot mount a tmpfs in a private mount namespace here (unshare)";
  Child server;
  server.Start(ServerArgs(data), tmp.path() / "full.log", launcher);
  auto port = server.WaitForPort();
  ASSERT_TRUE(port.has_value()) << server.Log();
  // The test sees the server's tmpfs through the server's own root (its mount namespace).
  const fs::path seen = fs::path("/proc") / std::to_string(server.pid()) / "root" / data.relative_path();
  auto stub = Connect(*port);
  v1::RegisterProfileResponse resp;
  grpc::Status s = Register(stub.get(), Spec("fault.full.existing"), &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  const std::string digest = resp.profile().digest();
  std::vector<float> before;
  v1::Receipt receipt;
  auto [cs0, ds0] = RoundTrip(stub.get(), digest, &before, &receipt);
  ASSERT_TRUE(cs0.ok()) << cs0.error_message();
  ASSERT_TRUE(ds0.ok()) << ds0.error_message();
  EXPECT_TRUE(receipt.persisted());

  // Fill the file system to the last byte.
  {
    const std::string filler = (seen / "filler").string();
    int fd = ::open(filler.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0) << filler << ": " << std::strerror(errno);
    const std::string block(4096, 'x');
    int last_errno = 0;
    for (int i = 0; i < 100000; ++i) {
      if (::write(fd, block.data(), block.size()) < 0) {
        last_errno = errno;
        break;
      }
    }
    // Then the last partial page, byte by byte.
    while (last_errno == ENOSPC && ::write(fd, "x", 1) == 1) {
    }
    ::close(fd);
    ASSERT_EQ(last_errno, ENOSPC) << "the tmpfs did not fill up";
  }

  s = Register(stub.get(), Spec("fault.full.new"), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr((data / "profiles").string()));
  EXPECT_THAT(s.error_message(), HasSubstr("No space left on device"));
  EXPECT_EQ(ListAll(stub.get()).count("fault.full.new"), 0u) << "a registration that was not stored is listed";
  for (const auto& e : fs::directory_iterator(seen / "profiles")) {
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos)
        << "a failed write left its temp file: " << e.path();
  }

  // Existing profiles keep working; the receipt that cannot be written is kept in memory, marked.
  std::vector<float> after;
  auto [cs, ds] = RoundTrip(stub.get(), digest, &after, &receipt);
  EXPECT_TRUE(cs.ok()) << cs.error_code() << " " << cs.error_message();
  EXPECT_TRUE(ds.ok()) << ds.error_code() << " " << ds.error_message();
  EXPECT_EQ(after, before);
  EXPECT_FALSE(receipt.persisted());

  // Space freed: registration works again without a restart.
  fs::remove(seen / "filler");
  s = Register(stub.get(), Spec("fault.full.new"), &resp);
  EXPECT_TRUE(s.ok()) << s.error_code() << " " << s.error_message();
  EXPECT_EQ(ListAll(stub.get()).count("fault.full.new"), 1u);
  EXPECT_TRUE(fs::exists(seen / "profiles" / (resp.profile().digest().substr(7) + ".json")));
  EXPECT_EQ(server.Stop(), 0) << server.Log();
}

}  // namespace
}  // namespace fibquant::server
