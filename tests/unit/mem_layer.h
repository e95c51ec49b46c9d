// A Layer over memory, for unit tests: the bottom of a chain without any file.
#pragma once

#include <fcntl.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "filter.h"

namespace testing {

class MemLayer : public iofilterfs::Layer {
 public:
  using Status = iofilterfs::Status;
  using Io = iofilterfs::Io;
  std::vector<char> data;
  std::vector<std::string>* log = nullptr;  // optional: appends "bottom:OP"
  std::mutex mu;
  int syncs = 0;
  int fallocate_err = 0;  // set: fallocate fails with it and changes nothing

  void note(const char* op) {
    if (log) log->push_back(std::string("bottom:") + op);
  }
  Status read(const Io&, void* buf, size_t len, uint64_t off, size_t* got) override {
    std::lock_guard<std::mutex> g(mu);
    note("read");
    size_t n = off >= data.size() ? 0 : std::min<size_t>(len, data.size() - off);
    if (n) std::memcpy(buf, data.data() + off, n);
    *got = n;
    return Status::Ok();
  }
  Status write(const Io&, const void* buf, size_t len, uint64_t off) override {
    std::lock_guard<std::mutex> g(mu);
    note("write");
    if (off + len > data.size()) data.resize(off + len);
    std::memcpy(data.data() + off, buf, len);
    return Status::Ok();
  }
  Status sync(const Io&, bool) override {
    std::lock_guard<std::mutex> g(mu);
    note("sync");
    ++syncs;
    return Status::Ok();
  }
  Status fallocate(const Io&, int mode, uint64_t off, uint64_t len) override {
    std::lock_guard<std::mutex> g(mu);
    note("fallocate");
    if (fallocate_err) return Status::Error(fallocate_err, "mem: fallocate refused");
    if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
      uint64_t end = std::min<uint64_t>(off + len, data.size());
      if (off < end) std::memset(data.data() + off, 0, end - off);
    }
    return Status::Ok();
  }
  Status resize(const Io&, uint64_t size) override {
    std::lock_guard<std::mutex> g(mu);
    note("resize");
    data.resize(size);
    return Status::Ok();
  }
  bool holes = false;  // set: seek reports every all-zero 4 KiB page as a hole (else all is data)
  Status seek(const Io&, uint64_t off, int whence, uint64_t* result) override {
    std::lock_guard<std::mutex> g(mu);
    if (!holes) {
      *result = off;
      return Status::Ok();
    }
    if (off >= data.size()) return Status::Error(ENXIO, "mem: seek past the end");
    auto zero_page = [&](uint64_t p) {
      const uint64_t a = p * 4096, e = std::min<uint64_t>(a + 4096, data.size());
      return std::all_of(data.begin() + a, data.begin() + e, [](char c) { return c == 0; });
    };
    const uint64_t pages = (data.size() + 4095) / 4096;
    for (uint64_t p = off / 4096; p < pages; ++p)
      if (zero_page(p) == (whence == SEEK_HOLE)) {
        *result = std::max(off, p * 4096);
        return Status::Ok();
      }
    if (whence == SEEK_DATA) return Status::Error(ENXIO, "mem: no data past the offset");
    *result = data.size();
    return Status::Ok();
  }
  Status size(uint64_t* out) override {
    std::lock_guard<std::mutex> g(mu);
    *out = data.size();
    return Status::Ok();
  }
};

// A memory layer whose writes starting with 'B' stop at a gate until it opens: a test holds a
// write below (wait_at_gate), checks what goes on meanwhile, then open()s it.
struct GateLayer : MemLayer {
  std::mutex gm;
  std::condition_variable gcv;
  bool at_gate = false, open_gate = false;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    if (len && static_cast<const char*>(buf)[0] == 'B') {
      std::unique_lock<std::mutex> l(gm);
      at_gate = true;
      gcv.notify_all();
      gcv.wait(l, [&] { return open_gate; });
    }
    return MemLayer::write(io, buf, len, off);
  }
  void wait_at_gate() {
    std::unique_lock<std::mutex> l(gm);
    gcv.wait(l, [&] { return at_gate; });
  }
  void open() {
    std::lock_guard<std::mutex> l(gm);
    open_gate = true;
    gcv.notify_all();
  }
};

// A caller's Deferrer that never takes a request: a filter under test sees one offered (and
// takes its deferral paths) while the layer below answers at once.
struct NoDeferrer final : iofilterfs::Deferrer {
  iofilterfs::Deferred* take() override { return nullptr; }
  void then(iofilterfs::Then*) override {}
};

// A caller's Deferrer that takes the request it is offered, as the disk does (a write's bytes
// copied, a read given a buffer of its own), for a filter that holds it (the throttle) or
// carries it on threads of its own (offload.h): resume() runs the continuation on the calling
// thread and keeps the answer; answered() waits for it. Not for a filter that registers hooks
// (then() is unused here).
struct Carried final : iofilterfs::Deferrer, iofilterfs::Deferred {
  explicit Carried(size_t len = 16, const void* src = nullptr) : buf(len) {
    if (src) std::memcpy(buf.data(), src, len);
  }
  iofilterfs::Deferred* take() override {
    taken = true;
    return this;
  }
  void then(iofilterfs::Then*) override {}
  void* data() override { return buf.data(); }
  void resume(iofilterfs::Continuation& k) override {
    size_t g = 0;
    const iofilterfs::Status s = k.run(buf.data(), &g);
    finish(s, g);
  }
  void finish(iofilterfs::Status s, size_t g) override {
    std::lock_guard<std::mutex> l(mu);
    answer = s;
    got = g;
    done = true;
    thread = std::this_thread::get_id();
    cv.notify_all();
  }
  // Waits for the answer (at most `ms`); true when it came.
  bool answered(int ms) {
    std::unique_lock<std::mutex> l(mu);
    return cv.wait_for(l, std::chrono::milliseconds(ms), [&] { return done; });
  }
  bool wait() { return answered(10000); }
  std::vector<char> buf;
  bool taken = false;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  iofilterfs::Status answer;
  size_t got = 0;
  std::thread::id thread;
};

}  // namespace testing
