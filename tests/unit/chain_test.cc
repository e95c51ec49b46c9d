// The chain: class order whatever the policy's order, error propagation upward only, the
// default pass-through, registry rules, and deferral that holds up only the deferred request.
#include <catch2/catch.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <thread>

#include "chain.h"
#include "disk.h"
#include "offload.h"
#include "mem_layer.h"

using namespace iofilterfs;

namespace {

// Records every call on the way down and every result on the way up. Parameters:
//   fail: ERRNO-number  – fail writes and reads without calling the layer below
//   complete: true      – complete reads itself (fills 0x5a) without calling below
class Recorder : public Filter {
 public:
  Recorder(std::string name, std::vector<std::string>* log, const YAML::Node& p) : name_(std::move(name)), log_(log) {
    if (p && p["fail"]) fail_ = p["fail"].as<int>();
    if (p && p["complete"]) complete_ = p["complete"].as<bool>();
  }
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    log_->push_back(name_ + ":write");
    if (fail_) return Status::Error(fail_, "recorder: told to fail");
    Status s = next_->write(io, buf, len, off);
    log_->push_back(name_ + ":write<-" + std::to_string(s.err));
    return s;
  }
  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override {
    log_->push_back(name_ + ":read");
    if (fail_) return Status::Error(fail_, "recorder: told to fail");
    if (complete_) {
      std::memset(buf, 0x5a, len);
      *got = len;
      return Status::Ok();
    }
    Status s = next_->read(io, buf, len, off, got);
    log_->push_back(name_ + ":read<-" + std::to_string(s.err));
    return s;
  }
  Status drain() override {
    log_->push_back(name_ + ":drain");
    return Status::Ok();
  }
  Status open(const DiskInfo&) override {
    log_->push_back(name_ + ":open");
    return Status::Ok();
  }
  void close() override { log_->push_back(name_ + ":close"); }

 private:
  std::string name_;
  std::vector<std::string>* log_;
  int fail_ = 0;
  bool complete_ = false;
};

Registry recording_registry(std::vector<std::string>* log) {
  Registry r;
  const std::pair<const char*, FilterClass> kinds[] = {{"rep", FilterClass::Replicate},
                                                       {"cache", FilterClass::Cache},
                                                       {"thr", FilterClass::Throttle},
                                                       {"enc", FilterClass::Encrypt}};
  for (auto [name, cls] : kinds) {
    std::string n = name;
    REQUIRE(r.add(FilterInfo{n, cls, kFilterApiVersion, "recording test filter", {}, nullptr,
                             [n, log](const YAML::Node& p) { return std::make_unique<Recorder>(n, log, p); }}));
  }
  REQUIRE(r.add(FilterInfo{"thr2", FilterClass::Throttle, kFilterApiVersion, "second throttle", {}, nullptr,
                           [log](const YAML::Node& p) { return std::make_unique<Recorder>("thr2", log, p); }}));
  return r;
}

FilterSpec spec(const char* name, const char* yaml = "{}") { return FilterSpec{name, YAML::Load(yaml)}; }

}  // namespace

TEST_CASE("the chain runs in class order whatever order the policy lists", "[chain]") {
  std::vector<std::string> log;
  Registry reg = recording_registry(&log);
  testing::MemLayer bottom;
  bottom.log = &log;
  Chain chain;
  std::string err;
  // Listed encrypt, cache, replicate, throttle: the framework orders them.
  REQUIRE(Chain::build(reg, {spec("enc"), spec("cache"), spec("rep"), spec("thr")}, &bottom, &chain, &err).ok());
  REQUIRE(chain.size() == 4);
  CHECK(chain.describe() == "rep -> cache -> thr -> enc");

  char buf[16] = "abcdefghijklmno";
  REQUIRE(chain.top()->write(Io{}, buf, sizeof buf, 0).ok());
  CHECK(log == std::vector<std::string>{"rep:write", "cache:write", "thr:write", "enc:write", "bottom:write",
                                        "enc:write<-0", "thr:write<-0", "cache:write<-0", "rep:write<-0"});
  CHECK(std::string(bottom.data.data(), 15) == "abcdefghijklmno");
}

TEST_CASE("an error is seen only by the filters above the one that failed", "[chain]") {
  std::vector<std::string> log;
  Registry reg = recording_registry(&log);
  testing::MemLayer bottom;
  bottom.log = &log;
  Chain chain;
  std::string err;
  REQUIRE(Chain::build(reg, {spec("thr", "{fail: 5}"), spec("enc"), spec("rep"), spec("cache")}, &bottom, &chain, &err)
              .ok());
  char buf[8] = {};
  Status s = chain.top()->write(Io{}, buf, sizeof buf, 0);
  CHECK(s.err == EIO);
  CHECK(log == std::vector<std::string>{"rep:write", "cache:write", "thr:write", "cache:write<-5", "rep:write<-5"});
  CHECK(bottom.data.empty());
}

TEST_CASE("a filter can complete a request without the layers below", "[chain]") {
  std::vector<std::string> log;
  Registry reg = recording_registry(&log);
  testing::MemLayer bottom;
  bottom.log = &log;
  Chain chain;
  std::string err;
  REQUIRE(Chain::build(reg, {spec("rep"), spec("cache", "{complete: true}"), spec("enc")}, &bottom, &chain, &err).ok());
  char buf[4];
  size_t got = 0;
  REQUIRE(chain.top()->read(Io{}, buf, 4, 0, &got).ok());
  CHECK(got == 4);
  CHECK(buf[3] == 0x5a);
  CHECK(log == std::vector<std::string>{"rep:read", "cache:read", "rep:read<-0"});
}

TEST_CASE("an empty chain is the bottom layer itself, default filters pass everything", "[chain]") {
  testing::MemLayer bottom;
  Chain chain;
  std::string err;
  REQUIRE(Chain::build(Registry{}, {}, &bottom, &chain, &err).ok());
  CHECK(chain.top() == &bottom);
  CHECK(chain.describe() == "(empty)");

  // A filter that overrides nothing passes every operation down unchanged.
  Filter plain;
  plain.set_next(&bottom);
  REQUIRE(plain.write(Io{}, "xyz", 3, 2).ok());
  REQUIRE(plain.resize(Io{}, 10).ok());
  REQUIRE(plain.sync(Io{}, false).ok());
  uint64_t size = 0;
  REQUIRE(plain.size(&size).ok());
  CHECK(size == 10);
  CHECK(bottom.syncs == 1);
  CHECK(std::string(bottom.data.data() + 2, 3) == "xyz");
}

TEST_CASE("the chain refuses two filters of one class and unknown names", "[chain]") {
  std::vector<std::string> log;
  Registry reg = recording_registry(&log);
  testing::MemLayer bottom;
  Chain chain;
  std::string err;
  CHECK(Chain::build(reg, {spec("thr"), spec("thr2")}, &bottom, &chain, &err).err == EINVAL);
  CHECK(err == "two filters of class throttle: 'thr' and 'thr2'");
  CHECK(Chain::build(reg, {spec("rep"), spec("nosuch")}, &bottom, &chain, &err).err == EINVAL);
  CHECK(err == "unknown filter 'nosuch'");
  CHECK(log.empty());
}

TEST_CASE("the registry refuses duplicate names and other interface versions", "[chain]") {
  Registry r;
  auto make = [](const YAML::Node&) { return std::make_unique<Filter>(); };
  CHECK(r.add(FilterInfo{"a", FilterClass::Cache, kFilterApiVersion, "", {}, nullptr, make}));
  CHECK_FALSE(r.add(FilterInfo{"a", FilterClass::Throttle, kFilterApiVersion, "", {}, nullptr, make}));
  CHECK_FALSE(r.add(FilterInfo{"b", FilterClass::Throttle, kFilterApiVersion + 1, "", {}, nullptr, make}));
  CHECK(r.all().size() == 1);
  CHECK(r.find("a")->cls == FilterClass::Cache);
  CHECK(r.find("b") == nullptr);
}

TEST_CASE("validation failures name the filter and nothing is instantiated", "[chain]") {
  Registry r;
  int created = 0;
  REQUIRE(r.add(FilterInfo{"v", FilterClass::Cache, kFilterApiVersion, "", {},
                           [](const YAML::Node& p, YAML::Node*) { return p["size"] ? std::string() : std::string("size is required"); },
                           [&created](const YAML::Node&) {
                             ++created;
                             return std::make_unique<Filter>();
                           }}));
  testing::MemLayer bottom;
  Chain chain;
  std::string err;
  CHECK(Chain::build(r, {spec("v")}, &bottom, &chain, &err).err == EINVAL);
  CHECK(err == "v: size is required");
  CHECK(created == 0);
  CHECK(Chain::build(r, {spec("v", "{size: 1}")}, &bottom, &chain, &err).ok());
  CHECK(created == 1);
}

namespace {

// Holds writes at offset 0 until released: a filter deferring a request.
class Gate : public Filter {
 public:
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    if (off == 0) {
      std::unique_lock<std::mutex> l(mu);
      held = true;
      cv.notify_all();
      cv.wait(l, [&] { return open; });
    }
    return next_->write(io, buf, len, off);
  }
  std::mutex mu;
  std::condition_variable cv;
  bool held = false, open = false;
};

}  // namespace

TEST_CASE("a deferred request holds up only itself, not other requests to the same disk", "[chain][disk]") {
  Gate* gate = nullptr;
  Registry r;
  REQUIRE(r.add(FilterInfo{"gate", FilterClass::Replicate, kFilterApiVersion, "", {}, nullptr, [&gate](const YAML::Node&) {
                             auto g = std::make_unique<Gate>();
                             gate = g.get();
                             return g;
                           }}));
  char tmpl[] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = mkstemp(tmpl);
  REQUIRE(fd >= 0);
  int pfd = open(tmpl, O_PATH | O_CLOEXEC);
  DiskOptions opt;
  opt.registry = &r;
  opt.filters = {spec("gate")};
  std::shared_ptr<Disk> disk;
  std::string err;
  REQUIRE(Disk::open(pfd, "gate.raw", opt, &disk, &err).ok());
  REQUIRE(disk->attach(true, false).ok());

  std::thread held([&] { CHECK(disk->write(Io{}, "first", 5, 0).ok()); });
  {
    std::unique_lock<std::mutex> l(gate->mu);
    gate->cv.wait(l, [&] { return gate->held; });
  }
  // The first write is deferred inside the filter; a second one completes meanwhile.
  REQUIRE(disk->write(Io{}, "second", 6, 4096).ok());
  CHECK(disk->stats().writes.load() == 1);
  {
    std::lock_guard<std::mutex> l(gate->mu);
    gate->open = true;
  }
  gate->cv.notify_all();
  held.join();
  CHECK(disk->stats().writes.load() == 2);
  char buf[6];
  REQUIRE(pread(fd, buf, 5, 0) == 5);
  CHECK(std::string(buf, 5) == "first");
  REQUIRE(pread(fd, buf, 6, 4096) == 6);
  CHECK(std::string(buf, 6) == "second");
  disk->detach();
  REQUIRE(disk->close().ok());
  disk.reset();
  close(pfd);
  close(fd);
  unlink(tmpl);
}

TEST_CASE("a disk opens its filters bottom-up and drains them top-down on flush and close", "[disk]") {
  std::vector<std::string> log;
  Registry reg = recording_registry(&log);
  char tmpl[] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = mkstemp(tmpl);
  int pfd = open(tmpl, O_PATH | O_CLOEXEC);
  DiskOptions opt;
  opt.registry = &reg;
  opt.filters = {spec("enc"), spec("rep")};
  std::shared_ptr<Disk> disk;
  std::string err;
  REQUIRE(Disk::open(pfd, "x.raw", opt, &disk, &err).ok());
  CHECK(log == std::vector<std::string>{"enc:open", "rep:open"});
  log.clear();
  REQUIRE(disk->flush().ok());
  CHECK(log == std::vector<std::string>{"rep:drain", "enc:drain"});
  log.clear();
  REQUIRE(disk->close().ok());
  CHECK(log == std::vector<std::string>{"rep:drain", "rep:close", "enc:drain", "enc:close"});
  disk.reset();
  close(pfd);
  close(fd);
  unlink(tmpl);
}

namespace {

// A filter whose drain can be told to fail, to test that a re-plumb aborts cleanly.
class Stubborn : public Filter {
 public:
  explicit Stubborn(std::vector<std::string>* log) : log_(log) {}
  Status drain() override {
    log_->push_back("stubborn:drain");
    return fail_drain ? Status::Error(EIO, "cannot drain") : Status::Ok();
  }
  void close() override { log_->push_back("stubborn:close"); }
  static inline bool fail_drain = false;

 private:
  std::vector<std::string>* log_;
};

}  // namespace

TEST_CASE("re-plumbing keeps unchanged filters, drains leaving ones first, and aborts cleanly", "[chain][disk]") {
  std::vector<std::string> log;
  Registry reg = recording_registry(&log);
  REQUIRE(reg.add(FilterInfo{"stubborn", FilterClass::Cache, kFilterApiVersion, "", {}, nullptr,
                             [&log](const YAML::Node&) { return std::make_unique<Stubborn>(&log); }}));
  char tmpl[] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = mkstemp(tmpl);
  int pfd = open(tmpl, O_PATH | O_CLOEXEC);
  DiskOptions opt;
  opt.registry = &reg;
  opt.filters = {spec("rep"), spec("thr", "{ x: 1 }")};
  std::shared_ptr<Disk> disk;
  std::string err;
  REQUIRE(Disk::open(pfd, "x.raw", opt, &disk, &err).ok());
  REQUIRE(disk->chain_description() == "rep -> thr");

  // Same specs: nothing happens to any filter.
  log.clear();
  REQUIRE(disk->replumb("same", {spec("rep"), spec("thr", "{ x: 1 }")}, reg, &err).ok());
  CHECK(log.empty());
  CHECK(disk->policy() == "same");

  // Add a cache, change thr's parameters, keep rep: only thr leaves (drained, then closed),
  // the new ones open bottom-up, and data flows through the new chain.
  log.clear();
  REQUIRE(disk->replumb("p2", {spec("rep"), spec("thr", "{ x: 2 }"), spec("stubborn")}, reg, &err).ok());
  CHECK(log == std::vector<std::string>{"thr:drain", "thr:open", "thr:close"});
  CHECK(disk->chain_description() == "rep -> stubborn -> thr");
  log.clear();
  REQUIRE(disk->write(Io{}, "abc", 3, 0).ok());
  CHECK(log == std::vector<std::string>{"rep:write", "thr:write", "thr:write<-0", "rep:write<-0"});

  // A leaving filter that cannot drain aborts the re-plumb: the old chain stays, whole.
  Stubborn::fail_drain = true;
  log.clear();
  CHECK(disk->replumb("p3", {spec("rep")}, reg, &err).err == EIO);
  CHECK(err == "a filter being removed could not drain: cannot drain");
  CHECK(disk->chain_description() == "rep -> stubborn -> thr");
  CHECK(disk->policy() == "p2");
  Stubborn::fail_drain = false;

  // An invalid target changes nothing either.
  CHECK(disk->replumb("p4", {spec("nosuch")}, reg, &err).err == EINVAL);
  CHECK(disk->chain_description() == "rep -> stubborn -> thr");
  REQUIRE(disk->close().ok());
  disk.reset();
  close(pfd);
  close(fd);
  unlink(tmpl);
}

namespace {

// An encrypt-class filter that offers at-rest protection and refuses to leave an open disk, and
// a cache-class filter that records the protection it was opened with.
class Sealing : public AtRest {
 public:
  explicit Sealing(int id) : id(id) {}
  Status seal(uint64_t, const void*, void*, size_t) const override { return Status::Ok(); }
  Status unseal(uint64_t, const void*, void*, size_t) const override { return Status::Ok(); }
  uint64_t header_bytes() const override { return 0; }
  Status read_header(void*, size_t, uint64_t) const override { return Status::Ok(); }
  int id;
};
class Provider : public Filter {
 public:
  explicit Provider(int id) : id_(id) {}
  Status open(const DiskInfo&) override {
    at_rest_ = std::make_shared<Sealing>(id_);
    return Status::Ok();
  }
  std::shared_ptr<const AtRest> at_rest() const override { return at_rest_; }
  std::string removal_refused() const override { return "provider: stays"; }

 private:
  int id_;
  std::shared_ptr<const AtRest> at_rest_;
};
class Keeper : public Filter {
 public:
  explicit Keeper(std::vector<int>* seen) : seen_(seen) {}
  Status open(const DiskInfo& info) override {
    auto* s = dynamic_cast<const Sealing*>(info.at_rest.get());
    seen_->push_back(s ? s->id : 0);
    return Status::Ok();
  }

 private:
  std::vector<int>* seen_;
};

}  // namespace

TEST_CASE("filters above an encrypting one are opened with its at-rest protection, and it cannot leave an open disk",
          "[chain][disk]") {
  std::vector<int> seen;
  Registry reg;
  REQUIRE(reg.add(FilterInfo{"prov", FilterClass::Encrypt, kFilterApiVersion, "", {}, nullptr,
                             [](const YAML::Node& p) { return std::make_unique<Provider>(p["id"].as<int>()); }}));
  REQUIRE(reg.add(FilterInfo{"keeper", FilterClass::Cache, kFilterApiVersion, "", {}, nullptr,
                             [&seen](const YAML::Node&) { return std::make_unique<Keeper>(&seen); }}));
  REQUIRE(reg.add(FilterInfo{"keeper2", FilterClass::Replicate, kFilterApiVersion, "", {}, nullptr,
                             [&seen](const YAML::Node&) { return std::make_unique<Keeper>(&seen); }}));
  char tmpl[] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = mkstemp(tmpl);
  int pfd = open(tmpl, O_PATH | O_CLOEXEC);
  DiskOptions opt;
  opt.registry = &reg;
  opt.filters = {spec("keeper"), spec("prov", "{ id: 1 }")};
  std::shared_ptr<Disk> disk;
  std::string err;
  REQUIRE(Disk::open(pfd, "x.raw", opt, &disk, &err).ok());
  CHECK(seen == std::vector<int>{1});

  // A filter arriving above a kept provider gets the kept one's protection; a replaced provider
  // (new parameters) opens first, so a filter arriving with it gets the new one's.
  REQUIRE(disk->replumb("p", {spec("keeper"), spec("keeper2"), spec("prov", "{ id: 1 }")}, reg, &err).ok());
  CHECK(seen == std::vector<int>{1, 1});
  REQUIRE(disk->replumb("p", {spec("keeper"), spec("prov", "{ id: 2 }")}, reg, &err).ok());
  REQUIRE(disk->replumb("p", {spec("keeper"), spec("keeper2"), spec("prov", "{ id: 2 }")}, reg, &err).ok());
  CHECK(seen == std::vector<int>{1, 1, 2});

  // Removing the provider outright is refused, and nothing changes.
  CHECK(disk->replumb("q", {spec("keeper")}, reg, &err).err == EBUSY);
  CHECK(err == "provider: stays");
  CHECK(disk->chain_description() == "keeper2 -> keeper -> prov");
  CHECK(disk->policy() == "p");
  REQUIRE(disk->close().ok());
  disk.reset();
  close(pfd);
  close(fd);
  unlink(tmpl);
}

namespace {

// For the background-call test: a filter whose own thread writes below it in a loop (as a
// destager does), and a filter below it that counts calls into a dead or unlinked instance.
std::atomic<int> g_bg_violations{0};

class Victim : public Filter {
 public:
  ~Victim() override {
    if (inflight_.load() != 0) ++g_bg_violations;
    magic_ = 0;
  }
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    if (magic_ != kAlive) ++g_bg_violations;
    ++inflight_;
    std::this_thread::sleep_for(std::chrono::microseconds(50));  // widen the window
    Status s = next_->write(io, buf, len, off);
    --inflight_;
    return s;
  }

 private:
  static constexpr uint64_t kAlive = 0x5eed5eed5eed5eedull;
  volatile uint64_t magic_ = kAlive;
  std::atomic<int> inflight_{0};
};

class Background : public Filter {
 public:
  Status open(const DiskInfo&) override {
    t_ = std::thread([this] {
      while (!stop_.load()) {
        BelowGuard b = below();
        if (!b) return;  // left the chain
        if (!b.get()) ++g_bg_violations;
        if (b->write(Io{}, "bg", 2, 0).ok()) ++calls;
      }
    });
    return Status::Ok();
  }
  void close() override {
    stop_.store(true);
    if (t_.joinable()) t_.join();
  }
  ~Background() override { close(); }
  static std::atomic<int> calls;

 private:
  std::thread t_;
  std::atomic<bool> stop_{false};
};
std::atomic<int> Background::calls{0};

}  // namespace

TEST_CASE("a filter's own thread never calls into a layer below that a re-plumb replaces or removes",
          "[chain][disk]") {
  Registry reg;
  REQUIRE(reg.add(FilterInfo{"bg", FilterClass::Cache, kFilterApiVersion, "", {}, nullptr,
                             [](const YAML::Node&) { return std::make_unique<Background>(); }}));
  REQUIRE(reg.add(FilterInfo{"victim", FilterClass::Throttle, kFilterApiVersion, "", {}, nullptr,
                             [](const YAML::Node&) { return std::make_unique<Victim>(); }}));
  char tmpl[] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = mkstemp(tmpl);
  int pfd = open(tmpl, O_PATH | O_CLOEXEC);
  DiskOptions opt;
  opt.registry = &reg;
  opt.filters = {spec("victim", "{ v: 0 }")};
  std::shared_ptr<Disk> disk;
  std::string err;
  g_bg_violations = 0;
  Background::calls = 0;
  REQUIRE(Disk::open(pfd, "x.raw", opt, &disk, &err).ok());
  // A fresh background filter arrives above: its thread starts in open(), before it is linked.
  REQUIRE(disk->replumb("with-bg", {spec("bg"), spec("victim", "{ v: 0 }")}, reg, &err).ok());
  // The filter below it is replaced again and again while the thread writes through it.
  for (int i = 1; i <= 100; ++i) {
    const std::string params = "{ v: " + std::to_string(i) + " }";
    REQUIRE(disk->replumb("p", {spec("bg"), spec("victim", params.c_str())}, reg, &err).ok());
    const int before = Background::calls.load();
    while (Background::calls.load() < before + 2) std::this_thread::yield();  // it got through
  }
  // Removed outright while its thread runs, and the victim with it: the thread finds nothing
  // below and stops.
  REQUIRE(disk->replumb("none", {}, reg, &err).ok());
  CHECK(disk->chain_description() == "(empty)");
  CHECK(g_bg_violations.load() == 0);
  CHECK(Background::calls.load() >= 200);
  REQUIRE(disk->close().ok());
  disk.reset();
  close(pfd);
  close(fd);
  unlink(tmpl);
}

namespace {
// Reads the size below it when it opens (as the cache and replicate filters do).
class Peeker : public Filter {
 public:
  explicit Peeker(uint64_t* seen) : seen_(seen) {}
  Status open(const DiskInfo&) override { return next_ ? next_->size(seen_) : Status::Error(EFAULT, "unlinked"); }

 private:
  uint64_t* seen_;
};
}  // namespace

TEST_CASE("a filter added to an open disk can read the layers below it when it opens", "[chain][disk]") {
  uint64_t seen_cache = 0, seen_rep = 0;
  Registry reg;
  REQUIRE(reg.add(FilterInfo{"peek-cache", FilterClass::Cache, kFilterApiVersion, "", {}, nullptr,
                             [&](const YAML::Node&) { return std::make_unique<Peeker>(&seen_cache); }}));
  REQUIRE(reg.add(FilterInfo{"peek-rep", FilterClass::Replicate, kFilterApiVersion, "", {}, nullptr,
                             [&](const YAML::Node&) { return std::make_unique<Peeker>(&seen_rep); }}));
  char tmpl[] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = mkstemp(tmpl);
  int pfd = open(tmpl, O_PATH | O_CLOEXEC);
  DiskOptions opt;
  opt.registry = &reg;
  std::shared_ptr<Disk> disk;
  std::string err;
  REQUIRE(Disk::open(pfd, "x.raw", opt, &disk, &err).ok());
  REQUIRE(disk->write(Io{}, "0123456789", 10, 4086).ok());
  // Both arrive at once: the lower one opens first, and the upper one reads through it.
  REQUIRE(disk->replumb("peek", {spec("peek-rep"), spec("peek-cache")}, reg, &err).ok());
  CHECK(seen_cache == 4096);
  CHECK(seen_rep == 4096);
  REQUIRE(disk->close().ok());
  disk.reset();
  close(pfd);
  close(fd);
  unlink(tmpl);
}

namespace {

// Defers every write it may: keeps it until the test resumes it (another thread) or the disk
// releases it.
class Parker : public Filter {
 public:
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    if (io.defer && may_defer()) {
      if (Deferred* d = io.defer->take()) {
        std::lock_guard<std::mutex> l(mu);
        held.push_back({d, len, off});
        cv.notify_all();
        return Status::Deferred();
      }
    }
    return next_->write(io, buf, len, off);
  }
  void release_deferred() override {
    ++releases;
    resume_all();
  }
  // Resumes every held write: down the chain from this thread.
  void resume_all() {
    std::vector<Held> all;
    {
      std::lock_guard<std::mutex> l(mu);
      all.swap(held);
    }
    for (Held& h : all) {
      struct Down final : Continuation {
        Parker* p;
        Held h;
        Status run(void* data, size_t*) override {
          if (p->fail) return Status::Error(p->fail, "parker: told to fail below");
          return p->next_->write(Io{}, data, h.len, h.off);
        }
      } k;
      k.p = this;
      k.h = h;
      h.d->resume(k);
    }
  }
  size_t holding() {
    std::lock_guard<std::mutex> l(mu);
    return held.size();
  }
  struct Held {
    Deferred* d;
    size_t len;
    uint64_t off;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Held> held;
  int releases = 0;
  int fail = 0;  // resumed writes fail with this errno instead of going down
};

struct Answer {
  std::mutex mu;
  std::vector<std::pair<int, size_t>> got;  // (errno, bytes)
  static void fn(void* ctx, Status s, const void*, size_t len) {
    auto* a = static_cast<Answer*>(ctx);
    std::lock_guard<std::mutex> l(a->mu);
    a->got.emplace_back(s.err, len);
  }
};

}  // namespace

TEST_CASE("deferral reaches a filter only through filters above it that pass it", "[chain]") {
  std::vector<std::string> log;
  Registry r = recording_registry(&log);
  testing::MemLayer bottom;
  Chain c;
  std::string err;
  REQUIRE(Chain::build(r, {spec("enc"), spec("thr"), spec("rep")}, &bottom, &c, &err).ok());
  std::vector<bool> may;
  c.for_each([&](const Filter& f, const FilterInfo&) { may.push_back(f.may_defer()); });
  // rep is the top (may defer); it does not pass deferral, so nothing below it may.
  CHECK(may == std::vector<bool>{true, false, false});
  Registry r2;
  REQUIRE(r2.add(FilterInfo{"see-through", FilterClass::Cache, kFilterApiVersion, "", {}, nullptr,
                            [](const YAML::Node&) { return std::make_unique<Filter>(); }, nullptr, nullptr, nullptr,
                            true}));
  REQUIRE(r2.add(FilterInfo{"thr", FilterClass::Throttle, kFilterApiVersion, "", {}, nullptr,
                            [](const YAML::Node&) { return std::make_unique<Filter>(); }}));
  REQUIRE(r2.add(FilterInfo{"enc", FilterClass::Encrypt, kFilterApiVersion, "", {}, nullptr,
                            [](const YAML::Node&) { return std::make_unique<Filter>(); }}));
  REQUIRE(Chain::build(r2, {spec("enc"), spec("thr"), spec("see-through")}, &bottom, &c, &err).ok());
  may.clear();
  c.for_each([&](const Filter& f, const FilterInfo&) { may.push_back(f.may_defer()); });
  CHECK(may == std::vector<bool>{true, true, false});
}

TEST_CASE("a deferred write: the disk owns its data, the answer comes from the resuming thread, close waits",
          "[chain][disk]") {
  Parker* parker = nullptr;
  Registry r;
  REQUIRE(r.add(FilterInfo{"parker", FilterClass::Throttle, kFilterApiVersion, "", {}, nullptr,
                           [&parker](const YAML::Node&) {
                             auto p = std::make_unique<Parker>();
                             parker = p.get();
                             return p;
                           },
                           nullptr, nullptr, nullptr, false, /*defers=*/true}));
  char tmpl[] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = mkstemp(tmpl);
  REQUIRE(fd >= 0);
  int pfd = open(tmpl, O_PATH | O_CLOEXEC);
  DiskOptions opt;
  opt.registry = &r;
  opt.filters = {spec("parker")};
  std::shared_ptr<Disk> disk;
  std::string err;
  REQUIRE(Disk::open(pfd, "park.raw", opt, &disk, &err).ok());
  REQUIRE(disk->attach(true, false).ok());
  REQUIRE(parker);

  Answer answer;
  const Completion done{&Answer::fn, &answer};
  char data[8] = "first!!";
  CHECK(disk->write(Io{}, data, 7, 0, &done).deferred());
  std::memset(data, 'X', sizeof data);  // the worker's buffer is reused at once
  CHECK(disk->deferred() == 1);
  CHECK(disk->stats().writes.load() == 0);
  CHECK(answer.got.empty());
  // Without a completion nothing is deferred: the write is answered on this thread.
  REQUIRE(disk->write(Io{}, "plain", 5, 4096).ok());
  CHECK(disk->stats().writes.load() == 1);
  // Resumed from another thread: written from the disk's copy, answered there, counted.
  std::thread([&] { parker->resume_all(); }).join();
  REQUIRE(answer.got.size() == 1);
  CHECK(answer.got[0] == std::make_pair(0, size_t(7)));
  CHECK(disk->deferred() == 0);
  CHECK(disk->stats().writes.load() == 2);
  char buf[7];
  REQUIRE(pread(fd, buf, 7, 0) == 7);
  CHECK(std::string(buf, 7) == "first!!");
  CHECK(disk->stats_json().find("\"deferred\":0,") != std::string::npos);

  // Close with two writes held: they are released (go down) and answered before it returns.
  CHECK(disk->write(Io{}, "second", 6, 100, &done).deferred());
  CHECK(disk->write(Io{}, "third", 5, 200, &done).deferred());
  CHECK(parker->holding() == 2);
  disk->detach();
  REQUIRE(disk->close().ok());
  CHECK(parker->releases >= 1);
  CHECK(answer.got.size() == 3);
  CHECK(disk->deferred() == 0);
  REQUIRE(pread(fd, buf, 6, 100) == 6);
  CHECK(std::string(buf, 6) == "second");
  disk.reset();
  close(pfd);
  close(fd);
  unlink(tmpl);
}

namespace {

// Notes whether each read and write reached it with a Deferrer, and passes it on.
class Noter : public Filter {
 public:
  std::vector<bool> offered;
  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override {
    offered.push_back(io.defer != nullptr);
    return next_->read(io, buf, len, off, got);
  }
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    offered.push_back(io.defer != nullptr);
    return next_->write(io, buf, len, off);
  }
};

}  // namespace

TEST_CASE("a Deferrer is offered only while the chain holds a filter that declares it defers", "[chain][disk]") {
  Noter* noter = nullptr;
  Registry r;
  FilterInfo note{"note", FilterClass::Cache, kFilterApiVersion, "", {}, nullptr, [&noter](const YAML::Node&) {
                    auto n = std::make_unique<Noter>();
                    noter = n.get();
                    return n;
                  }};
  note.passes_deferral = true;
  REQUIRE(r.add(std::move(note)));
  // Declares that it defers, and never does: what matters is the declaration.
  FilterInfo lazy{"lazy", FilterClass::Throttle, kFilterApiVersion, "", {}, nullptr,
                  [](const YAML::Node&) { return std::make_unique<Filter>(); }};
  lazy.defers = true;
  REQUIRE(r.add(std::move(lazy)));
  char tmpl[] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = mkstemp(tmpl);
  REQUIRE(fd >= 0);
  int pfd = open(tmpl, O_PATH | O_CLOEXEC);
  DiskOptions opt;
  opt.registry = &r;
  opt.filters = {spec("note")};
  std::shared_ptr<Disk> disk;
  std::string err;
  REQUIRE(Disk::open(pfd, "note.raw", opt, &disk, &err).ok());
  Answer answer;
  const Completion done{&Answer::fn, &answer};
  char buf[8] = "abcdefg";
  size_t got = 0;
  REQUIRE(disk->write(Io{}, buf, 7, 0, &done).ok());
  REQUIRE(disk->read(Io{}, buf, 7, 0, &got, &done).ok());
  CHECK(noter->offered == std::vector<bool>{false, false});  // nothing below would defer
  REQUIRE(disk->replumb("p", {spec("note"), spec("lazy")}, r, &err).ok());
  noter->offered.clear();
  REQUIRE(disk->write(Io{}, buf, 7, 0, &done).ok());
  REQUIRE(disk->read(Io{}, buf, 7, 0, &got, &done).ok());
  REQUIRE(disk->write(Io{}, buf, 7, 0).ok());  // no completion: never
  CHECK(noter->offered == std::vector<bool>{true, true, false});
  REQUIRE(disk->replumb("q", {spec("note")}, r, &err).ok());
  noter->offered.clear();
  REQUIRE(disk->write(Io{}, buf, 7, 0, &done).ok());
  CHECK(noter->offered == std::vector<bool>{false});
  REQUIRE(disk->close().ok());
  disk.reset();
  close(pfd);
  close(fd);
  unlink(tmpl);
}

namespace {

// Passes writes down with their Deferrer; when one comes back Deferred it registers a
// completion hook (filter.h, "Completion hooks") that logs what it saw — the status from below
// and the bytes the backing file holds then — and may fail the request afterwards.
class Hooker : public Filter {
 public:
  Hooker(std::string name, std::vector<std::string>* log, int backing_fd)
      : name_(std::move(name)), log_(log), fd_(backing_fd) {}
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    Status s = next_->write(io, buf, len, off);
    if (!s.deferred()) return s;
    if (before_register) before_register();
    io.defer->then(new Hook(this, len, off));
    log_->push_back(name_ + ":registered");
    return s;
  }
  struct Hook final : Then {
    Hook(Hooker* f, size_t len, uint64_t off) : f(f), len(len), off(off) {}
    Status then(Status s, void* data, size_t*) override {
      std::string landed(len, '\0');
      if (pread(f->fd_, landed.data(), len, static_cast<off_t>(off)) != static_cast<ssize_t>(len)) landed = "?";
      f->log_->push_back(f->name_ + ":then<-" + std::to_string(s.err) + " data=" +
                         std::string(static_cast<const char*>(data), len) + " below=" + landed);
      f->thread = std::this_thread::get_id();
      Status out = s.ok() && f->fail_after ? Status::Error(f->fail_after, "hooker: fails after the write below") : s;
      delete this;
      return out;
    }
    Hooker* f;
    size_t len;
    uint64_t off;
  };
  std::string name_;
  std::vector<std::string>* log_;
  int fd_;
  int fail_after = 0;                     // the hook fails a request that succeeded below
  std::function<void()> before_register;  // runs between the Deferred answer and then()
  std::thread::id thread;                 // where the hook last ran
};

// A disk over a temporary file: two hooking filters (classes replicate and cache, both passing
// deferral) above the Parker (class throttle).
struct HookedDisk {
  std::vector<std::string> log;
  Parker* parker = nullptr;
  Hooker *upper = nullptr, *lower = nullptr;
  Registry r;
  char tmpl[32] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = -1, pfd = -1;
  std::shared_ptr<Disk> disk;
  Answer answer;
  Completion done{&Answer::fn, &answer};

  HookedDisk() {
    fd = mkstemp(tmpl);
    REQUIRE(fd >= 0);
    pfd = open(tmpl, O_PATH | O_CLOEXEC);
    auto hooker = [this](const char* name, FilterClass cls, Hooker** out) {
      std::string n = name;
      REQUIRE(r.add(FilterInfo{n, cls, kFilterApiVersion, "", {}, nullptr,
                               [this, n, out](const YAML::Node&) {
                                 auto h = std::make_unique<Hooker>(n, &log, fd);
                                 *out = h.get();
                                 return h;
                               },
                               nullptr, nullptr, nullptr, true}));
    };
    hooker("upper", FilterClass::Replicate, &upper);
    hooker("lower", FilterClass::Cache, &lower);
    REQUIRE(r.add(FilterInfo{"parker", FilterClass::Throttle, kFilterApiVersion, "", {}, nullptr,
                             [this](const YAML::Node&) {
                               auto p = std::make_unique<Parker>();
                               parker = p.get();
                               return p;
                             },
                             nullptr, nullptr, nullptr, false, /*defers=*/true}));
    DiskOptions opt;
    opt.registry = &r;
    opt.filters = {spec("parker"), spec("upper"), spec("lower")};
    std::string err;
    REQUIRE(Disk::open(pfd, "hooked.raw", opt, &disk, &err).ok());
    REQUIRE(disk->attach(true, false).ok());
    REQUIRE((parker && upper && lower));
  }
  bool closed = false;
  ~HookedDisk() {
    if (!closed) {
      disk->detach();
      (void)disk->close();
    }
    disk.reset();
    close(pfd);
    close(fd);
    unlink(tmpl);
  }
};

}  // namespace

TEST_CASE("completion hooks run bottom-up after the deferred write landed, before the answer, on the resuming thread",
          "[chain][disk][hook]") {
  HookedDisk h;
  char data[8] = "landed!";
  REQUIRE(h.disk->write(Io{}, data, 7, 0, &h.done).deferred());
  std::memset(data, 'X', sizeof data);
  CHECK(h.log == std::vector<std::string>{"lower:registered", "upper:registered"});
  CHECK(h.answer.got.empty());
  std::thread::id resumer;
  std::thread t([&] {
    resumer = std::this_thread::get_id();
    h.parker->resume_all();
  });
  t.join();
  REQUIRE(h.log.size() == 4);
  // The lower filter's hook first, each seeing the bytes below already.
  CHECK(h.log[2] == "lower:then<-0 data=landed! below=landed!");
  CHECK(h.log[3] == "upper:then<-0 data=landed! below=landed!");
  CHECK(h.lower->thread == resumer);
  REQUIRE(h.answer.got.size() == 1);
  CHECK(h.answer.got[0] == std::make_pair(0, size_t(7)));
  CHECK(h.disk->deferred() == 0);
  CHECK(h.disk->stats().writes.load() == 1);
}

TEST_CASE("completion hooks see a failure from below and pass it up", "[chain][disk][hook]") {
  HookedDisk h;
  h.parker->fail = ENOSPC;
  REQUIRE(h.disk->write(Io{}, "nospace", 7, 0, &h.done).deferred());
  std::thread([&] { h.parker->resume_all(); }).join();
  REQUIRE(h.log.size() == 4);
  CHECK(h.log[2].rfind("lower:then<-" + std::to_string(ENOSPC) + " ", 0) == 0);
  CHECK(h.log[3].rfind("upper:then<-" + std::to_string(ENOSPC) + " ", 0) == 0);
  REQUIRE(h.answer.got.size() == 1);
  CHECK(h.answer.got[0].first == ENOSPC);
  CHECK(h.disk->stats().errors.load() == 1);
}

TEST_CASE("a filter's hook fails a request after its deferred write landed below: only the filters above see it",
          "[chain][disk][hook]") {
  HookedDisk h;
  h.lower->fail_after = EIO;
  REQUIRE(h.disk->write(Io{}, "written", 7, 0, &h.done).deferred());
  std::thread([&] { h.parker->resume_all(); }).join();
  REQUIRE(h.log.size() == 4);
  CHECK(h.log[2] == "lower:then<-0 data=written below=written");  // the bytes are below
  CHECK(h.log[3].rfind("upper:then<-" + std::to_string(EIO) + " ", 0) == 0);
  REQUIRE(h.answer.got.size() == 1);
  CHECK(h.answer.got[0].first == EIO);
}

TEST_CASE("a request that completes before its worker is back runs its hooks and answer on the worker",
          "[chain][disk][hook]") {
  HookedDisk h;
  // The lower hooker has its Deferred answer; before it registers, another thread resumes the
  // write to the end. Nothing may run before the hooks are registered.
  h.lower->before_register = [&] {
    std::thread([&] { h.parker->resume_all(); }).join();
    CHECK(h.answer.got.empty());
  };
  REQUIRE(h.disk->write(Io{}, "raced!!", 7, 0, &h.done).deferred());
  REQUIRE(h.answer.got.size() == 1);  // answered before write() returned
  CHECK(h.answer.got[0] == std::make_pair(0, size_t(7)));
  CHECK(h.lower->thread == std::this_thread::get_id());
  CHECK(h.log == std::vector<std::string>{"lower:registered", "upper:registered",
                                          "lower:then<-0 data=raced!! below=raced!!",
                                          "upper:then<-0 data=raced!! below=raced!!"});
  CHECK(h.disk->deferred() == 0);
}

TEST_CASE("hooks of writes held at close run before the disk closes", "[chain][disk][hook]") {
  HookedDisk h;
  REQUIRE(h.disk->write(Io{}, "closing", 7, 0, &h.done).deferred());
  h.disk->detach();
  REQUIRE(h.disk->close().ok());
  CHECK(h.log.size() == 4);
  CHECK(h.answer.got.size() == 1);
  h.closed = true;
}

namespace {

// Defers every read it may and answers it from a thread of the test's: below, through the
// continuation, as the throttle does.
class ReadParker : public Filter {
 public:
  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override {
    if (io.defer && may_defer())
      if (Deferred* d = io.defer->take()) {
        held = d;
        this->len = len;
        this->off = off;
        return Status::Deferred();
      }
    return next_->read(io, buf, len, off, got);
  }
  void resume() {
    struct Down final : Continuation {
      ReadParker* p;
      Status run(void* data, size_t* got) override { return p->next_->read(Io{}, data, p->len, p->off, got); }
    } k;
    k.p = this;
    Deferred* d = held;
    held = nullptr;
    d->resume(k);
  }
  void release_deferred() override {
    if (held) resume();
  }
  Deferred* held = nullptr;
  size_t len = 0;
  uint64_t off = 0;
};

struct ReadAnswer {
  std::string data;
  int err = -1;
  static void fn(void* ctx, Status s, const void* data, size_t len) {
    auto* a = static_cast<ReadAnswer*>(ctx);
    a->err = s.err;
    a->data.assign(static_cast<const char*>(data), len);
  }
};

}  // namespace

TEST_CASE("a deferred read is answered with every byte the continuation read", "[chain][disk]") {
  ReadParker* parker = nullptr;
  Registry r;
  REQUIRE(r.add(FilterInfo{"rparker", FilterClass::Throttle, kFilterApiVersion, "", {}, nullptr,
                           [&parker](const YAML::Node&) {
                             auto p = std::make_unique<ReadParker>();
                             parker = p.get();
                             return p;
                           },
                           nullptr, nullptr, nullptr, false, /*defers=*/true}));
  char tmpl[] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = mkstemp(tmpl);
  REQUIRE(fd >= 0);
  const std::string content(131072, 'r');
  REQUIRE(pwrite(fd, content.data(), content.size(), 0) == static_cast<ssize_t>(content.size()));
  int pfd = open(tmpl, O_PATH | O_CLOEXEC);
  DiskOptions opt;
  opt.registry = &r;
  opt.filters = {spec("rparker")};
  std::shared_ptr<Disk> disk;
  std::string err;
  REQUIRE(Disk::open(pfd, "rpark.raw", opt, &disk, &err).ok());
  REQUIRE(disk->attach(false, false).ok());
  ReadAnswer answer;
  const Completion done{&ReadAnswer::fn, &answer};
  std::vector<char> buf(131072);
  size_t got = 0;
  REQUIRE(disk->read(Io{}, buf.data(), buf.size(), 0, &got, &done).deferred());
  std::thread([&] { parker->resume(); }).join();
  CHECK(answer.err == 0);
  CHECK(answer.data == content);
  CHECK(disk->stats().read_bytes.load() == content.size());
  disk->detach();
  REQUIRE(disk->close().ok());
  disk.reset();
  close(pfd);
  close(fd);
  unlink(tmpl);
}

namespace {

// Carries every write offered deferral on its own threads (offload.h), at most two of them.
class Carrier : public Filter {
 public:
  explicit Carrier(std::vector<std::string>* log) : log_(log) {}
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    if (io.defer && may_defer() && offload.take(io, true, len, off, 7)) return Status::Deferred();
    return next_->write(io, buf, len, off);
  }
  void release_deferred() override {
    {
      std::lock_guard<std::mutex> l(log_mu);
      log_->push_back("carrier:release");
    }
    offload.release();
  }
  void defer_again() override { offload.again(); }
  std::vector<std::string>* log_;
  std::mutex log_mu;
  std::vector<uint32_t> tags;  // what each pool run was given (0: not a write, or with a Deferrer)
  Offload offload{[this](bool is_write, const Io& io, void* data, size_t len, uint64_t off, uint32_t tag,
                         size_t*) -> Status {
                    {
                      std::lock_guard<std::mutex> l(log_mu);  // (Catch's CHECK is for the test's thread)
                      tags.push_back(is_write && !io.defer ? tag : 0);
                    }
                    return write(io, data, len, off);
                  },
                  2};
};

// Holds every write on its calling thread until opened; counts who waits.
class WriteGate : public Filter {
 public:
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    std::unique_lock<std::mutex> l(mu);
    ++waiting;
    threads.push_back(std::this_thread::get_id());
    cv.notify_all();
    cv.wait(l, [&] { return open; });
    --waiting;
    l.unlock();
    return next_->write(io, buf, len, off);
  }
  void set(bool o) {
    std::lock_guard<std::mutex> l(mu);
    open = o;
    cv.notify_all();
  }
  void wait_for(int n) {
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return waiting == n; });
  }
  std::mutex mu;
  std::condition_variable cv;
  bool open = true;
  int waiting = 0;
  std::vector<std::thread::id> threads;
};

// Declares that it defers (so the disk offers a Deferrer) and logs its release.
class Releaser : public Filter {
 public:
  explicit Releaser(std::vector<std::string>* log, std::mutex* mu) : log_(log), mu_(mu) {}
  void release_deferred() override {
    std::lock_guard<std::mutex> l(*mu_);
    log_->push_back("throttle:release");
  }
  std::vector<std::string>* log_;
  std::mutex* mu_;
};

}  // namespace

TEST_CASE("a filter carries requests on its own threads: the worker is free while below holds them",
          "[chain][disk][offload]") {
  std::vector<std::string> log;
  Carrier* carrier = nullptr;
  WriteGate* gate = nullptr;
  Registry r;
  FilterInfo ci{"carrier", FilterClass::Replicate, kFilterApiVersion, "", {}, nullptr,
                [&](const YAML::Node&) {
                  auto c = std::make_unique<Carrier>(&log);
                  carrier = c.get();
                  return c;
                }};
  ci.passes_deferral = true;
  REQUIRE(r.add(std::move(ci)));
  std::mutex* log_mu = nullptr;
  FilterInfo ti{"releaser", FilterClass::Throttle, kFilterApiVersion, "", {}, nullptr,
                [&](const YAML::Node&) { return std::make_unique<Releaser>(&log, log_mu); }};
  ti.defers = true;
  REQUIRE(r.add(std::move(ti)));
  REQUIRE(r.add(FilterInfo{"gate", FilterClass::Encrypt, kFilterApiVersion, "", {}, nullptr, [&](const YAML::Node&) {
                             auto g = std::make_unique<WriteGate>();
                             gate = g.get();
                             return g;
                           }}));
  std::mutex lm;
  log_mu = &lm;
  char tmpl[] = "/tmp/iofilterfs-unit-XXXXXX";
  int fd = mkstemp(tmpl);
  REQUIRE(fd >= 0);
  int pfd = open(tmpl, O_PATH | O_CLOEXEC);
  DiskOptions opt;
  opt.registry = &r;
  opt.filters = {spec("carrier"), spec("releaser"), spec("gate")};
  std::shared_ptr<Disk> disk;
  std::string err;
  REQUIRE(Disk::open(pfd, "carry.raw", opt, &disk, &err).ok());
  REQUIRE(disk->attach(true, false).ok());
  REQUIRE(carrier);
  REQUIRE(gate);

  Answer answer;
  const Completion done{&Answer::fn, &answer};
  auto answers = [&] {
    std::lock_guard<std::mutex> l(answer.mu);
    return answer.got.size();
  };
  // Three writes while below holds every write: each is answered Deferred at once on this
  // thread; two pool threads wait below (the ceiling), the third is queued.
  gate->set(false);
  char data[8] = "carried";
  for (int i = 0; i < 3; ++i) CHECK(disk->write(Io{}, data, 7, 4096u * i, &done).deferred());
  std::memset(data, 'X', sizeof data);  // the worker's buffer is free at once
  gate->wait_for(2);
  CHECK(carrier->offload.threads() == 2);
  CHECK(disk->deferred() == 3);
  CHECK(answers() == 0);
  {
    std::lock_guard<std::mutex> l(gate->mu);
    for (auto id : gate->threads) CHECK(id != std::this_thread::get_id());
  }
  // Without a completion (nothing can take a late answer): carried on this thread.
  gate->set(true);
  REQUIRE(disk->write(Io{}, "plain", 5, 65536).ok());
  for (int i = 0; i < 500 && answers() < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(answers() == 3);
  {
    std::lock_guard<std::mutex> l(answer.mu);
    for (auto& a : answer.got) CHECK(a == std::make_pair(0, size_t(7)));
  }
  CHECK(disk->deferred() == 0);
  CHECK(carrier->offload.taken() == 3);
  CHECK(carrier->tags == std::vector<uint32_t>{7, 7, 7});
  for (int i = 0; i < 3; ++i) {
    char buf[7];
    REQUIRE(pread(fd, buf, 7, 4096 * i) == 7);
    CHECK(std::string(buf, 7) == "carried");
  }

  // Close with writes carried and held below: the release goes bottom-up (the filters below
  // let everything through before the carrier waits for its own), and close returns only
  // once every one is answered.
  gate->set(false);
  for (int i = 0; i < 3; ++i) CHECK(disk->write(Io{}, "again!!", 7, 4096u * (4 + i), &done).deferred());
  gate->wait_for(2);
  disk->detach();
  Status closed = Status::Error(EINVAL);
  std::thread closer([&] { closed = disk->close(); });
  for (int i = 0; i < 500; ++i) {
    {
      std::lock_guard<std::mutex> l(lm);
      if (std::find(log.begin(), log.end(), "carrier:release") != log.end()) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(answers() == 3);  // the release waits for the carried writes
  gate->set(true);
  closer.join();
  CHECK(closed.ok());
  CHECK(answers() == 6);
  CHECK(disk->deferred() == 0);
  {
    std::lock_guard<std::mutex> l(lm);
    CHECK(log == std::vector<std::string>{"throttle:release", "carrier:release"});
  }
  char buf[7];
  REQUIRE(pread(fd, buf, 7, 4096 * 6) == 7);
  CHECK(std::string(buf, 7) == "again!!");
  disk.reset();
  close(pfd);
  close(fd);
  unlink(tmpl);
}

namespace {

// Passes io down; when the layer below answers Deferred, registers a hook that notes when it
// ran and what the write's bytes were then.
class NotingHooker : public Filter {
 public:
  struct Hook final : Then {
    NotingHooker* f;
    Status then(Status s, void* data, size_t*) override {
      f->ran.push_back("hook:" + std::to_string(s.err) + ":" + std::string(static_cast<char*>(data), 4));
      return s;
    }
  } hook;
  std::vector<std::string> ran;
  NotingHooker() { hook.f = this; }
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    Status s = next_->write(io, buf, len, off);
    if (s.deferred()) io.defer->then(&hook);
    return s;
  }
};

}  // namespace

TEST_CASE("a carried request's Waiter: the layers below may defer its call, their hooks run, the carrier waits",
          "[chain][offload]") {
  testing::MemLayer mem;
  mem.data.assign(8192, 0);
  Parker parker;
  parker.set_next(&mem);
  parker.set_may_defer(true);
  NotingHooker hooker;
  hooker.set_next(&parker);
  hooker.set_may_defer(true);
  const char data[] = "abcd";
  // Resumed from another thread while the carrier waits.
  {
    Offload::Waiter w(data);
    const Status s = hooker.write(Io{false, &w}, data, 4, 100);
    REQUIRE(s.deferred());
    REQUIRE(parker.holding() == 1);
    std::thread later([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      parker.resume_all();
    });
    size_t got = 0;
    const Status done = w.wait(s, &got);
    later.join();
    CHECK(done.ok());
    CHECK(std::string(mem.data.data() + 100, 4) == "abcd");
    CHECK(hooker.ran == std::vector<std::string>{"hook:0:abcd"});
  }
  // Resumed (and failed) before the carrier waits: wait() runs the hooks itself.
  {
    hooker.ran.clear();
    parker.fail = EIO;
    Offload::Waiter w(data);
    const Status s = hooker.write(Io{false, &w}, data, 4, 200);
    REQUIRE(s.deferred());
    std::thread([&] { parker.resume_all(); }).join();
    CHECK(hooker.ran.empty());  // not before the carrier is back
    size_t got = 0;
    CHECK(w.wait(s, &got).err == EIO);
    CHECK(hooker.ran == std::vector<std::string>{"hook:5:abcd"});
    CHECK(mem.data[200] == 0);
  }
  // Nothing below took it: the answer as it came.
  {
    hooker.ran.clear();
    parker.fail = 0;
    Offload::Waiter w(data);
    size_t got = 0;
    CHECK(w.wait(hooker.write(Io{false, nullptr}, data, 4, 300), &got).ok());
    CHECK(hooker.ran.empty());
    CHECK(std::string(mem.data.data() + 300, 4) == "abcd");
  }
}
