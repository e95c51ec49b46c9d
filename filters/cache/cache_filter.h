// The cache filter (class cache: below replicate, above throttle and encrypt). A thin adapter
// over block_map.h (which block is in which slot, S3-FIFO eviction), policy.h (sequential
// cutoff, watermarks, destage rate), store.h (RAM or a cache file) and params.h.
//
// The cache's unit is a block (`block:`, 64 KiB by default) and inside it a 4 KiB page: a slot
// holds one disk block, and each page of it is valid (holds the disk's bytes) and possibly
// dirty (holds bytes the layer below lacks). A 4 KiB request never moves more than 4 KiB.
//
// Requests, per block they touch, under the block's stripe lock (so two requests of one block
// take turns; requests of other blocks run in parallel):
//   read      all pages valid: served from the store (a hit). Otherwise read below; dirty
//             pages are laid over what came up, and the pages read whole are kept (a miss).
//             A stream past `sequential-cutoff` neither fills nor counts as a miss (a bypass).
//   write     write-through: below first, then the store (edge pages a write covers only in
//             part are dropped from the cache); write-around: below, then the pages are
//             dropped; write-back: the pages go to the store (an edge page not cached is read
//             from below first), then the slot's record; then the write completes. A block
//             that finds no slot (every slot dirty) goes below, as does a sequential stream.
//   sync      write-back on a device: fdatasync of the cache file (what was acknowledged is
//             then durable), and a sync below if anything went there since the last one.
//   fallocate/resize
//             every stripe of the range is held while the request passes down and the cache
//             follows (drop_range_locked): nothing dirty goes below, dirty pages the range
//             covers are dropped, a dirty page it covers in part gets zeros in the store. So a
//             discard of a throttled disk sends nothing through the throttle. An allocation
//             passes straight down; a collapse or insert (everything past it moves) drains first.
//   seek      SEEK_DATA/SEEK_HOLE: below's answer, with the dirty pages counted as data
//             (nothing is destaged for it).
//
// Destaging (write-back): a thread writes dirty pages below in batches once the dirty share
// reaches high-watermark and until it is down to low-watermark; then it syncs below, then
// writes the slots' clean records and syncs the cache file, and only then may those slots be
// evicted. A block's dirty pages are read out of the store under its stripe and written below
// without it (a throttle below may hold that write: the block's reads and cache writes go on;
// a write of the block meanwhile changes its gen, so it stays dirty; what would send the
// block's bytes below itself — evacuate, a discard, a truncate — waits for that write to land
// first, wait_destaged). drain() (flush, quiesce, snapshot, close, policy removal) destages
// everything the same way and returns when the layer below holds it.
//
// Encryption: when the policy also encrypts (DiskInfo::at_rest, from the encrypt filter
// below), the cache file's pages are sealed with the container's own data cipher at their disk
// offsets (the very ciphertext the backing file gets for them), so the cache device never
// holds plaintext; RAM is not a device and holds plaintext, as the guest's own memory does.
// The file's header keeps a check value of the key: dirty data sealed with another key (or
// plaintext, or sealed data under a policy that no longer encrypts) is never misread.
//
// Errors: a cache device that fails or fills up degrades the filter (degraded_reason() says
// `cache device ...`, the disk's state `degraded: cache device ...`): no block gets a new
// slot, clean cached pages are still served while the device reads them, and a write to a
// cached block goes below together with the block's dirty pages (evacuate), after which the
// block leaves the cache; the destager writes the remaining dirty data below. While the device
// still takes record updates (a full file system: the record table is allocated up front)
// that is all. Once it refuses one (a failing device), the file no longer says what it holds:
// failover() destages everything, sets the file aside (NAME.failed) so no later open replays
// it, and only then is the next write acknowledged; the filter is then pure pass-through until
// the disk reopens. Only dirty data that can no longer be read (or a file that cannot be set
// aside) is an error the guest sees.
//
// Threads and locks: requests on FUSE workers; one destager thread per write-back disk.
// Lock order: failover_mu_, then destage_mu_ (one destage pass at a time), then a stripe lock
// (one at a time, except failover() and reconfigure(), which take all of them, and a write of
// several blocks and its hook (MultiFlight), which take its blocks' stripes, each once: always
// in index order), then mu_ (slot map, masks, counters that are not atomic). mu_ is a reader-writer
// lock: a read hit holds it shared only (lookup, mask test, the S3-FIFO counter raised with a relaxed
// atomic, a pin), without a stripe lock, so hits never queue behind each other; everything
// that changes the map or a mask holds it exclusively. No I/O happens under mu_ except a hit's
// copy out of RAM and failover()'s renaming of the cache file. seq_mu_ (the sequential-cutoff
// table) is a leaf, taken alone; so are health_mu_, thr_mu_, p_mu_ and dst_mu_.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cache/block_map.h"
#include "cache/params.h"
#include "cache/policy.h"
#include "cache/store.h"
#include "filter.h"
#include "offload.h"
#include "rwlock.h"

namespace iofilterfs {

class CacheFilter : public Filter {
 public:
  explicit CacheFilter(cache::CacheParams p);
  ~CacheFilter() override;

  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override;
  Status sync(const Io& io, bool datasync) override;
  Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len) override;
  Status resize(const Io& io, uint64_t size) override;
  Status seek(const Io& io, uint64_t off, int whence, uint64_t* result) override;
  Status size(uint64_t* out) override;

  Status open(const DiskInfo& info) override;
  void close() override;
  Status drain() override;
  void shutdown() override;
  // In place: mode (write-back is left only after a full destage), high-/low-watermark,
  // sequential-cutoff, unsafe. A change of memory, device, size or block returns false (the
  // framework replaces the filter, draining the old one first), as does any change while the
  // cache runs without its device.
  bool reconfigure(const YAML::Node& params) override;

  // The requests it carries on its own threads (offload.h) go below at once and complete.
  void release_deferred() override { offload_.release(); }
  void defer_again() override { offload_.again(); }

  uint64_t dirty_bytes() const override;
  std::string stats_json() const override;
  std::string describe() const override;
  std::string degraded_reason() const override;

  // Runs one destage pass now (tests); returns the blocks it cleaned.
  size_t destage_once() { size_t n = 0; (void)destage_pass(SIZE_MAX, &n); return n; }
  cache::CacheParams params() const {
    std::lock_guard<std::mutex> g(p_mu_);
    return p_;
  }

 private:
  struct Meta {
    cache::PageMask valid, dirty;
    uint64_t gen = 0;  // bumped by every write into the slot
  };
  static constexpr int kStripes = cache::kStripes;
  static size_t stripe_index(uint64_t block) { return cache::stripe_of(block); }
  std::mutex& stripe(uint64_t block) { return stripes_[stripe_index(block)]; }
  // A one-block write sent below with the request's Deferrer (filter.h, "Deferring"), from
  // the moment it goes below until it has landed and the cache has finished with it. While it
  // is listed in its stripe (inflight_) its block is "write in flight": a read miss does not
  // fill the block (the bytes below may still be the old ones), a write-back write does not
  // cache it, and a write-through fill happens only when no other write of the block is in
  // flight. When the write below was deferred, then() runs when it lands (the framework's
  // completion hook): it takes the stripe, leaves the list and does what write_block or the
  // write-back bypass would have done after next_->write returned, before the write is
  // acknowledged; so a held write keeps no worker thread and no stripe lock while it waits.
  struct InFlight;
  // A write of more than one block sent below as ONE request with the request's Deferrer
  // (write_multi): every block of it is listed in flight (an InFlight each, in its stripe)
  // from the moment it goes below until it has landed and the cache has finished every block;
  // its hook takes the write's stripes again (ascending) and does each block's bookkeeping.
  struct MultiFlight;
  // A read sent below with the request's Deferrer (read_deferred), a miss that fills or not,
  // of one block or several: each block of it that has a slot is pinned (so the slot stays
  // the block's) and remembers the slot's gen and whether a write of the block was in flight
  // below, and which of its pages were dirty; no stripe is held while it is below. When it has
  // come up (its completion hook, or at once when nothing below deferred it), read_done takes
  // its stripes again (ascending), lays those dirty pages over what came up from the slot, and
  // keeps the pages that came up whole — only if no write of the block was in flight when it
  // went below and none began since (gen), so what came up is still the disk's — then unpins.
  struct ReadPart;
  struct ReadFlight;
  // A read with a Deferrer (see ReadFlight): false (nothing done) when the cache holds all of
  // it (a hit), or when it is not page-aligned and a block of it has a slot (a fill keeps, and
  // the dirty overlay lays, whole pages only: then *carry, for the caller carries it on this
  // filter's threads, offload.h); the caller then reads block by block. Else true, *s its
  // status. check_hit: look for a hit first (the caller has not).
  bool read_deferred(const Io& io, uint8_t* dst, size_t len, uint64_t off, bool bypass, bool check_hit, size_t* got,
                     Status* s, bool* carry);
  // [off, end) block by block on this thread (read_block each), io without a Deferrer.
  Status read_blocks(const Io& plain, uint8_t* dst, uint64_t off, uint64_t end, bool bypass, size_t* got);
  // A write after its sequential-cutoff check: below whole with the Deferrer (write_multi),
  // carried on this filter's threads, or block by block here (write_one each; carried: on
  // this filter's thread, each block with an Offload::Waiter).
  Status write_blocks(const Io& io, const uint8_t* src, size_t len, uint64_t off, bool bypass, bool carried = false);
  // A request carried on this filter's threads (offload.h): read_blocks or write_blocks there,
  // with the bypass read() or write() decided (kBypassTag).
  Status carried(bool is_write, const Io& plain, void* data, size_t len, uint64_t off, uint32_t tag, size_t* got);
  static constexpr uint32_t kBypassTag = 1;
  // Write-back: a write of [o, o+n) of block b would go below on its thread (an edge page's
  // rest read from below, or the block sent below with its dirty pages by evacuate(), or,
  // when it is not the whole request (whole), the block sent straight below without a slot;
  // as the whole request that one takes the Deferrer instead). Stripe of b and mu_ (shared)
  // held.
  bool wb_touches_below_locked(uint64_t b, uint32_t o, uint32_t n, bool bypass, bool whole) const;
  // A ReadFlight's end: write-back zeros past below's end, dirty pages laid over, pages kept,
  // slots unpinned.
  Status read_done(ReadFlight* rf, Status s, uint8_t* data, size_t* got);
  // Puts the pages of fill (within [pa, pe)) from bytes (page pa's) into slot, then marks them
  // valid and writes the record; a failure degrades (or fails the records) and leaves them
  // invalid (stripe of b held, slot pinned).
  void keep_pages(uint64_t b, uint32_t slot, cache::PageMask fill, uint32_t pa, uint32_t pe, const uint8_t* bytes);
  // A write of more than one block with a Deferrer (see MultiFlight): takes the stripes of
  // its blocks in ascending order, prepares every block as write_block or the write-back
  // bypass would, and sends the write below as one request. Returns false (and does nothing)
  // when the write cannot go below whole — write-back, where a block of it is cached or may
  // be (the caller then writes block by block) — else true with *s its status.
  // *carry: it cannot, and a block of it would go below on the caller's thread (see
  // wb_touches_below_locked).
  bool write_multi(const Io& io, const uint8_t* src, size_t len, uint64_t off, bool bypass, Status* s, bool* carry);
  // write_block's part before the write goes below (stripe held): slot, pages dropped, the
  // record; into fl's fields (block, o, n, slot, cache_it, st, record_failed, gen).
  void through_begin(InFlight* fl, bool bypass, cache::Mode mode);
  // Takes the stripes of mask (cache::stripe_mask) in ascending order.
  void lock_stripes(uint64_t mask, std::array<std::unique_lock<std::mutex>, cache::kStripes>* held);
  static void unlock_stripes(std::array<std::unique_lock<std::mutex>, cache::kStripes>* held);
  // A MultiFlight's blocks leave the lists, then each is finished as write_block_done would
  // (their stripes held); returns s.
  Status multi_done(MultiFlight* mf, Status s, const uint8_t* data);
  // Sends a one-block write below [base+o, +n) with io (which may carry a Deferrer; stripe
  // held), listed as in flight when it carries one. Deferred: *fl was registered as the
  // request's hook and runs later; else *fl is null and the caller goes on.
  Status write_down(const Io& io, InFlight* fl, const uint8_t* src, uint32_t n, uint64_t at);
  // A write of block b is in flight below (stripe held).
  bool in_flight(uint64_t b) const;
  void unlist(InFlight* fl);  // stripe held
  // write_block's work after the write came back from below with s (stripe held).
  Status write_block_done(Status s, uint64_t b, uint32_t o, uint32_t n, const uint8_t* src, uint32_t slot,
                          bool cache_it, Status st, bool record_failed, uint64_t gen);
  uint32_t pages() const { return p_.block / cache::kPage; }
  bool write_back() const { return mode_.load(std::memory_order_acquire) == cache::Mode::WriteBack; }

  // A hit of [o, o+n) of block b, served without a stripe lock; false when it is not one.
  bool try_hit(uint64_t b, uint32_t o, uint32_t n, uint8_t* dst, size_t* got);
  Status read_block(const Io& io, uint64_t b, uint32_t o, uint32_t n, uint8_t* dst, bool bypass, size_t* got);
  // One block's part of a write: takes the block's stripe, then by the mode. With carry (io
  // has a Deferrer): a write-back write that would go below on this thread does nothing,
  // sets *carry and returns Ok (the caller carries it on this filter's threads).
  Status write_one(const Io& io, uint64_t b, uint32_t o, uint32_t n, const uint8_t* src, bool bypass,
                   bool* carry = nullptr);
  Status write_block(const Io& io, uint64_t b, uint32_t o, uint32_t n, const uint8_t* src, bool bypass,
                     cache::Mode mode);
  Status write_back_block(const Io& io, uint64_t b, uint32_t o, uint32_t n, const uint8_t* src, bool bypass);
  // A slot for block b (mu_ held); kNoSlot when none is free or evictable.
  uint32_t alloc_locked(uint64_t b);
  cache::Record record_locked(uint32_t slot);
  // Writes slot's record (stripe of its block held, mu_ not).
  Status persist(uint32_t slot);
  // Writes whole cache pages below at `at`, cut at end (the disk's end: the bytes of a page
  // past it are not the disk's, and below must not grow past it).
  Status pages_below(const Io& io, const uint8_t* data, size_t len, uint64_t at, uint64_t end);
  // The disk's end as size() says (UINT64_MAX when below cannot say).
  uint64_t disk_end();
  // Reads [off, off+len) from below into buf, zero-filling past the end; *got what came up.
  Status read_below(const Io& io, uint8_t* buf, size_t len, uint64_t off, size_t* got);
  // A write-back write to a cached block that the device cannot take (it failed, or the cache
  // is degraded): the block's other dirty pages, then the write [o, o+n), go below and are
  // synced, then the block leaves the cache (stripe held; slot pinned, unpinned here). Fails
  // only when below fails or a dirty page cannot be read.
  Status evacuate(const Io& io, uint64_t b, uint32_t slot, uint32_t o, uint32_t n, const uint8_t* src);
  // After below punched, zeroed or cut [off, end), with every stripe of the range held: the
  // cache follows without sending anything below. A page the range covers whole is forgotten,
  // dirty or not (below holds what it would now hold); a dirty page it covers in part gets zeros
  // over the part in the store and stays dirty; a clean one is forgotten. Every slot of the range
  // gets a new gen (no fill of older bytes lands). Forgotten dirty pages: below is synced before
  // their records say so; then the records, then the store is synced. all_dirty: every dirty
  // slot's record is rewritten too (a shrink: records carry the disk's size). An error leaves
  // the records naming what was dirty.
  Status drop_range_locked(uint64_t off, uint64_t end, bool all_dirty);
  // The dirty pages as byte ranges [first, second), sorted and merged (seek()).
  std::vector<std::pair<uint64_t, uint64_t>> dirty_runs() const;
  // size_ = max(size_, at_least).
  void grow_size(uint64_t at_least);
  // One pass of the destager (or a drain): up to max_blocks dirty blocks, each read out of
  // the store under its stripe and written below without it (begin_destage .. end_destage),
  // then below is synced and the blocks not written meanwhile (gen) are marked clean.
  Status destage_pass(size_t max_blocks, size_t* cleaned);
  // The block whose dirty pages are on their way below without its stripe (one at a time:
  // destage_mu_ is held). Set under the block's stripe.
  void begin_destage(uint64_t block);
  void end_destage();
  // Waits until no block in [first, last] is on its way below from a destage: the caller (its
  // stripe held) is about to send that block's bytes below, which must land after the older ones.
  void wait_destaged(uint64_t first, uint64_t last);
  // Destage passes until nothing is dirty.
  Status drain_dirty();
  // The device failed a record write or a sync: the file no longer says what it holds.
  // Degrades, and has the destager (or the next write, sync or drain) run failover().
  void records_failed(const std::string& why);
  // After records_failed: destages everything (no record updates), then, with every stripe
  // and mu_ held and nothing dirty, sets the cache file aside (Store::retire) and turns the
  // filter into pure pass-through until the disk reopens. Fails (and is retried by the next
  // write) when dirty data cannot be read or the file cannot be set aside.
  Status failover();
  void destager();
  // Wakes the destager: all, to destage everything (replayed dirty data, a degraded device);
  // else to look at the watermarks now (between them, it runs down to the low mark).
  void kick(bool all = true);
  void degrade(const std::string& why);
  void start_destager();
  void stop_destager();

  // p_: block, memory, device and size never change (the data path reads them freely); the
  // rest changes in reconfigure() under p_mu_, and the data path reads their copies mode_,
  // cutoff_ (atomics), seq_ and marks_ instead.
  mutable std::mutex p_mu_;
  cache::CacheParams p_;
  std::atomic<cache::Mode> mode_;
  std::atomic<uint64_t> cutoff_;
  DiskInfo info_;
  std::unique_ptr<cache::Store> store_;  // null: pass-through (degraded at open)
  std::string store_path_;

  mutable RwLock mu_;
  std::unique_ptr<cache::BlockMap> map_;  // under mu_ (see block_map.h for what a shared hold allows)
  std::vector<Meta> meta_;                // under mu_; read under a shared hold
  std::mutex seq_mu_;
  cache::SequentialCutoff seq_;           // under seq_mu_
  cache::Watermarks marks_;               // under mu_
  cache::RateMeter rate_;                 // under mu_
  size_t cursor_ = 0;                     // destage scan position, under mu_
  std::array<std::mutex, kStripes> stripes_;
  std::array<InFlight*, kStripes> inflight_{};  // each under its stripe: its writes in flight below

  std::atomic<uint64_t> record_seq_{0};
  std::atomic<uint64_t> size_{0};  // write-back: the disk's size including dirty data past below's end
  std::atomic<bool> below_unsynced_{false};
  std::atomic<bool> degraded_{false};
  std::atomic<bool> records_broken_{false};  // see records_failed()
  std::atomic<bool> passthrough_{false};     // set by failover(), with every stripe and mu_ held
  std::mutex failover_mu_;                   // one failover at a time; before destage_mu_
  mutable std::mutex health_mu_;
  std::string health_;  // under health_mu_

  std::atomic<uint64_t> hits_{0}, misses_{0}, bypasses_{0}, evictions_{0}, invalidations_{0};
  std::atomic<uint64_t> valid_pages_{0}, dirty_pages_{0}, destaged_bytes_{0}, replayed_{0};

  std::mutex destage_mu_;
  std::mutex dst_mu_;  // a leaf
  std::condition_variable dst_cv_;
  uint64_t destaging_ = UINT64_MAX;  // under dst_mu_: begin_destage's block, or none
  std::mutex thr_mu_;
  std::condition_variable thr_cv_;
  bool stop_ = false;    // under thr_mu_
  bool kicked_ = false;  // under thr_mu_: kick(true)
  bool woken_ = false;   // under thr_mu_: kick(false)
  std::thread thr_;

  // Requests that would wait below on their thread, carried on threads of this filter's own
  // (see carried()). Last, so its threads are gone before anything they use.
  Offload offload_{[this](bool w, const Io& io, void* data, size_t len, uint64_t off, uint32_t tag, size_t* got) {
    return carried(w, io, data, len, off, tag, got);
  }};
};

void register_cache(Registry& r);

}  // namespace iofilterfs
