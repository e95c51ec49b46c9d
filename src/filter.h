// The filter interface: one narrow contract shared by every layer of a disk's I/O path.
//
// A disk's I/O path is a stack of Layers. The bottom is the backing file (backing.h); above it,
// when a test asks for it, the fault-injection layer (fault.h); above that the policy's filters,
// ordered by their class — replicate, cache, throttle, encrypt — guest side first:
//
//     FUSE request ─► replicate ─► cache ─► throttle ─► encrypt ─► [fault] ─► backing file
//
// Each Filter holds a pointer to the layer below it (next_) and the default implementation of
// every operation passes the request down unchanged, so a filter overrides only what it changes
// (the stacking model of nbdkit's `next` and LevelDB's EnvWrapper). For each request a filter
// may
//   complete it  – return Ok without calling next_ (a cache hit);
//   fail it      – return an error Status; only the layers above it see the error;
//   pass it      – call next_ (possibly with changed data, as encryption does);
//   defer it     – keep the request and finish it later from a thread of its own, so that the
//                  FUSE worker thread it arrived on goes back to serve others (VAIO's
//                  deferred status). See "Deferring" below. A filter may also simply block the
//                  calling thread while it does slow work; that holds a worker, of which there
//                  are opt.threads for the whole mount, so waits that last (a token wait at a
//                  low limit) should defer instead.
//
// Filters also get the disk's control events (open, close, drain/flush, quiesce/resume,
// snapshot, shutdown) and report how many bytes they hold that the layer below lacks.
//
// Deferring. The caller of read()/write() that can take a late answer (the FUSE layer, through
// Disk) puts a Deferrer in Io::defer. A filter that wants to hold the request — and that
// may_defer() (below) — calls io.defer->take(): the framework then owns the request's buffer
// (a write's data is copied out of the worker's receive buffer, a read gets a buffer of its
// own, both at Deferred::data()), counts the request as in flight on its disk, and the filter
// returns Status::Deferred() at once. Later, from any other thread (a timer, a pool), the
// filter calls Deferred::resume(k) exactly once: the framework enters the disk again as for a
// new request (a write waits out a quiesce; a re-plumb's swap waits for it), runs k.run() on
// that thread — the rest of the filter's work, typically next_->read/write with a plain Io —
// and completes the request with its status (the FUSE reply), or Deferred::finish(status) to
// complete it without going down (from outside the disk: not on a thread inside one of its
// requests). Then the Deferred is gone.
//
//   worker:  Disk::write ─► filter.write: io.defer->take(), park it, return Deferred ─► (free)
//   timer:   d->resume(k) ─► [disk entered] k.run(data): next_->write(...) ─► reply, stats
//
// Completion hooks. A filter that passes io.defer down but has work of its own to finish once
// the request below is done (a cache that must keep a block marked "write in flight" until a
// deferred write lands, then update its map, before the write is acknowledged) registers a
// Then: when next_->read/write(io, ...) answered Status::Deferred(), it calls
// io.defer->then(t) before it returns Deferred itself. t->then(status, data, &got) runs once,
// when the request below completes — on the thread that completes it (the resuming one), or
// on the worker itself if the request completed before the worker was back out of the chain
// (the framework waits for both, so a hook never runs before it is registered) — inside the
// disk as a resumed request is, before the answer goes up. Hooks run in the order they were
// registered, which is bottom-up (a lower filter returns, and registers, first); each gets
// the status the one below returned and returns the status the request completes with, so a
// filter may still fail a request whose lower write succeeded, and only the layers above it
// see that. A filter that registers nothing is untouched.
//
//   worker:  cache.write: mark block, next_->write(io) ─► Deferred; io.defer->then(t); return Deferred
//   timer:   d->resume(k) ─► k.run(): below ─► t->then(s): cache bookkeeping ─► reply, stats
//
// Only requests of read and write are offered (nothing else is worth holding), and only in a
// chain that holds a filter declaring FilterInfo::defers. A filter that
// does not defer is untouched: it never looks at io.defer, and a filter's default data path
// passes io down unchanged. may_defer() is true only when every filter above this one in the
// chain declares FilterInfo::passes_deferral; the chain sets it when it links the filters. A
// filter that declares it decides per request: it passes io.defer down only with a request
// whose result it returns as it is and does nothing with after next_ returns (so it does not
// mind that the request comes back up "Deferred" before it is done) — or whose remaining work
// a completion hook does (below) — and sends every other request down with an Io without it
// (Io{io.direct}), so that nothing below defers that one. The cache does so (a read miss, its
// fill done by a hook; a write that goes below whole, finished by a hook; see register_cache);
// replicate passes a read through untouched. A filter whose work around a request needs a
// thread from start to end (replicate's writes; a cache's writes and reads that complete part
// of a page from below) takes the request itself and carries it on threads of its own
// (offload.h), where it goes below with a Deferrer of the carrying thread's, which waits for
// it (Offload::Waiter): a throttle below parks it, the filters in between finish it in their
// hooks, and only that filter's thread waits, never a FUSE worker that other disks need.
//
// The framework's side of the contract: a drain of the disk for a re-plumb that stops the
// chain first calls release_deferred() on every filter (resume what you hold now, hold nothing
// new until defer_again()); Disk::close() does the same before the filters close, and then
// waits until every deferred request of the disk has completed, so an unmount never leaves a
// request unanswered. A flush does not wait for deferred requests: a deferred write has not
// been acknowledged, so no durability is owed for it yet; a quiesce holds deferred writes
// that resume meanwhile until resume(), like any other new write.
//
// Threads: data-path methods are called concurrently from any number of worker threads; a
// filter protects its own state. Control events are serialised per disk by Disk::control_mu_
// and may run concurrently with data-path calls.
//
// Keep this header free of FUSE and of the framework's other types: it is meant to become the
// public plugin ABI (kFilterApiVersion below).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "status.h"

namespace YAML { class Node; }

namespace iofilterfs {

// 2: Io::defer, Deferred, release_deferred(); 3: Deferrer::then (completion hooks);
// 4: FilterInfo::defers (a Deferrer is offered only to a chain with a filter that defers)
inline constexpr int kFilterApiVersion = 4;

// Fixed class order, guest side first. The chain is sorted by this, never by YAML key order.
enum class FilterClass : int { Replicate = 0, Cache = 1, Throttle = 2, Encrypt = 3 };
inline constexpr int kFilterClassCount = 4;
const char* to_string(FilterClass c);

class Deferrer;

// Per-request context handed down the chain (lives on the worker thread's stack).
struct Io {
  bool direct = false;  // the opener asked for O_DIRECT (QEMU cache=none)
  // Non-null on a read or write whose caller can take a deferred answer (see "Deferring").
  // Pass it on unchanged, or not at all (a filter that resumes a request passes a plain Io).
  Deferrer* defer = nullptr;
};

// The continuation a filter runs when it resumes a deferred request (Deferred::resume).
class Continuation {
 public:
  // data: the request's buffer (a read's destination, a write's bytes), len bytes. A read sets
  // *got. Returns the request's status.
  virtual Status run(void* data, size_t* got) = 0;

 protected:
  ~Continuation() = default;
};

// A request a filter has taken to finish later. Owned by the framework; valid until resume()
// or finish() returns, and then gone.
class Deferred {
 public:
  // The request's buffer: the data to write (the framework's own copy) or where a read goes.
  virtual void* data() = 0;
  // Enters the disk on this thread, runs k, completes the request with k's status.
  virtual void resume(Continuation& k) = 0;
  // Completes the request with `s` (an error, or Ok with `got` bytes of a read in data())
  // without going down.
  virtual void finish(Status s, size_t got) = 0;

 protected:
  ~Deferred() = default;
};

// A filter's own work after a deferred request completes below it (see "Completion hooks").
class Then {
 public:
  // Runs once. s: what the layer below answered; data: the request's buffer (a read's bytes,
  // *got of them; a write's data, the framework's copy). Returns the status the request
  // completes with (s, or an error of this filter's; a read may change *got).
  virtual Status then(Status s, void* data, size_t* got) = 0;
  Then* next_then = nullptr;  // the framework's

 protected:
  ~Then() = default;
};

// Offered in Io::defer by a caller that can take a deferred answer.
class Deferrer {
 public:
  // Takes the request (see "Deferring"). After a non-null answer the filter must return
  // Status::Deferred() and later resume or finish it; null (out of memory): it was not taken,
  // and the filter handles the request on the calling thread.
  virtual Deferred* take() = 0;
  // Registers t for this request (see "Completion hooks"): only after the layer below
  // answered Status::Deferred() to it, and then the filter returns Status::Deferred() too.
  // t must stay valid until it has run; it always runs, with an error status if the request
  // fails (or if nothing below had taken it: a bug of that filter, answered EIO).
  virtual void then(Then* t) = 0;

 protected:
  ~Deferrer() = default;
};

// fallocate modes the chain understands (same bits as FALLOC_FL_*).
struct Layer {
  virtual ~Layer() = default;
  // Reads up to len bytes at off into buf; *got is what was read (short only at end of file).
  virtual Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) = 0;
  // Writes all len bytes or fails.
  virtual Status write(const Io& io, const void* buf, size_t len, uint64_t off) = 0;
  // Makes every acknowledged write durable (fsync; datasync = fdatasync).
  virtual Status sync(const Io& io, bool datasync) = 0;
  // mode: 0 (allocate), FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE|KEEP_SIZE, FALLOC_FL_ZERO_RANGE.
  virtual Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len) = 0;
  // Sets the size seen by the layer above (truncate or grow).
  virtual Status resize(const Io& io, uint64_t size) = 0;
  // SEEK_DATA / SEEK_HOLE from off; ENXIO past the end, as lseek(2).
  virtual Status seek(const Io& io, uint64_t off, int whence, uint64_t* result) = 0;
  // The size of the disk as seen by the layer above.
  virtual Status size(uint64_t* out) = 0;
  // Where bytes [off, off+len) as this layer reads them lie verbatim in a file: its descriptor,
  // and in *file_off where `off` is, so a background copy (a replica's shipper) may go file to
  // file with copy_file_range instead of through a buffer. Only a layer whose read of the range
  // is exactly the file's bytes at that moment answers: the backing file. Everything else —
  // a format that maps blocks, a filter that transforms, caches or fails requests on the way,
  // the fault layer — keeps this default, -1 ("read me instead"). The descriptor stays valid
  // while the caller holds what keeps this layer in place (a filter's BelowGuard).
  virtual int verbatim(uint64_t /*off*/, uint64_t /*len*/, uint64_t* /*file_off*/) { return -1; }
};

// At-rest protection that a filter offers the filters above it. The encrypt filter is the only
// provider: it sits last, above the backing file, so every filter above it (replicate, cache)
// handles plaintext. A filter that keeps guest data anywhere outside the chain — a cache
// device, a replication journal, a replica target — must, when its DiskInfo::at_rest is set,
// store only sealed bytes there and never plaintext:
//
//   cache      seals a block before writing it to the cache device, unseals it when serving a
//              hit or destaging it (destaged data goes down the chain as plaintext, where the
//              encrypt filter encrypts it again for the backing file);
//   replicate  seals what it journals and what it sends; the replica then holds exactly the
//              bytes the backing file holds (the same sectors, the same key, the same IVs), and
//              it first copies the container's header (header_bytes() bytes read from the
//              backing file through read_header()), so the replica is itself a LUKS container
//              that opens with the image's passphrases in cryptsetup, QEMU or iofilterfs.
//
// Sealing is the data cipher of the container itself (aes-xts-plain64, IV = payload sector), so
// offsets are payload offsets as the filters above see them, in whole 512-byte sectors. The
// object is immutable and outlives the filter that made it (shared ownership), so a filter
// above that is kept across a re-plumb may keep using it; the key it holds is the container's
// master key, which a passphrase change does not alter.
class AtRest {
 public:
  static constexpr size_t kSector = 512;
  virtual ~AtRest() = default;
  // Encrypts len bytes of payload that start at payload offset off (both multiples of kSector)
  // from in to out (which may be the same buffer): exactly the bytes the backing file holds for
  // them.
  virtual Status seal(uint64_t off, const void* in, void* out, size_t len) const = 0;
  // The reverse of seal().
  virtual Status unseal(uint64_t off, const void* in, void* out, size_t len) const = 0;
  // The bytes of the backing file before the payload (the container's header).
  virtual uint64_t header_bytes() const = 0;
  // Reads the header as it is now in the backing file (keyslots change when passphrases are
  // added or removed): up to len bytes at off, off + len <= header_bytes().
  virtual Status read_header(void* buf, size_t len, uint64_t off) const = 0;
};

// What a filter learns about its disk when it is opened.
struct DiskInfo {
  std::string path;     // relative to the datastore root
  std::string format;   // raw, qcow2, vmdk
  bool read_only = false;
  // Set when a filter below this one encrypts (see AtRest): then nothing this filter stores
  // outside the chain may be plaintext.
  std::shared_ptr<const AtRest> at_rest;
};

class Filter : public Layer {
 public:
  Filter() = default;
  Filter(const Filter&) = delete;
  Filter& operator=(const Filter&) = delete;

  void set_next(Layer* next) { next_ = next; }
  Layer* next() const { return next_; }
  // Set by the chain when it links the filters (see "Deferring"): every filter above this one
  // passes deferral. Read on the data path; changes only while no request is inside the chain.
  void set_may_defer(bool on) { may_defer_ = on; }
  bool may_defer() const { return may_defer_; }

  // Data path: pass everything down unchanged.
  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override {
    return next_->read(io, buf, len, off, got);
  }
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override {
    return next_->write(io, buf, len, off);
  }
  Status sync(const Io& io, bool datasync) override { return next_->sync(io, datasync); }
  Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len) override {
    return next_->fallocate(io, mode, off, len);
  }
  Status resize(const Io& io, uint64_t size) override { return next_->resize(io, size); }
  Status seek(const Io& io, uint64_t off, int whence, uint64_t* result) override {
    return next_->seek(io, off, whence, result);
  }
  Status size(uint64_t* out) override { return next_->size(out); }

  // Control events. Called with the disk's control lock held, bottom filter first for open,
  // top filter first for everything that drains (so data flows down into filters that are
  // still open).
  virtual Status open(const DiskInfo&) { return Status::Ok(); }
  virtual void close() {}
  // Write everything this filter holds that the layer below lacks, and return only when the
  // layer below has it (flush, policy removal, unmount).
  virtual Status drain() { return Status::Ok(); }
  // Hold new writes after draining, until resume().
  virtual Status quiesce() { return drain(); }
  virtual void resume() {}
  // A named, consistent restore point (called between quiesce and resume).
  virtual Status snapshot(std::string_view /*name*/) { return Status::Ok(); }
  // The daemon is stopping: stop background work after a final drain.
  virtual void shutdown() {}
  // Deferred requests across a change of the chain around this filter, or a close (see
  // "Deferring"): resume every request this filter holds now (they go down at once, wherever
  // they were in its queue), take no new ones, and return when none is left in it. Called with
  // the disk's control lock held and requests flowing (not under the plumbing lock, which the
  // resumed requests need). defer_again() lifts it (after the change, or when it was aborted).
  virtual void release_deferred() {}
  virtual void defer_again() {}
  // A policy change gives this filter new parameters (already validated). Return true when it
  // took them in place — all of them, with its state and the requests it holds — and false to
  // be replaced by a fresh instance (the default). Called with the disk's control lock held but
  // not its plumbing lock: requests keep flowing through the filter meanwhile, so it
  // synchronises itself. Called again with the old parameters if the rest of the change fails.
  virtual bool reconfigure(const YAML::Node& /*params*/) { return false; }

  // The at-rest protection this filter offers the filters above it (valid after open()), or
  // null. See AtRest.
  virtual std::shared_ptr<const AtRest> at_rest() const { return nullptr; }
  // Why this filter may not be removed from an open disk (the policy no longer names a filter
  // of its class), or "" when it may. The encrypt filter refuses: without it the disk would
  // turn, under the guest's feet, from its plaintext into the container's ciphertext.
  virtual std::string removal_refused() const { return {}; }

  // Bytes this filter holds that the layer below does not have yet.
  virtual uint64_t dirty_bytes() const { return 0; }
  // Bytes written that a replica does not have yet (replication filters).
  virtual uint64_t replica_lag_bytes() const { return 0; }
  // One JSON object (without surrounding braces' caller): the filter's own counters.
  virtual std::string stats_json() const { return "{}"; }
  // Key parameters, for the chain view ("iops=500 bps=20MiB/s").
  virtual std::string describe() const { return {}; }
  // Why the disk works in a reduced way because of this filter ("replica unreachable"), or
  // empty; the disk's state then reads "degraded: REASON".
  virtual std::string degraded_reason() const { return {}; }

  // For the chain only (see below()): hold_below() waits until no background call is below
  // this filter and holds new ones; release_below() lets them go on, or with retired (the
  // filter has left the chain) makes every later below() empty.
  void hold_below();
  void release_below(bool retired);

 protected:
  // The layer below, for a call made by a thread of the filter's own, outside any request (a
  // cache's destager, a replica's resync). Requests reach a filter only while the disk holds
  // its plumbing lock shared, so next_ cannot change under them; a background thread has no
  // such lock, so it holds this guard across each call instead:
  //
  //     if (BelowGuard b = below()) s = b->write(io, buf, len, off);
  //     else ...  // the filter has left the chain: nothing below to call any more
  //
  // A re-plumb waits for the guards in flight before it relinks or destroys anything below,
  // and below() waits while it does (a moment: the relinking itself). A guard covers the
  // whole stack below, since the call goes on down through the filters' request paths. It
  // may be taken in open() too: a filter is linked before it opens. Never call below() with
  // a lock held that a request path may need, and never hold a guard while waiting for
  // requests to finish.
  class BelowGuard {
   public:
    BelowGuard(BelowGuard&& o) noexcept : f_(o.f_), layer_(o.layer_) { o.f_ = nullptr; o.layer_ = nullptr; }
    BelowGuard& operator=(BelowGuard&&) = delete;
    ~BelowGuard();
    explicit operator bool() const { return layer_ != nullptr; }
    Layer* operator->() const { return layer_; }
    Layer* get() const { return layer_; }

   private:
    friend class Filter;
    BelowGuard(Filter* f, Layer* layer) : f_(f), layer_(layer) {}
    Filter* f_;
    Layer* layer_;
  };
  BelowGuard below();

  Layer* next_ = nullptr;

 private:
  std::mutex below_mu_;
  std::condition_variable below_cv_;
  int below_calls_ = 0;       // background calls in flight below (under below_mu_)
  bool below_held_ = false;   // a re-plumb is relinking (under below_mu_)
  bool below_retired_ = false;
  bool may_defer_ = false;
};

// A filter's entry in the registry: what the daemon lists as "installed filters".
struct FilterInfo {
  std::string name;
  FilterClass cls;
  int api_version;
  std::string description;
  // The parameter keys it accepts (for the manual's coverage test and for tooling).
  std::vector<std::string> params;
  // Checks parameters without side effects (a pure function, QEMU's throttle_is_valid):
  // returns an empty string when valid, else the message, and points *where at the offending
  // node (the framework turns its mark into FILE:LINE:COLUMN; left alone, the whole params
  // node is blamed). Point it with where->reset(node): in yaml-cpp `*where = node` would
  // assign into the node *where refers to, rewriting the policy document. May be empty when
  // the filter takes no parameters.
  std::function<std::string(const YAML::Node& params, YAML::Node* where)> validate;
  std::function<std::unique_ptr<Filter>(const YAML::Node& params)> create;
  // Optional, pure: checks together the parameters of every policy of one file that uses this
  // filter — (policy name, params) in file order, each already valid — for settings that relate
  // across policies (a throttle group's limits). Returns "" or the message, pointing *where as
  // validate does (left alone, the file's policies section is blamed).
  std::function<std::string(const std::vector<std::pair<std::string, YAML::Node>>& uses, YAML::Node* where)>
      validate_policies;
  // Optional, pure: the size the layers above would see of a backing file of `backing_size`
  // bytes that starts with `head` (its first 4 KiB, or all of it when shorter). The daemon asks
  // it to stat an image whose disk is not open, for the bottom-most filter of the image's policy
  // that has it; a filter that keeps its own header in the file (encrypt) answers the payload's
  // size. Null: the size passes unchanged.
  std::function<uint64_t(std::string_view head, uint64_t backing_size)> visible_size;
  // Optional: drops what the filter keeps for an image outside the image itself (a cache
  // file's dirty blocks), for the operator who accepts losing it (`iofilterctl cache discard
  // --force`); the image is not open. `image` is its path in the datastore. Returns "" or why
  // not.
  std::function<std::string(const YAML::Node& params, const std::string& image)> discard;
  // A filter below this one may defer (see "Deferring"): on each read and write, this filter
  // either passes io down unchanged and does nothing after next_ returns but return what it
  // returned (or, when that is Deferred, register a completion hook that does its remaining
  // work: see "Completion hooks"), or takes the request itself and carries it on its own
  // threads (offload.h), or passes an Io without defer. The default (false) suits a filter
  // that passes io down and then works on every result. The cache and replicate declare it.
  bool passes_deferral = false;
  // This filter may itself take a request and answer it later (io.defer->take(): the
  // throttle). The framework offers a Deferrer only to a chain that holds such a filter, so
  // that a filter passing deferral (a cache finishing its fills and writes in completion hooks)
  // pays nothing for it in a chain where nothing would defer.
  bool defers = false;
};

// The datastore's own settings that filters read (the `datastore:` section of the policy
// file). One datastore per daemon, so they are process-wide: the daemon sets them at start-up
// and on every reload, before it re-plumbs the disks; filters read them at any time (each
// field is one relaxed atomic load).
struct DatastoreSettings {
  uint64_t congestion_latency_ns = 30'000'000;  // datastore.congestion-latency
};
DatastoreSettings datastore_settings();
void set_datastore_settings(const DatastoreSettings& s);

class Registry {
 public:
  // The daemon's registry, with every built-in filter registered.
  static Registry& instance();

  // Returns false (and changes nothing) when the name is taken or the API version differs.
  bool add(FilterInfo info);
  const FilterInfo* find(std::string_view name) const;
  const std::vector<FilterInfo>& all() const { return filters_; }

 private:
  std::vector<FilterInfo> filters_;
};

// Registers the filters built into the daemon (filters/*/). Called once by instance().
void register_builtin_filters(Registry& r);

}  // namespace iofilterfs
