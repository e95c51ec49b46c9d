// Fault injection: a layer directly above the backing file that tests switch on per image.
//
// It exists only when the daemon runs with --fault-injection, and then does nothing until a
// test writes a plan to the image's `user.iofilter.fault` xattr. Like LevelDB's fault-injection
// Env it is a layer of its own, so no filter carries test-only branches. A plan is a list of
// clauses separated by ';':
//
//   fail=OPS:ERRNO[:COUNT[:SKIP]]  fail matching requests with ERRNO (EIO, ENOSPC, or a
//                                  number); COUNT times (default: until cleared), after letting
//                                  SKIP matching requests through
//   delay=OPS:DURATION             add latency (e.g. 20ms, 500us) to matching requests
//   track                          remember what each write overwrote until the next sync
//   powercut                       undo every write not yet synced (needs track), then fail
//                                  every request with EIO, as a disk after power loss would
//   clear                          back to pass-through
//
// OPS is `all` or a '+'-joined list of read, write, sync, fallocate, resize.
//
// Threads: any worker thread; the plan and the undo log are under mu_. When no plan is set
// the data path costs one relaxed atomic load.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "filter.h"

namespace iofilterfs {

enum FaultOp : unsigned {
  kFaultRead = 1, kFaultWrite = 2, kFaultSync = 4, kFaultFallocate = 8, kFaultResize = 16,
  kFaultAll = 31,
};

struct FaultPlan {
  struct Fail {
    unsigned ops = 0;
    int err = EIO;
    int64_t count = -1;  // -1: until cleared
    int64_t skip = 0;
  };
  struct Delay {
    unsigned ops = 0;
    uint64_t usec = 0;
  };
  std::vector<Fail> fails;
  std::vector<Delay> delays;
  bool track = false;
  bool powercut = false;
  bool clear = false;
};

// Parses a plan; returns an empty string on success, else what is wrong with it.
std::string parse_fault_plan(std::string_view text, FaultPlan* out);

class FaultLayer final : public Filter {
 public:
  // Applies a parsed plan (clauses add to the current plan; `clear` resets it first).
  Status apply(const FaultPlan& plan);
  std::string describe() const override;

  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override;
  Status sync(const Io& io, bool datasync) override;
  Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len) override;
  Status resize(const Io& io, uint64_t size) override;

 private:
  // Delays and failure decision for one request of kind `op`.
  Status before(unsigned op);
  Status record_undo(const Io& io, uint64_t off, uint64_t len);
  Status power_cut();

  struct Undo {
    uint64_t off;
    std::vector<char> old;  // the bytes that were there (only up to the old end of file)
    uint64_t old_size;      // file size before the write
  };

  std::atomic<bool> active_{false};
  mutable std::mutex mu_;
  FaultPlan plan_;           // under mu_
  std::vector<Undo> undo_;   // under mu_
  bool dead_ = false;        // under mu_: after a power cut
};

}  // namespace iofilterfs
