// qcow2: the guest-visible disk of a qcow2 image, as a Layer the filter chain sits on.
//
// The format (QEMU docs/interop/qcow2.txt) maps guest clusters through a two-level table: the
// L1 table (in the header's l1_table_offset) points to L2 tables, whose entries point to host
// clusters — allocated, compressed (deflate or zstd), zero, or unallocated (read from the
// backing file, or zeros). Extended L2 entries split each cluster into 32 subclusters with an
// allocation and a zero bit each. Every host cluster has a reference count (refcount table →
// refcount blocks); a cluster shared with an internal snapshot has a count above one and is
// copied before it is written.
//
// Crash safety without a journal. Metadata lives in memory and reaches the file only in
// flush() (called by sync(), by close, and when too much is dirty), in an order that leaves
// the image consistent if the process dies between any two writes:
//
//   1. data clusters (written when the guest wrote) and refcount blocks with every new
//      reference counted  → fdatasync → refcount table (→ fdatasync → header, if it moved)
//   2. L2 tables → fdatasync
//   3. L1 table (→ fdatasync → header size/L1 fields, one sector) → fdatasync
//   4. the references dropped (clusters copied away from, discarded, old tables) are
//      subtracted → fdatasync, and clusters that reach zero are punched out of the file.
//
// Counts go up before anything points at a cluster and go down only after nothing does, so a
// crash leaves at worst leaked clusters, never a cluster in use with too low a count.
//
// Reuse of freed clusters. A cluster whose count reached zero in step 4 is free: nothing on
// disk points at it (step 3 was durable first) and its zero count is durable (step 4's
// fdatasync) before flush returns, so alloc() may hand it out again; it searches for a free
// cluster from a hint (the lowest cluster that may be free) before growing the file. The hint
// starts at the end of the file as opened, so the first write after an open does not walk the
// refcounts of the whole image; the clusters that were free at open are found by a second
// cursor that looks at one refcount block's range per allocation (old_scan_ .. old_end_). One more
// hazard: a read or in-place write maps a cluster under mu_ and does its I/O after dropping
// it, so a cluster unlinked meanwhile could be reused while that I/O is still in flight. Every
// such I/O holds a pin on the current epoch (two counters, one per epoch parity); a dropped
// reference carries the epoch it was dropped in and is only subtracted once two epoch flips
// have passed, each allowed only when the older counter has drained. In a quiet moment both
// flips happen in the same flush.
//
// Dirty images (lazy refcounts, set by QEMU; an image QEMU was killed on). The L1/L2 and
// snapshot tables are right, the refcounts may not be. Reads need no counts, so the image opens
// writable and is repaired before its first change (when the daemon holds the image's exclusive
// lock): every count is recomputed from the header, the active and snapshot L1/L2 tables and
// the snapshot table, COPIED flags are set from them, a complete new refcount table and blocks
// are written past the end of the file, fdatasync, then one header write points at them and
// clears the dirty bit. Until that write the image stays dirty, so a crash during repair only
// means repairing again.
//
// Untrusted input. Every size and offset from the file is checked before it is used to
// allocate or to read (tables must lie inside the file, outside the header and each other);
// an L2 or refcount entry that points somewhere impossible marks the image corrupt: reads of
// that region fail with EIO, writes stop, and nothing is written outside the image file.
//
// Threads: read/write/... are called concurrently. mu_ (a shared_mutex) guards all metadata
// (tables, caches, sizes). Reads and in-place writes of private clusters whose L2 table is
// cached map under a shared lock (nothing changes but atomic LRU stamps and pins), the rest
// under an exclusive one; data I/O to allocated clusters happens after mu_ is dropped (pinned,
// see above); writes that allocate hold it throughout. The backing chain is read-only and has
// its own locks. Lock order: this image's mu_, then its backing's.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "filter.h"

namespace iofilterfs::format {

struct Qcow2Options {
  bool read_only = false;
  // The image's path: a relative backing file name is resolved against its directory (as QEMU
  // does). Empty: the image may not have a relative backing file.
  std::string path;
  // When set, every backing file must resolve (symlinks followed) to a path under this
  // directory; the daemon passes the datastore's backing root so an image cannot make it
  // read arbitrary files.
  std::string backing_root;
  int max_chain_depth = 16;
  // The real paths of the images above this one in the chain (loop detection).
  std::vector<std::string> chain;
};

// Facts from the header, for status and tests.
struct Qcow2Info {
  uint32_t version = 0;
  uint32_t cluster_bits = 0;
  uint64_t virtual_size = 0;
  bool extended_l2 = false;
  uint32_t refcount_bits = 0;
  uint32_t snapshots = 0;
  std::string backing_file;     // as written in the header
  std::string backing_format;   // from the header extension, if any
  std::string read_only_reason; // non-empty: the image opened read-only, and why
};

class Qcow2 final : public Layer {
 public:
  // Opens the image in `file` (not owned; it outlives the Qcow2). Read-only when the options
  // say so or the image has a feature this code cannot write (the reason is in info()).
  static Status open(Layer* file, const Qcow2Options& opt, std::unique_ptr<Qcow2>* out, std::string* err);
  // As open, and the Qcow2 owns the file.
  static Status open_owned(std::unique_ptr<Layer> file, const Qcow2Options& opt, std::unique_ptr<Qcow2>* out,
                           std::string* err);
  ~Qcow2() override;

  const Qcow2Info& info() const { return info_; }
  bool read_only() const { return read_only_; }
  bool corrupt() const { return corrupt_.load(); }

  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override;
  // Makes data, then metadata, durable (the flush order above).
  Status sync(const Io& io, bool datasync) override;
  // PUNCH_HOLE and ZERO_RANGE make whole clusters zero clusters (v3) or unallocated (v2, no
  // backing file) and write zeros into partial ones; plain allocation is accepted as a no-op.
  Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len) override;
  // Grows the virtual disk (the L1 table grows when needed). Shrinking is refused.
  Status resize(const Io& io, uint64_t size) override;
  // SEEK_DATA / SEEK_HOLE from the cluster map (unallocated ranges over a backing file count
  // as data).
  Status seek(const Io& io, uint64_t off, int whence, uint64_t* result) override;
  Status size(uint64_t* out) override;

  // Writes all dirty metadata in the safe order (what sync does, without the data barrier
  // being asked for).
  Status flush();

 private:
  // An LRU stamp that a reader under the shared lock may refresh.
  struct Stamp {
    mutable std::atomic<uint64_t> v{0};
    Stamp() = default;
    Stamp(const Stamp& o) : v(o.v.load(std::memory_order_relaxed)) {}
    Stamp& operator=(const Stamp& o) {
      v.store(o.v.load(std::memory_order_relaxed), std::memory_order_relaxed);
      return *this;
    }
    Stamp& operator=(uint64_t x) {
      v.store(x, std::memory_order_relaxed);
      return *this;
    }
    void touch(uint64_t x) const { v.store(x, std::memory_order_relaxed); }
    operator uint64_t() const { return v.load(std::memory_order_relaxed); }
  };
  struct Table {
    std::vector<uint8_t> data;  // the on-disk bytes (big-endian entries)
    bool dirty = false;
    Stamp used;  // LRU stamp
  };
  // One guest cluster's L2 entry, decoded.
  struct Entry {
    uint64_t raw = 0;     // the standard descriptor
    uint64_t bitmap = 0;  // extended L2: alloc bits 0-31, zero bits 32-63
    bool compressed() const { return raw >> 62 & 1; }
  };

  Qcow2() = default;
  Status parse(std::string* err);
  Status open_backing(const std::string& name, const std::string& fmt, std::string* err);

  // Metadata (mu_ held).
  Status check_table_offset(uint64_t off, const char* what);
  Status load_l2(uint64_t off, Table** t);
  Status load_rb(uint64_t off, Table** t);
  Status load_table(std::unordered_map<uint64_t, Table>& cache, const std::unordered_map<uint64_t, Table>& other,
                    uint64_t off, const char* bad_offset, const char* overlap, Table** t);
  Status get_entry(uint64_t cluster, Entry* e);  // cluster = guest cluster index
  // As get_entry, but only from a cached table and without changing the cache, so a shared
  // lock is enough. false: the L2 table is not cached (take mu_ exclusively and get_entry).
  bool peek_entry(uint64_t cluster, Entry* e) const;
  // The plain allocated, private (COPIED) clusters from guest offset pos on that lie contiguous
  // in the file: their host offset for pos and how many of `want` bytes they cover (0: pos is
  // not such a cluster, or its table is not cached). Shared lock enough.
  uint64_t in_place_run(uint64_t pos, uint64_t want, bool for_write, uint64_t* host) const;
  // The L2 table for guest cluster `cluster`, made private (refcount 1) and allocated if
  // needed; *idx is the entry's index in it.
  Status writable_l2(uint64_t cluster, Table** t, uint32_t* idx);
  void set_entry(Table* t, uint32_t idx, const Entry& e);
  Entry entry_at(const Table* t, uint32_t idx) const;
  Status refcount(uint64_t host_cluster, uint64_t* rc);
  Status refcount_add(uint64_t host_cluster, int64_t delta);
  Status ensure_refblock(uint64_t host_cluster);
  Status grow_reftable(uint64_t min_entries);
  // n contiguous clusters: a free one reused when n == 1, else at the end of the file.
  // *zeroed: the clusters read as zeros (fresh file space, never written).
  Status alloc(uint64_t n, uint64_t* off, bool* zeroed = nullptr);
  Status find_free(uint64_t* cluster);  // a reusable cluster below file_end_, or none (0)
  // The first free cluster in [from, to), or 0; *stop is where the search ended.
  Status scan_free(uint64_t from, uint64_t to, uint64_t* cluster, uint64_t* stop);
  void drop_ref(uint64_t off, uint64_t len);  // pending decrement of the clusters in [off, off+len)
  void drop_entry_refs(const Entry& e);
  bool overlaps_metadata(uint64_t off, uint64_t len) const;
  Status flush_locked();
  Status write_tables(std::unordered_map<uint64_t, Table>& cache);
  void trim_caches();
  Status mark_corrupt(const char* what);
  Status first_write();  // clears autoclear bits, repairs a dirty image (once)
  Status repair_locked(std::string* why);
  // Pins the current epoch for I/O done after mu_ is dropped (mu_ held to take it).
  class Pin {
   public:
    Pin() = default;
    explicit Pin(std::atomic<uint32_t>* c) : c_(c) { c_->fetch_add(1, std::memory_order_relaxed); }
    Pin(Pin&& o) noexcept : c_(o.c_) { o.c_ = nullptr; }
    Pin& operator=(Pin&& o) noexcept {
      release();
      c_ = o.c_;
      o.c_ = nullptr;
      return *this;
    }
    ~Pin() { release(); }
    void release() {
      if (c_) c_->fetch_sub(1, std::memory_order_release);
      c_ = nullptr;
    }

   private:
    std::atomic<uint32_t>* c_ = nullptr;
  };
  Pin pin_locked() { return Pin(&inflight_[epoch_ & 1]); }
  void advance_epoch();  // mu_ held

  // Data (no lock needed: entries are values).
  Status read_cluster(uint64_t cluster, const Entry& e, char* buf, uint32_t in_off, uint32_t len);
  Status read_backing(char* buf, size_t len, uint64_t off);
  Status read_compressed(const Entry& e, char* out);
  Status write_cluster(uint64_t cluster, const char* buf, uint32_t in_off, uint32_t len, const Io& io);
  Status zero_cluster(uint64_t cluster, bool punch);

  Layer* file_ = nullptr;
  std::unique_ptr<Layer> owned_file_;
  std::unique_ptr<Layer> backing_;
  uint64_t backing_size_ = 0;
  Qcow2Options opt_;
  Qcow2Info info_;
  std::atomic<bool> read_only_{false};
  std::atomic<bool> corrupt_{false};
  // Work before the first change: clear autoclear bits we do not maintain, repair a dirty image.
  std::atomic<bool> first_write_pending_{false};
  bool autoclear_set_ = false;   // under mu_
  bool repair_pending_ = false;  // under mu_
  uint64_t incompat_ = 0;        // the header's incompatible features as opened
  uint32_t nb_snap_ = 0;
  std::atomic<uint32_t> inflight_[2] = {};  // pins per epoch parity

  // Geometry (immutable after open).
  uint32_t version_ = 0;
  uint32_t cluster_bits_ = 0;
  uint64_t cs_ = 0;          // cluster size
  uint32_t l2_bits_ = 0;     // log2 of entries per L2 table
  uint32_t entry_bytes_ = 8; // 16 with extended L2
  bool ext_l2_ = false;
  uint32_t sc_size_ = 0;     // subcluster size (extended L2)
  uint32_t rc_order_ = 4;
  uint32_t rb_bits_ = 0;     // log2 of entries per refcount block
  uint8_t compression_ = 0;  // 0 deflate, 1 zstd
  uint32_t csize_shift_ = 0;
  uint64_t csize_mask_ = 0;
  uint64_t coffset_mask_ = 0;

  // Exclusive for any change; shared for the I/O fast paths (in_place_run), which change nothing
  // but Table::used stamps (atomic) and the pin counters (atomic).
  mutable std::shared_mutex mu_;
  // Everything below is under mu_.
  uint64_t size_ = 0;
  std::vector<uint64_t> l1_;  // host order, raw entries
  uint64_t l1_off_ = 0;
  uint32_t l1_clusters_ = 0;  // clusters reserved for the L1 table
  bool l1_dirty_ = false;
  bool header_dirty_ = false;  // size / L1 location changed
  std::vector<uint64_t> rt_;   // refcount table, host order
  uint64_t rt_off_ = 0;
  uint32_t rt_clusters_ = 0;
  bool rt_dirty_ = false;
  bool rt_moved_ = false;
  uint64_t file_end_ = 0;  // where the next cluster is allocated
  uint64_t snap_off_ = 0, snap_len_ = 0;
  std::unordered_map<uint64_t, Table> l2_cache_;
  std::unordered_map<uint64_t, Table> rb_cache_;
  uint64_t lru_ = 0;
  uint64_t trim_tick_ = 0;
  // Host cluster indices to decrement after L2/L1 are durable, with the epoch of the drop.
  std::vector<std::pair<uint64_t, uint64_t>> pending_drop_;
  uint64_t epoch_ = 0;
  uint64_t free_hint_ = 0;  // no cluster below it is free, except in [old_scan_, old_end_)
  uint64_t old_scan_ = 1;   // clusters of the file as opened not looked at yet: [old_scan_, old_end_)
  uint64_t old_end_ = 0;
};

}  // namespace iofilterfs::format
