// The replicate filter (class replicate, first in the chain, so it sees every guest write):
// keeps a replica of the image in a directory or on an NBD server, synchronously or
// asynchronously, and after any outage or crash resends only the regions that changed.
// A thin adapter over bitmap.h (the persistent dirty bitmap), journal.h (the async journal),
// target.h (directory and NBD targets) and params.h.
//
// The state of each region of the disk (region-size, 64 KiB by default) is two bits:
//
//   dirty    (persistent, bitmap.h)  the replica may differ here. Set and saved *before* a write
//            that will not be in the journal goes anywhere (sync mode: every write, DRBD's
//            activity log; async: writes tracked in the bitmap); cleared by the cleaner only
//            after the target has flushed the region.
//   pending  (memory)  the region must be copied from the local image to the target. Set from
//            the dirty bits at open (so a restart, even after kill -9, resends exactly those),
//            by every write the target did not take, and by the initial sync (every region).
//
// Besides them, per stripe of regions, an in-flight count and a generation that every write
// bumps. The background thread copies a pending region only while no write is in flight there,
// and sets it pending again if a write came by while it copied (the generation changed), so a
// copy can never leave older data on the replica than the last write. The cleaner clears a
// dirty bit and then re-checks (in flight? pending?), setting it back if so; writers mark
// pending before they leave the in-flight count, so a clear never loses a region.
//
// mode: sync  — local write, then the target (while the target is reachable). A failed target
//   write marks the region pending; with on-target-error: fail the guest gets EIO, with degrade
//   (default) it does not, the disk reports `degraded: replica unreachable` and the background
//   thread reconnects (backoff 100ms doubling to reconnect-max), resyncs the pending regions,
//   and writes go to both again. A guest flush flushes the target.
// mode: async — each write is first appended to the journal (one pwritev; durable on the guest's
//   fsync), then written locally; the background thread ships the records in order, so the
//   replica is always a crash-consistent past state. Without retention or sealing the journal
//   is by reference (journal.h, refmap.h): a write's record holds only its offset and length,
//   the shipper reads the bytes from the image once the write has landed there, and a change
//   over bytes an unshipped record still references first copies them into the journal
//   (copy-before-write, under the change's range lock) for that record. Beyond max-lag of unshipped data the
//   journal collapses into the dirty bitmap (on-overflow: bitmap) or writes wait
//   (backpressure, while the target is reachable); a collapsed journal resyncs, then journaling
//   resumes.
//
// Encryption (a policy that also encrypts: DiskInfo::at_rest is set): replicate sits above
// encrypt and sees plaintext, so it seals everything it keeps or sends with the container's own
// cipher (filter.h, AtRest). The replica is the same LUKS container as the backing file: at every
// connection the container's header is copied to the start of the target, and payload byte x
// goes to header_bytes + x, as the ciphertext the backing file holds there. Sealing works on
// whole 512-byte sectors: a request that starts or ends inside a sector reads that edge sector's
// plaintext through the layers below, patches it and seals the covering sectors (the journal
// record and the target write are those whole sectors); while it does, it holds that sector's
// stripe of edge_mu_, so two unaligned requests that share a sector are ordered the same way in
// the image and in the journal or on the target. A resync reads plaintext through the chain
// and seals it again (XTS is deterministic: the same bytes as the backing file's), except that
// a region the backing file has no data in (SEEK_DATA) goes as a hole, as it is there, and the
// holes inside a region with data (SEEK_HOLE) go as zero bytes, as they are there. Zero
// ranges go as sealed zeros (what the encrypt filter writes), punched ranges as holes.
// With retention the history is the container's bytes too (history.h): a base that is the
// container (header and sealed payload), records of ciphertext, and a zero-range kept as the
// ciphertext of zeros (a restore has no key to seal them).
//
// Retention (history.h). Async: the journal is the history. Sync: hist_, a journal of the same
// format that nothing ships; the write path appends each change to it (one pwritev, no fsync:
// a guest flush syncs it, as async's journal) after taking its range and before the local write,
// so the history never lacks a change the image has. A record that cannot be written fails the
// change with EIO before anything is changed locally (the broken tail is cut, the history goes
// on). Once a second the background thread makes it durable and moves its ship point (the scan
// at the next open starts there), then compacts.
//
// Ordering: every change holds its byte range in ranges_ (range_lock.h; under sealing, the whole
// sectors it covers) from before its local write until it is in the journal (async) or on the
// target (sync), so two changes to overlapping bytes reach the image and the replica in the same
// order, while changes to disjoint bytes stay concurrent.
//
// Threads: FUSE workers call the data path concurrently; one background thread per disk
// connects, ships, resyncs and cleans. Locks (lock order: ranges_ (entries, not mutexes: see
// range_lock.h), then edge_mu_ stripes (ascending), then
// jmu_, then the Journal's own leaf locks, then target_rw_; save_mu_ inside PersistentBitmap is a
// leaf; bg_mu_ and err_mu_ are leaves):
//   edge_mu_    sealing only: the stripes of the partly covered edge sectors of a request, from
//               reading them until the request is in the image and in the journal or on the target.
//   target_rw_  shared around every call on the target, exclusive to (re)connect or close it.
//   jmu_        the journal's mode (async), record reservation (not the record's write: see
//               journal.h, group commit), the backpressure wait.
//   rmu_        refs_ (journal by reference): a leaf, taken inside jmu_ or alone, never at idle
//               priority by the background thread.
//   hmu_        sync mode's history journal (hist_): record reservation, ship point, compaction's
//               drop (the same place in the order as jmu_; never both held).
//   bg_mu_      the background thread's wake-ups and drain's wait.
#pragma once

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "filter.h"
#include "offload.h"
#include "replicate/bitmap.h"
#include "replicate/history.h"
#include "replicate/journal.h"
#include "replicate/params.h"
#include "replicate/range_lock.h"
#include "replicate/refmap.h"
#include "replicate/target.h"
#include "rwlock.h"

namespace iofilterfs {

class ReplicateFilter : public Filter {
 public:
  explicit ReplicateFilter(replicate::ReplicateParams p);
  ~ReplicateFilter() override;

  // With the request's Deferrer (a throttle below may hold it): taken, and carried on this
  // filter's own threads (offload.h), so the wait below holds none of the daemon's workers.
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override;
  Status sync(const Io& io, bool datasync) override;
  Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len) override;
  Status resize(const Io& io, uint64_t size) override;

  // Loads the bitmap (or marks every region for the initial sync), replays the journal's
  // unshipped tail, starts the background thread. The target need not be reachable.
  Status open(const DiskInfo& info) override;
  void close() override;
  // Waits until the replica has every write made before the call (flushed on the target).
  // Fails at once, naming the reason, while the target is unreachable.
  Status drain() override;
  // A consistent point for a snapshot: the journal is made durable; the replica need not
  // have caught up (it gets there in order).
  Status quiesce() override;
  void shutdown() override;
  // With retention: a named restore point in the journal (a Point record, made durable).
  Status snapshot(std::string_view name) override;
  bool reconfigure(const YAML::Node& params) override;

  // The writes it carries on its own threads (see write()) go below at once and complete.
  void release_deferred() override { offload_.release(); }
  void defer_again() override { offload_.again(); }

  uint64_t replica_lag_bytes() const override;
  std::string degraded_reason() const override;
  // See iofilterfs.yaml(5): mode, target, state, lag_bytes, lag_seconds, journal_bytes, ...
  std::string stats_json() const override;
  std::string describe() const override;

  static constexpr uint64_t kStripes = 65536;

 private:
  enum class JMode { Journal, Bitmap };

  uint64_t region_of(uint64_t off) const { return off >> shift_; }
  static uint64_t stripe(uint64_t r) { return r % kStripes; }
  // Enters regions [r0, r1] (in flight, generation); in sync mode also sets and saves their
  // dirty bits. Returns false when the bitmap could not be saved (then nothing is entered).
  // A write after write() decided where it runs: on the worker, or carried on offload_'s
  // thread (carried), where the local write below goes with a Waiter (write_local).
  Status write_change(const Io& io, const void* buf, size_t len, uint64_t off, bool carried);
  Status write_local(const Io& io, const void* buf, size_t len, uint64_t off, bool carried);
  bool enter(uint64_t r0, uint64_t r1, bool mark_dirty);
  void leave(uint64_t r0, uint64_t r1);
  // Marks [r0, r1] dirty (saved) and pending; false when the save failed.
  bool mark_pending(uint64_t r0, uint64_t r1);
  bool save_bitmap();
  bool owner() const;
  void note_error(const std::string& e);
  void target_failed(const std::string& e);
  // Sync mode: sends one change to the target (send(target) returns "" or the error) when
  // `attempt` and the target is connected; otherwise, or when it fails, marks regions r0..r1
  // pending for the resync and wakes the background thread. True when it was sent.
  template <typename Send>
  bool send_or_track(bool attempt, uint64_t r0, uint64_t r1, Send&& send);
  void wake();
  // Raises the background thread from idle priority (see run()) for someone who waits for it.
  void boost();
  uint64_t now_ns() const;

  // Async: under jmu_. A Write record with `res` is only reserved (*res set, Ok): the caller
  // commits it without the lock; other records are appended whole. EAGAIN (only with `res`):
  // wait (backpressure); EINPROGRESS: bitmap mode marked regions, the caller saves the bitmap;
  // EIO (with retention): the record could not be written, the change must not be made.
  Status journal_locked(replicate::RecType type, uint64_t off, uint64_t len, const void* data, uint32_t data_crc,
                        std::optional<replicate::Reservation>* res, uint16_t flags = 0);
  void collapse_locked(const char* why);
  Status fallocate_sealed(const Io& io, int mode, uint64_t off, uint64_t len, uint64_t before);
  // A record could not be written: collapse the broken journal (once, by the first to get here).
  void journal_failed(const std::string& e);

  // Sealing (seal_ set). The stripes of the partly covered edge sectors of [off, off+len),
  // locked in ascending order; unlocked when the holder goes.
  struct EdgeLocks {
    std::mutex* m[2] = {nullptr, nullptr};
    EdgeLocks() = default;
    EdgeLocks(const EdgeLocks&) = delete;
    EdgeLocks& operator=(const EdgeLocks&) = delete;
    ~EdgeLocks() {
      if (m[1]) m[1]->unlock();
      if (m[0]) m[0]->unlock();
    }
  };
  void lock_edges(uint64_t off, uint64_t len, EdgeLocks* l);
  // Holds [off, off+len) in ranges_ (widened to whole sectors when sealing).
  void lock_range(uint64_t off, uint64_t len, replicate::RangeLock::Guard* g);
  // The ciphertext of the whole sectors covering [off, off+len) once `buf` (null: zeros) is
  // written there, in this thread's seal buffer: *aoff, *alen its payload range.
  Status seal_range(const void* buf, size_t len, uint64_t off, const uint8_t** out, uint64_t* aoff, size_t* alen);
  // What a write of [off, off+len) sends or journals: buf itself, or under sealing (edges then
  // locked) the ciphertext of its covering sectors from seal_range().
  Status outgoing(const void* buf, size_t len, uint64_t off, EdgeLocks* edges, const void** data, uint64_t* doff,
                  size_t* dlen);
  // The ciphertext of the one sector at `sector_off` with [z0, z1) zeroed, into out (512 bytes).
  Status seal_edge(uint64_t sector_off, uint64_t z0, uint64_t z1, uint8_t* out);
  // Writes the encryption of zeros over [off, off+len) of the target (sector multiples).
  std::string target_sealed_zero(uint64_t off, uint64_t len);
  // Copies the container's header to the start of the target.
  std::string copy_header(replicate::Target* t);

  // Journal by reference (by_ref_). A change's copy-before-write: the spans of its range that
  // unshipped records reference, their old bytes (each a Preserve record's data: the owner's
  // sequence, then the bytes) and checksums, then their reservations. One per thread, reused.
  struct Preserved {
    std::vector<replicate::Span> spans;
    std::vector<size_t> at;  // each span's record data in buf
    std::vector<uint32_t> crc;
    std::vector<replicate::Reservation> res;
    std::vector<uint8_t> buf;
  };
  static Preserved& thread_preserved();  // this thread's, reused
  // Fills *p for a change of [off, off+len) (reads the old bytes through the layer below).
  Status preserve_read(const Io& io, uint64_t off, uint64_t len, Preserved* p);
  // Under jmu_, in journal mode: reserves p's Preserve records.
  void preserve_reserve_locked(Preserved* p);
  // Without locks: writes them (every reservation is committed), "" or the first error.
  std::string preserve_commit(Preserved* p);
  // Once committed: the pieces go to their records (before the change reaches the image).
  void preserve_attach(const Preserved& p);
  // Under jmu_: copy-before-write for a zero-range or shrink of [off, off+len), written at once;
  // then nothing references that range. Collapses the journal when it cannot.
  Status preserve_changed(const Io& io, uint64_t off, uint64_t len);
  // Under jmu_ at open: rebuilds refs_ from the unshipped journal (*unshipped: its bytes as the
  // lag counts them); false when it holds by-reference records that this policy cannot ship
  // (then the caller collapses it).
  bool rebuild_refs(uint64_t* unshipped);
  // The background thread: ships by-reference record h (image and pieces). *local: the image
  // could not be read (the caller collapses the journal); else "" or the target's error.
  std::string ship_by_ref(const replicate::RecordHeader& h, uint64_t epoch, bool* local);
  // Runs fn under rmu_, the background thread at normal priority meanwhile.
  template <typename Fn>
  void with_refs(Fn&& fn);

  // Background thread.
  void run();
  bool connect_target();
  // Each returns true when it did some work; *err on a target failure.
  bool ship_some(std::string* err);
  bool resync_some(std::string* err);
  // Clears the dirty bits of regions the target has, after flushing it; force: hot ones too.
  bool clean(bool force, std::string* err);
  // Flushes the target and records the ship point durably; cut: reset a fully shipped journal.
  std::string persist_ship_point(bool cut);
  // Gives the target `size` (the image's, read by the caller) if it has another.
  std::string sync_target_size(uint64_t size);
  // Continuous data protection (retention): the base image at open, compaction in the
  // background (see history.h).
  std::string start_history();
  void compact();
  // The journal that holds the history (async: journal_, sync: hist_) and its lock.
  replicate::Journal* hjournal() const { return params_.mode == replicate::Mode::Async ? journal_.get() : hist_.get(); }
  std::mutex& hlock() { return params_.mode == replicate::Mode::Async ? jmu_ : hmu_; }
  // Sync mode with retention: one change into hist_ before it is made locally (see the top).
  Status history_record(replicate::RecType type, uint64_t off, uint64_t len, const void* data, uint32_t data_len,
                        uint16_t flags = 0);
  // Under hlock(), after a history record failed with `e`: the first caller cuts the broken
  // tail (journal.h, repair); kHistoryFailed, the change is not made.
  Status history_failed_locked(const std::string& e);
  // ... the encryption of zeros over [off, off+len) (sector multiples), as Write records.
  Status history_sealed_zero(uint64_t off, uint64_t len);

  replicate::ReplicateParams params_;
  const uint32_t shift_;
  // Held by every change from before its local write until it is in the journal or on the
  // target (range_lock.h): overlapping changes reach both in the same order.
  replicate::RangeLock ranges_{shift_};
  std::shared_ptr<const AtRest> seal_;  // set by open() when the policy encrypts
  uint64_t header_bytes_ = 0;           // the container's header (sealing)
  static constexpr int kEdgeStripes = 64;
  std::mutex edge_mu_[kEdgeStripes];
  std::string relpath_, base_;
  uint64_t token_ = 0;
  bool opened_ = false;

  std::unique_ptr<replicate::PersistentBitmap> bitmap_;
  replicate::AtomicBits pending_;
  std::unique_ptr<std::atomic<uint32_t>[]> inflight_, gen_;

  // The target.
  RwLock target_rw_;
  std::unique_ptr<replicate::Target> target_;  // set at open; connected under target_rw_
  std::atomic<bool> connected_{false};         // usable for writes
  std::atomic<bool> need_reconnect_{false};
  std::atomic<uint64_t> target_size_{0};       // the size the replica was last given (bg thread)

  // Journal by reference (refmap.h): async without retention or sealing, set by open().
  bool by_ref_ = false;
  std::mutex rmu_;
  replicate::RefMap refs_;  // under rmu_
  std::atomic<uint64_t> preserves_{0}, preserved_bytes_{0}, referenced_bytes_{0};
  std::vector<replicate::Piece> pieces_;  // bg thread

  // Async journal.
  std::mutex jmu_;
  std::condition_variable jcv_;  // backpressure: waits for the shipper
  std::unique_ptr<replicate::Journal> journal_;
  JMode jmode_ = JMode::Journal;       // under jmu_
  std::atomic<uint64_t> jepoch_{0};    // bumped by every collapse/reset (under jmu_)
  std::atomic<uint64_t> shipped_pos_{replicate::kJournalHeader};  // written under jmu_
  uint64_t shipped_seq_ = 1;                                      // under jmu_
  // Record bytes (header and data) appended, shipped, and shipped and flushed on the target;
  // monotonic across journal resets. A collapse counts its records as shipped (they are
  // pending regions now). Written under jmu_.
  std::atomic<uint64_t> appended_bytes_{0}, shipped_bytes_{0}, flushed_bytes_{0};
  std::atomic<bool> collapsed_{false};  // jmode_ == Bitmap, for reports
  std::atomic<uint64_t> head_time_ns_{0};  // time of the oldest unshipped record, 0 if none
  std::atomic<uint64_t> max_lag_;
  std::atomic<bool> backpressure_;
  std::atomic<bool> fail_on_error_;
  std::atomic<uint64_t> reconnect_max_us_;

  // Background thread.
  std::thread bg_;
  std::mutex bg_mu_;
  std::condition_variable bg_cv_;    // wakes the thread
  std::condition_variable done_cv_;  // wakes drain()
  std::atomic<bool> stop_{false};
  std::atomic<bool> bg_idle_{false};
  std::atomic<int> bg_tid_{0};                // the background thread's id (scheduling)
  std::atomic<bool> bg_sched_idle_{false};    // it runs at SCHED_IDLE (async, nothing waits)
  bool may_idle_ = false;                     // bg thread: it may (see ship_some())
  std::atomic<uint64_t> drain_waiters_{0};
  std::vector<uint8_t> buf_;                 // bg thread's region/record buffer
  std::vector<uint8_t> rec_;                 // bg thread's record data
  std::vector<std::pair<uint64_t, uint64_t>> holes_;  // bg thread: a resynced region's holes (sealing)
  uint64_t clean_after_ns_ = 0;              // bg thread
  uint64_t unflushed_ = 0;                   // bg thread: record bytes shipped since the last flush
  uint64_t last_persist_ns_ = 0;             // bg thread
  uint64_t last_shipped_time_ = 0;           // bg thread
  uint64_t resync_cursor_ = 0;               // bg thread
  bool unflushed_regions_ = false;           // bg thread: resynced regions not yet flushed
  bool ever_connected_ = false;              // bg thread
  std::vector<uint64_t> cleared_;            // bg thread
  std::vector<uint32_t> clean_gen_;          // bg thread: each stripe's generation at the last clean
  // drain(): each call takes a ticket (drain_req_) and a goal (the appended bytes it must see
  // shipped); the thread answers with drain_done_.
  std::atomic<uint64_t> drain_req_{0}, drain_done_{0}, drain_goal_{0};
  std::atomic<uint64_t> connect_started_{0};  // connection attempts begun (numbered from 1)
  std::atomic<uint64_t> connect_failed_{0};   // the number of the latest that failed, for drain()
  std::atomic<bool> kick_{false};              // drain() asks for an attempt now

  // History (retention only): the files, and the next compaction (bg thread).
  std::mutex hmu_;
  std::unique_ptr<replicate::Journal> hist_;  // sync mode's history journal (set at open)
  replicate::HistoryFiles history_;
  uint64_t next_compact_ns_ = 0;
  std::atomic<uint64_t> window_start_ns_{0}, compacted_records_{0}, points_{0};

  // Counters.
  std::atomic<uint64_t> bytes_sent_{0}, bytes_resent_{0}, bytes_zeroed_{0}, records_shipped_{0};
  std::atomic<uint64_t> bytes_copied_{0};  // shipped file to file (copy_file_range), see ship_by_ref
  std::atomic<uint64_t> journaled_bytes_{0}, writes_tracked_{0}, target_errors_{0}, reconnects_{0};
  std::atomic<uint64_t> resync_total_{0}, resync_done_{0}, collapses_{0}, backpressure_waits_{0};
  std::atomic<uint64_t> last_consistent_ns_{0};
  mutable std::mutex err_mu_;
  std::string last_error_;  // under err_mu_

  // Writes offered deferral, carried on threads of this filter's own (see write()). Last, so
  // its threads are gone before anything they use.
  Offload offload_{[this](bool, const Io& io, void* data, size_t len, uint64_t off, uint32_t, size_t*) {
    return write_change(io, data, len, off, true);
  }};
};

// Adds "replicate" to the registry.
void register_replicate(Registry& r);

}  // namespace iofilterfs
