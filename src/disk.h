// Disk: one open disk image — its backing file, its filter chain, its counters.
//
// There is one Disk per backing file (keyed by device and inode), shared by every open of the
// image through the mount, created by the first open and closed with the last release. Every
// data operation on the image enters at Disk and runs down the chain:
//
//     Disk::write ─► chain.top() ─► ... ─► [FaultLayer] ─► Backing
//
// Threads: the data-path methods run concurrently on FUSE worker threads; each holds plumbing_
// shared while it is inside the chain (whose filters synchronise themselves) and updates
// atomic counters. Handle bookkeeping (attach/detach) is under the owning Inode's mutex.
// Control events (drain, close, re-plumb, fault plans) are under control_mu_; a re-plumb also
// takes plumbing_ exclusively to swap filters while no request is inside.
// A read or write that a filter defers (filter.h, "Deferring") leaves plumbing_ when its worker
// returns, and takes it again (shared, as a new request) on the thread that resumes it; until
// it completes it is counted in deferred_ (under def_mu_), which close() waits to empty.
// Lock order: Inode::m, then Disk::control_mu_, then Disk::plumbing_, then Disk::def_mu_.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backing.h"
#include "format/qcow2.h"
#include "format/vmdk.h"
#include "chain.h"
#include "fault.h"
#include "image.h"
#include "iostats.h"
#include "rwlock.h"

namespace iofilterfs {

struct DiskOptions {
  bool read_only = false;        // the mount is read-only
  bool fault_injection = false;  // insert a FaultLayer above the backing file
  std::string policy = "none";   // the policy's name, for status
  std::vector<FilterSpec> filters;
  const Registry* registry = nullptr;  // where filter names are found; null: the daemon's
  // The raw view: the image format is decoded under the chain (format/qcow2.h), so filters
  // and clients see the guest's disk. image_path and backing_root locate its backing files.
  bool raw_view = false;
  std::string image_path;    // absolute path of the image file
  std::string backing_root;  // backing files must lie under it
};

// The caller's end of a read or write that may be deferred: called once, on the thread that
// finishes the request, with its status and, for a read, the bytes read (data is valid during
// the call only); for a write len is the bytes written. Plain data, so offering it costs
// nothing when no filter defers.
struct Completion {
  void (*fn)(void* ctx, Status s, const void* data, size_t len) = nullptr;
  void* ctx = nullptr;
};

class Disk : public std::enable_shared_from_this<Disk> {
 public:
  // Opens the backing file named by `path_fd` (O_PATH), detects its format, builds and opens
  // the chain. On failure nothing stays open and *err has the reason.
  static Status open(int path_fd, const std::string& relpath, const DiskOptions& opt,
                     std::shared_ptr<Disk>* out, std::string* err);
  ~Disk();

  // Handle bookkeeping (caller holds the inode's mutex). attach takes the image lock —
  // exclusive for a writer — and opens the O_DIRECT descriptor for a direct handle.
  Status attach(bool writable, bool direct);
  // Returns true when this was the last handle.
  bool detach();

  // Data path. With `done`, a filter may defer a read or write: it then returns
  // Status::Deferred() at once, and `done` is called later, from another thread, with the
  // result (buf is not touched after the return; a read's bytes come in the call).
  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got, const Completion* done = nullptr);
  Status write(const Io& io, const void* buf, size_t len, uint64_t off, const Completion* done = nullptr);
  Status sync(const Io& io, bool datasync);
  Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len);
  Status resize(const Io& io, uint64_t size);
  Status seek(const Io& io, uint64_t off, int whence, uint64_t* result);
  Status size(uint64_t* out);

  // Control: every filter drains to the backing file, then the backing file is synced.
  Status flush();
  // Drains every filter, syncs, then holds new writes (and fallocate/truncate) until resume()
  // or until `timeout` passes, so a stuck tool cannot hang a guest. Reads go on.
  Status quiesce(std::chrono::seconds timeout);
  Status resume();
  // quiesce, a named restore point in every filter that keeps history, resume.
  Status snapshot(const std::string& name);
  bool quiesced() const;
  // Re-plumbs to another policy: filters whose parameters changed and that take new ones in
  // place (Filter::reconfigure) do so while requests keep flowing; if anything else changes,
  // in-flight requests drain, filters that leave are drained first, unchanged filters keep
  // their state. On error the old chain stays, with its old parameters.
  Status replumb(const std::string& policy, const std::vector<FilterSpec>& filters, const Registry& registry,
                 std::string* err);
  // Drains and closes the filters; the backing file closes with the Disk. Every deferred
  // request is released first and has completed when this returns.
  Status close();
  // Reads and writes deferred by a filter and not yet completed.
  uint64_t deferred() const;

  // Fault injection (only when opened with fault_injection).
  bool has_fault_layer() const { return fault_ != nullptr; }
  Status apply_fault_plan(const FaultPlan& plan);

  const std::string& relpath() const { return relpath_; }
  const ImageInfo& image() const { return image_; }
  bool raw_view() const { return format_ != nullptr; }
  std::string policy() const;
  std::string state() const;
  uint64_t dirty_bytes() const;
  uint64_t replica_lag_bytes() const;
  std::string chain_description() const;
  std::string stats_json() const;
  const IoStats& stats() const { return stats_; }

 private:
  Disk() = default;

  // Holds plumbing_ shared for one request.
  class Inside {
   public:
    explicit Inside(RwLock& l) : l_(l) { l_.lock_shared(); }
    ~Inside() { l_.unlock_shared(); }

   private:
    RwLock& l_;
  };
  // The same for a request that changes data: it first waits out a quiesce. The flag is
  // checked with the lock held, so a quiesce that has taken plumbing_ exclusively once has
  // seen every earlier writer leave and will hold every later one.
  class Modifying {
   public:
    explicit Modifying(Disk& d);
    ~Modifying() { d_.plumbing_.unlock_shared(); }

   private:
    Disk& d_;
  };
  class Offer;    // the Deferrer of one read or write (on its worker's stack)
  class Pending;  // a deferred read or write (owned by the framework, see filter.h)
  // Counts a finished read or write in stats_.
  void account(bool is_write, Status s, size_t bytes, uint64_t t0);
  void deferred_done();
  // Every filter resumes what it holds (release) or may hold again.
  void release_deferred();
  void defer_again();
  void wait_resume();
  Status quiesce_locked(std::chrono::seconds timeout);  // control_mu_ held
  Status resume_locked();                               // control_mu_ held

  std::string relpath_;
  std::string policy_;  // under control_mu_ (written by replumb)
  DiskInfo info_;
  ImageInfo image_;
  std::unique_ptr<Backing> backing_;
  std::unique_ptr<FaultLayer> fault_;
  // Raw view: the decoded image (one of the two), above fault_/backing_; format_ is it.
  std::unique_ptr<format::Qcow2> qcow2_;
  std::unique_ptr<format::Vmdk> vmdk_;
  Layer* format_ = nullptr;
  bool format_read_only_ = false;
  Chain chain_;
  Layer* bottom_ = nullptr;  // the layer under the chain: the fault layer or the backing file
  Layer* top_ = nullptr;     // under plumbing_
  bool offer_ = false;       // under plumbing_: the chain defers (Chain::defers), so requests offer a Deferrer
  IoStats stats_;
  RwLock plumbing_;

  int handles_ = 0;  // under the inode's mutex

  // Quiesce: the flag is read on the write path without q_mu_; changes are made under q_mu_.
  std::atomic<bool> quiesced_{false};
  mutable std::mutex q_mu_;
  std::condition_variable q_cv_;
  std::chrono::steady_clock::time_point q_deadline_;  // under q_mu_

  mutable std::mutex def_mu_;
  std::condition_variable def_cv_;
  uint64_t deferred_ = 0;  // under def_mu_

  mutable std::mutex control_mu_;
  bool closed_ = false;        // under control_mu_
  std::string failed_reason_;  // under control_mu_
};

}  // namespace iofilterfs
