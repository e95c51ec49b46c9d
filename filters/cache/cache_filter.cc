#include "cache/cache_filter.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <spdlog/spdlog.h>
#include <time.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <shared_mutex>

#include "json.h"
#include "units.h"

namespace iofilterfs {
namespace {

using cache::kNoBlock;
using cache::kNoSlot;
using cache::kPage;
using cache::PageMask;

uint64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

// Per-thread scratch, apart from the buffers of the filters below (encrypt uses
// BufferSlot::Filter while we hold ours): 0 read_block's, 1 write_back_block's, 2 a carried
// read's whole pages (carried()).
uint8_t* scratch(int which, size_t len) {
  struct Buf {
    uint8_t* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf b[3];
  Buf& x = b[which];
  if (x.n < len) {
    std::free(x.p);
    x.p = static_cast<uint8_t*>(std::aligned_alloc(4096, (len + 4095) & ~size_t(4095)));
    x.n = x.p ? len : 0;
  }
  return x.p;
}

const Status kNoBuffer = Status::Error(ENOMEM, "cache: no scratch buffer");
const Status kLost = Status::Error(EIO, "cache: dirty data on the cache device cannot be read");
const Status kRecordsFail = Status::Error(EIO, "cache: the cache device refuses record updates");

}  // namespace

CacheFilter::CacheFilter(cache::CacheParams p)
    : p_(std::move(p)),
      mode_(p_.mode),
      cutoff_(p_.sequential_cutoff),
      seq_(p_.sequential_cutoff),
      marks_(p_.high_watermark, p_.low_watermark) {}

CacheFilter::~CacheFilter() {
  offload_.stop();  // none is left after a close (the disk released them): its idle threads
  close();
}

void CacheFilter::degrade(const std::string& why) {
  std::lock_guard<std::mutex> g(health_mu_);
  if (!degraded_.exchange(true)) {
    health_ = "cache device " + why;
    spdlog::error("{}: degraded: {}", info_.path, health_);
  }
}

std::string CacheFilter::degraded_reason() const {
  std::lock_guard<std::mutex> g(health_mu_);
  return health_;
}

// ---- open / close -------------------------------------------------------------------------

Status CacheFilter::open(const DiskInfo& info) {
  info_ = info;
  // The cache needs the layer below at open (its size; destaging a cache file of another
  // geometry); the chain links a filter before it opens it.
  if (!next_) return Status::Error(EINVAL, "opened before the chain linked a layer below it");
  uint64_t bsize = 0;
  Status s = next_->size(&bsize);
  if (!s.ok()) return s;
  size_.store(bsize);
  const uint32_t slots = p_.slots();
  std::string err;
  std::vector<cache::Record> live;
  if (p_.device.empty()) {
    store_ = cache::MemStore::create(slots, p_.block, &err);
    if (!store_) degrade(err);
  } else {
    // An encrypt filter below: the cache file holds only sealed bytes (filter.h, AtRest).
    std::shared_ptr<const AtRest> key = info.at_rest;
    std::unique_ptr<cache::FileStore> fs;
    cache::Replay replay;
    s = cache::FileStore::open(p_.device, info.path, slots, p_.block, key, &fs, &replay, &err);
    if (!s.ok()) {
      if (replay.refuse) {
        spdlog::error("{}: cache: {}", info.path, err);
        static std::mutex mu;
        static std::vector<std::unique_ptr<std::string>> kept;  // Status::what outlives the disk
        std::lock_guard<std::mutex> g(mu);
        if (kept.size() < 1000) kept.push_back(std::make_unique<std::string>(err));
        return Status::Error(s.err, kept.size() < 1000 ? kept.back()->c_str() : "the cache device holds dirty data that cannot be used");
      }
      degrade(err);  // missing directory, full or failing device: pass-through
    } else {
      store_path_ = fs->path();
      if (replay.incompatible) {
        // Dirty data in another geometry (or plaintext now that the image encrypts): written
        // below through the file's own layout, then the file starts over.
        const uint32_t obs = fs->header().block_size;
        std::vector<uint8_t> page(kPage);
        uint64_t end = bsize;  // the disk's end, as the dirty records knew it
        for (const cache::Record& r : replay.live)
          if (r.dirty.any()) end = std::max(end, r.size);
        for (const cache::Record& r : replay.live) {
          for (uint32_t pg = 0; pg < obs / kPage; ++pg) {
            if (!r.dirty.test(pg)) continue;
            s = fs->read(r.slot, r.block, pg * kPage, page.data(), kPage);
            if (s.ok()) s = pages_below(Io{}, page.data(), kPage, r.block * obs + pg * kPage, end);
            if (!s.ok()) return Status::Error(EIO, "cache: dirty data of an older cache file could not be destaged");
          }
        }
        s = next_->sync(Io{}, false);
        if (s.ok()) s = fs->reformat(slots, p_.block, &err);
        if (!s.ok()) return Status::Error(EIO, "cache: an older cache file could not be destaged and re-made");
        spdlog::info("{}: cache: {} dirty blocks of an older cache file destaged; {} re-made", info.path,
                     replay.live.size(), fs->path());
      } else {
        live = std::move(replay.live);
        record_seq_.store(replay.max_seq);
      }
      store_ = std::move(fs);
    }
  }
  map_ = std::make_unique<cache::BlockMap>(slots);
  meta_.assign(slots, Meta{});
  uint64_t dirty_blocks = 0;
  for (const cache::Record& r : live) {
    if (!r.valid.any() && !r.dirty.any()) continue;
    if (!map_->place(r.block, r.slot)) continue;
    meta_[r.slot].valid = r.valid;
    meta_[r.slot].dirty = r.dirty;
    valid_pages_ += r.valid.count();
    if (r.dirty.any()) {
      map_->set_dirty(r.slot, true);
      dirty_pages_ += r.dirty.count();
      ++dirty_blocks;
      if (r.size > size_.load()) size_.store(r.size);
    }
  }
  replayed_ = dirty_blocks;
  if (!live.empty())
    spdlog::info("{}: cache: {} blocks found in {} ({} dirty, {}), destaging", info.path, live.size(), store_path_,
                 dirty_blocks, format_size(dirty_pages_.load() * kPage));
  if (store_ && write_back()) start_destager();
  if (dirty_blocks > 0) kick();
  return Status::Ok();
}

void CacheFilter::close() {
  stop_destager();
  store_.reset();
}

void CacheFilter::shutdown() { stop_destager(); }

void CacheFilter::start_destager() {
  std::lock_guard<std::mutex> g(thr_mu_);
  if (thr_.joinable()) return;
  stop_ = false;
  thr_ = std::thread([this] { destager(); });
}

void CacheFilter::stop_destager() {
  {
    std::lock_guard<std::mutex> g(thr_mu_);
    stop_ = true;
  }
  thr_cv_.notify_all();
  if (thr_.joinable()) thr_.join();
}

void CacheFilter::kick(bool all) {
  {
    std::lock_guard<std::mutex> g(thr_mu_);
    (all ? kicked_ : woken_) = true;
  }
  thr_cv_.notify_one();
}

void CacheFilter::destager() {
  std::unique_lock<std::mutex> l(thr_mu_);
  while (!stop_) {
    thr_cv_.wait_for(l, std::chrono::milliseconds(250), [&] { return stop_ || kicked_ || woken_; });
    if (stop_) break;
    const bool kicked = kicked_;
    kicked_ = woken_ = false;
    l.unlock();
    // This thread is the filter's own: its calls below hold a BelowGuard (filter.h), one
    // bounded pass at a time, so a re-plumb never relinks the chain under a destage.
    if (records_broken_.load() && !passthrough_.load()) {
      // A failing device: everything below, the file aside, without waiting for a write.
      Status s = Status::Ok();
      if (BelowGuard below_ = below()) s = failover();
      else break;  // left the chain
      if (!s.ok())
        spdlog::warn("{}: cache: failing over to the layer below failed ({}); retrying", info_.path,
                     s.what ? s.what : std::strerror(s.err));
      l.lock();
      continue;
    }
    // Runs while the dirty share is between the marks; a kick (replayed dirty data, a degraded
    // device) destages everything.
    for (;;) {
      bool run;
      {
        std::lock_guard<RwLock> g(mu_);
        run = marks_.update(map_->dirty_count(), map_->slots()) ||
              ((kicked || degraded_.load()) && map_->dirty_count() > 0);
      }
      if (!run) break;
      size_t n = 0;
      Status s = Status::Ok();
      if (BelowGuard below_ = below()) s = destage_pass(64, &n);
      else break;
      if (!s.ok()) {
        spdlog::warn("{}: cache: destaging failed ({}); retrying", info_.path, s.what ? s.what : std::strerror(s.err));
        break;
      }
      std::lock_guard<std::mutex> g(thr_mu_);
      if (stop_ || n == 0) break;
    }
    l.lock();
  }
}

// ---- helpers ------------------------------------------------------------------------------

uint32_t CacheFilter::alloc_locked(uint64_t b) {
  uint64_t evicted = kNoBlock;
  const uint32_t s = map_->insert(b, &evicted);
  if (s == kNoSlot) return s;
  if (evicted != kNoBlock) evictions_.fetch_add(1, std::memory_order_relaxed);
  valid_pages_.fetch_sub(meta_[s].valid.count(), std::memory_order_relaxed);
  meta_[s].valid = PageMask{};
  meta_[s].dirty = PageMask{};
  ++meta_[s].gen;
  return s;
}

cache::Record CacheFilter::record_locked(uint32_t slot) {
  cache::Record r;
  r.seq = record_seq_.fetch_add(1) + 1;
  r.block = map_->block_of(slot);
  r.size = size_.load();
  r.slot = slot;
  r.flags = 1;
  r.valid = meta_[slot].valid;
  r.dirty = meta_[slot].dirty;
  return r;
}

Status CacheFilter::persist(uint32_t slot) {
  if (!store_->persistent()) return Status::Ok();
  cache::Record r;
  {
    std::lock_guard<RwLock> g(mu_);
    r = record_locked(slot);
  }
  return store_->put_record(r);
}

Status CacheFilter::pages_below(const Io& io, const uint8_t* data, size_t len, uint64_t at, uint64_t end) {
  if (at >= end) return Status::Ok();
  return next_->write(io, data, std::min<uint64_t>(len, end - at), at);
}

uint64_t CacheFilter::disk_end() {
  uint64_t end = 0;
  return size(&end).ok() ? end : UINT64_MAX;
}

Status CacheFilter::read_below(const Io& io, uint8_t* buf, size_t len, uint64_t off, size_t* got) {
  *got = 0;
  while (*got < len) {
    size_t n = 0;
    Status s = next_->read(io, buf + *got, len - *got, off + *got, &n);
    if (!s.ok()) return s;
    if (n == 0) break;
    *got += n;
  }
  if (*got < len) std::memset(buf + *got, 0, len - *got);
  return Status::Ok();
}

// ---- read ---------------------------------------------------------------------------------

Status CacheFilter::read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) {
  *got = 0;
  if (!store_ || passthrough_.load(std::memory_order_acquire)) return next_->read(io, buf, len, off, got);
  uint64_t end = off + len;
  if (write_back()) {
    uint64_t size = 0;
    Status s = this->size(&size);
    if (!s.ok()) return s;
    if (off >= size) return Status::Ok();
    end = std::min(end, size);
  }
  bool bypass = false;
  if (cutoff_.load(std::memory_order_relaxed)) {
    std::lock_guard<std::mutex> g(seq_mu_);
    bypass = seq_.observe(off, end - off, now_ns());
  }
  auto* dst = static_cast<uint8_t*>(buf);
  if (io.defer && end > off) {
    // A hit of one block as read_block serves it; else below with the request's Deferrer when
    // it can be (see ReadFlight); else, when it would wait below, on this filter's own threads
    // (offload.h); else here, block by block, each working on what comes up.
    const uint64_t b = off / p_.block;
    const bool one = b == (end - 1) / p_.block;
    if (one && try_hit(b, static_cast<uint32_t>(off % p_.block), static_cast<uint32_t>(end - off), dst, got))
      return Status::Ok();
    Status s;
    bool carry = false;
    if (read_deferred(io, dst, end - off, off, bypass, !one, got, &s, &carry)) return s;
    if (carry && may_defer() && offload_.take(io, false, end - off, off, bypass ? kBypassTag : 0))
      return Status::Deferred();
  }
  return read_blocks(Io{io.direct}, dst, off, end, bypass, got);
}

Status CacheFilter::read_blocks(const Io& plain, uint8_t* dst, uint64_t off, uint64_t end, bool bypass, size_t* got) {
  const uint64_t bs = p_.block;
  for (uint64_t pos = off; pos < end;) {
    const uint64_t b = pos / bs;
    const uint32_t o = static_cast<uint32_t>(pos % bs);
    const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(bs - o, end - pos));
    size_t g = 0;
    Status s = read_block(plain, b, o, n, dst + (pos - off), bypass, &g);
    if (!s.ok()) return s;
    *got += g;
    if (g < n) break;  // end of file below
    pos += n;
  }
  return Status::Ok();
}

Status CacheFilter::carried(bool is_write, const Io& plain, void* data, size_t len, uint64_t off, uint32_t tag,
                            size_t* got) {
  // On this filter's thread, and still without a block lock held across a wait below where
  // the deferrable paths' order allows it (read_deferred locks, goes below unlocked, then
  // locks again to finish): so that requests of the same blocks on the mount's workers, and
  // the completion hooks of deferred ones, do not wait behind this one's turn below.
  const bool bypass = tag & kBypassTag;
  auto* p = static_cast<uint8_t*>(data);
  const uint64_t a0 = off / kPage * kPage, a1 = (off + len + kPage - 1) / kPage * kPage;
  if (is_write) {
    if (!store_ || passthrough_.load(std::memory_order_acquire)) return next_->write(plain, data, len, off);
    if (write_back() && (a0 != off || a1 != off + len)) {
      // The edge pages the write covers in part, read into the cache first as a read of them
      // would be, so that write_back_block finds them valid (if they were evicted meanwhile,
      // it reads them below itself, as before).
      uint64_t edges[2];
      int ne = 0;
      if (a0 != off) edges[ne++] = a0;
      if (a1 != off + len && (ne == 0 || a1 - kPage != a0)) edges[ne++] = a1 - kPage;
      uint8_t* page = scratch(2, kPage);
      for (int e = 0; e < ne && page; ++e) {
        size_t g = 0;
        Status s;
        bool ignored = false;
        (void)read_deferred(plain, page, kPage, edges[e], bypass, true, &g, &s, &ignored);
      }
    }
    return write_blocks(plain, p, len, off, bypass, true);
  }
  *got = 0;
  if (!store_ || passthrough_.load(std::memory_order_acquire)) return next_->read(plain, data, len, off, got);
  // Unaligned: read as the whole pages that cover it, which read_deferred fills and overlays.
  uint8_t* pages = scratch(2, a1 - a0);
  Status s;
  size_t g = 0;
  bool ignored = false;
  if (pages && read_deferred(plain, pages, a1 - a0, a0, bypass, true, &g, &s, &ignored)) {
    if (!s.ok()) return s;
    const size_t skip = off - a0;
    *got = g > skip ? std::min<size_t>(len, g - skip) : 0;
    std::memcpy(p, pages + skip, *got);
    return Status::Ok();
  }
  return read_blocks(plain, p, off, off + len, bypass, got);  // all of it cached (or no memory)
}

bool CacheFilter::try_hit(uint64_t b, uint32_t o, uint32_t n, uint8_t* dst, size_t* got) {
  // mu_ held shared only, so hits run side by side; no stripe lock (the slot cannot be reused
  // while mu_ is held or the slot pinned; a write racing with this read of the same bytes may
  // show either version, as a disk would). RAM copies under the lock; a cache file pins the
  // slot and reads it after.
  const uint32_t pa = o / kPage, pe = (o + n + kPage - 1) / kPage;
  uint32_t slot = kNoSlot;
  {
    std::shared_lock<RwLock> g(mu_);
    const uint32_t s = map_->find(b);
    if (s == kNoSlot || !meta_[s].valid.all_in(pa, pe)) return false;
    map_->touch(s);
    if (!store_->persistent()) {
      (void)store_->read(s, b, o, dst, n);  // memcpy
      hits_.fetch_add(1, std::memory_order_relaxed);
      *got = n;
      return true;
    }
    map_->pin(s);
    slot = s;
  }
  const bool aligned = o % kPage == 0 && n % kPage == 0;
  const size_t span = size_t(pe - pa) * kPage;
  uint8_t* tmp = aligned ? dst : scratch(0, span);
  Status s = tmp ? store_->read(slot, b, pa * kPage, tmp, span) : kNoBuffer;
  map_->unpin(slot);
  if (!s.ok()) return false;  // a failed read: read_block's slow path decides (degrade, or below)
  if (!aligned) std::memcpy(dst, tmp + (o - pa * kPage), n);
  hits_.fetch_add(1, std::memory_order_relaxed);
  *got = n;
  return true;
}

Status CacheFilter::read_block(const Io& io, uint64_t b, uint32_t o, uint32_t n, uint8_t* dst, bool bypass,
                               size_t* got) {
  const uint64_t base = b * p_.block;
  // io never carries a Deferrer here (read() offers that to read_deferred only): every read
  // below is waited for on this thread.
  if (try_hit(b, o, n, dst, got)) return Status::Ok();
  std::lock_guard<std::mutex> sl(stripe(b));
  uint32_t slot;
  PageMask valid, dirty;
  bool fresh = false;
  {
    std::lock_guard<RwLock> g(mu_);
    slot = map_->hit(b);
    if (slot == kNoSlot && !bypass && !degraded_.load(std::memory_order_relaxed)) {
      slot = alloc_locked(b);
      fresh = slot != kNoSlot;
    }
    if (slot != kNoSlot) {
      map_->pin(slot);
      valid = meta_[slot].valid;
      dirty = meta_[slot].dirty;
    }
  }
  if (slot == kNoSlot) {
    (bypass ? bypasses_ : misses_).fetch_add(1, std::memory_order_relaxed);
    if (!write_back()) return next_->read(io, dst, n, base + o, got);
    size_t g = 0;
    Status s = read_below(io, dst, n, base + o, &g);
    *got = n;  // write-back: clipped to the disk's size already, zeros past below's end
    return s;
  }
  auto unpin = [&] {
    std::lock_guard<RwLock> g(mu_);
    map_->unpin(slot);
    if (fresh && !meta_[slot].valid.any() && map_->pins(slot) == 0) map_->erase(b);
  };
  // A reused slot's record still names the block it held: it must name this one (with nothing
  // valid) before anything else happens, or a later open would find the old block there.
  if (fresh && !persist(slot).ok()) {
    records_failed("write failed while reusing a slot");
    std::lock_guard<RwLock> g(mu_);
    map_->unpin(slot);
    if (map_->pins(slot) == 0) map_->erase(b);
    slot = kNoSlot;
  }
  if (slot == kNoSlot) {
    misses_.fetch_add(1, std::memory_order_relaxed);
    if (!write_back()) return next_->read(io, dst, n, base + o, got);
    size_t g = 0;
    Status s = read_below(io, dst, n, base + o, &g);
    *got = n;
    return s;
  }
  const uint32_t pa = o / kPage, pe = (o + n + kPage - 1) / kPage;
  const size_t span = size_t(pe - pa) * kPage;
  bool all = true;
  for (uint32_t p = pa; p < pe && all; ++p) all = valid.test(p);
  uint8_t* tmp = nullptr;
  const bool aligned = o % kPage == 0 && n % kPage == 0;
  if (all) {
    tmp = aligned ? dst : scratch(0, span);
    if (!tmp) {
      unpin();
      return kNoBuffer;
    }
    Status s = store_->read(slot, b, pa * kPage, tmp, span);
    if (s.ok()) {
      if (!aligned) std::memcpy(dst, tmp + (o - pa * kPage), n);
      hits_.fetch_add(1, std::memory_order_relaxed);
      *got = n;
      unpin();
      return Status::Ok();
    }
    degrade(std::string("read failed: ") + std::strerror(s.err));
    for (uint32_t p = pa; p < pe; ++p)
      if (dirty.test(p)) {
        unpin();
        return kLost;
      }
    // Clean: the same bytes are below.
  }
  misses_.fetch_add(1, std::memory_order_relaxed);
  tmp = scratch(0, span);
  if (!tmp) {
    unpin();
    return kNoBuffer;
  }
  size_t below = 0;
  Status s = read_below(io, tmp, span, base + pa * kPage, &below);
  if (!s.ok()) {
    unpin();
    return s;
  }
  // Dirty pages are newer than what came up.
  for (uint32_t p = pa; p < pe; ++p) {
    if (!dirty.test(p)) continue;
    s = store_->read(slot, b, p * kPage, tmp + (p - pa) * kPage, kPage);
    if (!s.ok()) {
      degrade(std::string("read failed: ") + std::strerror(s.err));
      unpin();
      return kLost;
    }
  }
  // Keep the pages that came up whole and are not cached yet — unless a write of the block is
  // still in flight below (InFlight): what came up may be the bytes it replaces.
  if (!degraded_.load(std::memory_order_relaxed) && !in_flight(b)) {
    PageMask fill;
    for (uint32_t p = pa; p < pe; ++p)
      if (!valid.test(p) && (p - pa + 1) * size_t(kPage) <= below) fill.set(p);
    if (fill.any()) keep_pages(b, slot, fill, pa, pe, tmp);
  }
  std::memcpy(dst, tmp + (o - pa * kPage), n);
  if (write_back()) {
    *got = n;
  } else {
    const uint64_t skip = o - pa * kPage;
    *got = below > skip ? std::min<size_t>(n, below - skip) : 0;
  }
  unpin();
  return Status::Ok();
}

void CacheFilter::keep_pages(uint64_t b, uint32_t slot, PageMask fill, uint32_t pa, uint32_t pe,
                             const uint8_t* bytes) {
  Status s = Status::Ok();
  for (uint32_t p = pa; s.ok() && p < pe;) {
    if (!fill.test(p)) {
      ++p;
      continue;
    }
    uint32_t q = p;
    while (q < pe && fill.test(q)) ++q;
    s = store_->write(slot, b, p * kPage, bytes + size_t(p - pa) * kPage, size_t(q - p) * kPage);
    p = q;
  }
  bool record_failed = false;
  if (s.ok()) {
    {
      std::lock_guard<RwLock> g(mu_);
      for (uint32_t p = pa; p < pe; ++p)
        if (fill.test(p) && !meta_[slot].valid.test(p)) {
          meta_[slot].valid.set(p);
          valid_pages_.fetch_add(1, std::memory_order_relaxed);
        }
    }
    s = persist(slot);
    record_failed = !s.ok();
  }
  if (s.ok()) return;
  if (record_failed) records_failed(std::string("write failed: ") + std::strerror(s.err));
  else degrade(std::string("write failed: ") + std::strerror(s.err));
  std::lock_guard<RwLock> g(mu_);
  for (uint32_t p = pa; p < pe; ++p)
    if (fill.test(p) && meta_[slot].valid.test(p) && !meta_[slot].dirty.test(p)) {
      meta_[slot].valid.clear_range(p, p + 1);
      valid_pages_.fetch_sub(1, std::memory_order_relaxed);
    }
}

// ---- reads sent below with the request's Deferrer (see ReadFlight in cache_filter.h) --------

struct CacheFilter::ReadPart {
  uint64_t block = 0;
  uint32_t slot = kNoSlot;  // pinned while the read is below; kNoSlot: the block is not filled
  bool fresh = false;       // the slot was given to the block for this read
  bool fill = false;        // no write of the block was in flight below when the read went
  uint64_t gen = 0;         // the slot's then: a write into the block since has bumped it
  uint32_t pa = 0, pe = 0;  // the block's pages the read covers (whole: it is page-aligned)
  size_t at = 0;            // where page pa starts in the request's buffer
  // Its pages that were dirty when the read went below: newer than what comes up, laid over
  // it from the slot (which holds them, or newer bytes, while pinned: destaged pages stay).
  PageMask dirty;
};

struct CacheFilter::ReadFlight final : Then {
  static constexpr size_t kInline = 8;  // a read of up to 8 blocks without a second allocation
  CacheFilter* f = nullptr;
  uint64_t stripes = 0;  // its blocks' (cache::stripe_mask), taken in ascending order
  bool wb = false;       // write-back: zeros past below's end, and the whole length is answered
  size_t len = 0, count = 0;
  ReadPart inline_parts[kInline];
  std::unique_ptr<ReadPart[]> more;  // when count > kInline
  ReadPart* parts() { return more ? more.get() : inline_parts; }

  // On the thread that completed the read below (or its worker): data is the read's buffer.
  Status then(Status s, void* data, size_t* got) override {
    CacheFilter* const c = f;
    s = c->read_done(this, s, static_cast<uint8_t*>(data), got);
    delete this;
    return s;
  }
};

bool CacheFilter::read_deferred(const Io& io, uint8_t* dst, size_t len, uint64_t off, bool bypass, bool check_hit,
                                size_t* got, Status* out, bool* carry) {
  const uint64_t bs = p_.block, fb = off / bs, lb = (off + len - 1) / bs;
  const size_t count = static_cast<size_t>(lb - fb + 1);
  auto pages_of = [&](uint64_t b, uint32_t* pa, uint32_t* pe) {
    const uint64_t base = b * bs, pos = std::max(off, base), stop = std::min(off + len, base + bs);
    *pa = static_cast<uint32_t>((pos - base) / kPage);
    *pe = static_cast<uint32_t>((stop - base + kPage - 1) / kPage);
  };
  if (check_hit) {
    // All of it cached: a hit, which read_block serves without a stripe lock.
    std::shared_lock<RwLock> g(mu_);
    bool all = true;
    for (uint64_t b = fb; b <= lb && all; ++b) {
      uint32_t pa, pe;
      pages_of(b, &pa, &pe);
      const uint32_t s = map_->find(b);
      all = s != kNoSlot && meta_[s].valid.all_in(pa, pe);
    }
    if (all) return false;
  }
  const bool aligned = off % kPage == 0 && len % kPage == 0;
  std::unique_ptr<ReadFlight> rf(new (std::nothrow) ReadFlight);
  if (!rf) return false;
  if (count > ReadFlight::kInline) {
    rf->more.reset(new (std::nothrow) ReadPart[count]);
    if (!rf->more) return false;
  }
  rf->f = this;
  rf->stripes = cache::stripe_mask(fb, lb);
  rf->len = len;
  rf->count = count;
  ReadPart* const k = rf->parts();
  {
    std::array<std::unique_lock<std::mutex>, kStripes> held;
    lock_stripes(rf->stripes, &held);
    if (passthrough_.load()) return false;  // failover() finished meanwhile: read() passes it down
    rf->wb = write_back();  // under the stripes, which reconfigure() holds to change the mode
    bool ok = true;
    {
      std::lock_guard<RwLock> g(mu_);
      for (size_t i = 0; i < count && ok; ++i) {
        ReadPart& p = k[i];
        p.block = fb + i;
        pages_of(p.block, &p.pa, &p.pe);
        p.at = static_cast<size_t>(p.block * bs + p.pa * kPage - off);
        p.slot = map_->hit(p.block);
        const bool slot_wanted = !bypass && !degraded_.load(std::memory_order_relaxed);
        if (!aligned && (p.slot != kNoSlot || slot_wanted)) {
          // Decided before any slot is given (a slot given and dropped unrecorded would leave
          // its record naming the block it held), so nothing here is pinned yet.
          p.slot = kNoSlot;
          ok = false;
          *carry = true;  // read_block reads the rest of its edge pages from below
          break;
        }
        if (p.slot == kNoSlot && slot_wanted) {
          p.slot = alloc_locked(p.block);
          p.fresh = p.slot != kNoSlot;
        }
        if (p.slot == kNoSlot) continue;
        map_->pin(p.slot);
        const Meta& m = meta_[p.slot];
        for (uint32_t q = p.pa; q < p.pe; ++q)
          if (m.dirty.test(q)) p.dirty.set(q);
        p.gen = m.gen;
        p.fill = !in_flight(p.block);
      }
      if (!ok) return false;  // unaligned: no part before this one has a slot
    }
    for (size_t i = 0; i < count; ++i) {
      ReadPart& p = k[i];
      (p.slot == kNoSlot && bypass ? bypasses_ : misses_).fetch_add(1, std::memory_order_relaxed);
      // A reused slot's record still names the block it held: it must name this one (with
      // nothing valid) before anything is put in it (as in read_block).
      if (!p.fresh || persist(p.slot).ok()) continue;
      records_failed("write failed while reusing a slot");
      std::lock_guard<RwLock> g(mu_);
      map_->unpin(p.slot);
      if (map_->pins(p.slot) == 0) map_->erase(p.block);
      p.slot = kNoSlot;
    }
  }
  Status s = next_->read(io, dst, len, off, got);
  if (s.deferred()) {
    io.defer->then(rf.release());  // the read is below: the framework's until its hook ran
    *out = s;
    return true;
  }
  *out = read_done(rf.get(), s, dst, got);
  return true;
}

Status CacheFilter::read_done(ReadFlight* rf, Status s, uint8_t* data, size_t* got) {
  const size_t below = s.ok() ? *got : 0;
  if (s.ok() && rf->wb) {
    // As read_below: the disk's size counts dirty data past below's end (none of it here).
    if (below < rf->len) std::memset(data + below, 0, rf->len - below);
    *got = rf->len;
  }
  std::array<std::unique_lock<std::mutex>, kStripes> held;
  lock_stripes(rf->stripes, &held);
  ReadPart* const k = rf->parts();
  for (size_t i = 0; i < rf->count; ++i) {
    const ReadPart& p = k[i];
    if (p.slot == kNoSlot || !s.ok()) continue;
    for (uint32_t q = p.pa; q < p.pe; ++q) {
      if (!p.dirty.test(q)) continue;
      const Status r = store_->read(p.slot, p.block, q * kPage, data + p.at + size_t(q - p.pa) * kPage, kPage);
      if (r.ok()) continue;
      degrade(std::string("read failed: ") + std::strerror(r.err));
      s = kLost;
      break;
    }
  }
  const bool keep = s.ok() && !degraded_.load(std::memory_order_relaxed) && !passthrough_.load();
  const bool ram = !store_->persistent();
  // The pages of p to keep (mu_ held): those that came up whole and are not cached yet, and
  // none when a write of the block began since the read went below.
  auto fill_of = [&](const ReadPart& p, const Meta& m) {
    PageMask fill;
    if (m.gen != p.gen) return fill;
    for (uint32_t q = p.pa; q < p.pe; ++q)
      if (!m.valid.test(q) && p.at + size_t(q - p.pa + 1) * kPage <= below) fill.set(q);
    return fill;
  };
  for (size_t i = 0; i < rf->count; ++i) {
    const ReadPart& p = k[i];
    if (p.slot == kNoSlot) continue;
    if (keep && p.fill && !ram) {
      PageMask fill;
      {
        std::shared_lock<RwLock> g(mu_);
        fill = fill_of(p, meta_[p.slot]);
      }
      if (fill.any()) keep_pages(p.block, p.slot, fill, p.pa, p.pe, data + p.at);
    }
    std::lock_guard<RwLock> g(mu_);
    Meta& m = meta_[p.slot];
    if (keep && p.fill && ram) {
      // In RAM the pages go in under the one exclusive hold that also unpins (a copy, as a
      // hit's under the shared one): a miss then takes mu_ as often as read_block's does.
      const PageMask fill = fill_of(p, m);
      for (uint32_t q = p.pa; q < p.pe; ++q) {
        if (!fill.test(q)) continue;
        (void)store_->write(p.slot, p.block, q * kPage, data + p.at + size_t(q - p.pa) * kPage, kPage);  // memcpy
        m.valid.set(q);
        valid_pages_.fetch_add(1, std::memory_order_relaxed);
      }
    }
    map_->unpin(p.slot);
    if (p.fresh && !m.valid.any() && !m.dirty.any() && map_->pins(p.slot) == 0) map_->erase(p.block);
  }
  return s;
}

// ---- write --------------------------------------------------------------------------------

Status CacheFilter::write(const Io& io, const void* buf, size_t len, uint64_t off) {
  if (!store_ || passthrough_.load(std::memory_order_acquire)) return next_->write(io, buf, len, off);
  if (records_broken_.load()) {
    // The cache file no longer describes what it holds: set it aside before anything new
    // goes below past it (a crash would replay its older bytes over this write).
    Status s = failover();
    if (!s.ok()) return s;
    return next_->write(io, buf, len, off);
  }
  bool bypass = false;
  if (cutoff_.load(std::memory_order_relaxed)) {
    std::lock_guard<std::mutex> g(seq_mu_);
    bypass = seq_.observe(off, len, now_ns());
  }
  return write_blocks(io, static_cast<const uint8_t*>(buf), len, off, bypass);
}

Status CacheFilter::write_blocks(const Io& io, const uint8_t* src, size_t len, uint64_t off, bool bypass,
                                 bool carried) {
  const uint64_t bs = p_.block;
  const Io plain{io.direct};
  const uint32_t tag = bypass ? kBypassTag : 0;
  bool deferred = false;
  Status whole;
  bool carry = false;
  if (io.defer && len && off / bs != (off + len - 1) / bs && write_multi(io, src, len, off, bypass, &whole, &carry)) {
    // Below as one request (see MultiFlight), deferred or done.
    if (whole.deferred()) deferred = true;
    else if (!whole.ok()) return whole;
  } else {
    // A block of it would wait below: carried on this filter's threads.
    if (carry && may_defer() && offload_.take(io, true, len, off, tag)) return Status::Deferred();
    for (uint64_t pos = off; pos < off + len;) {
      const uint64_t b = pos / bs;
      const uint32_t o = static_cast<uint32_t>(pos % bs);
      const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(bs - o, off + len - pos));
      // Deferral (filter.h) goes below with a write that is one block's: the block is then
      // marked in flight until it lands, and InFlight::then finishes it (see InFlight). A
      // longer write that comes here (write_multi could not send it below whole) sends its
      // blocks below without it (one request is deferred at most once). A one-block write that
      // would wait below on this thread (write-back: an edge page read from below, a block sent
      // below with its dirty pages) is carried on this filter's threads instead, where each
      // block goes below with a Waiter, so that it holds no block lock while a throttle holds it.
      const bool single = pos == off && n == len && io.defer;
      Status s;
      if (carried) {
        Offload::Waiter w(src + (pos - off));
        size_t ignored = 0;
        s = w.wait(write_one(Io{io.direct, &w}, b, o, n, src + (pos - off), bypass), &ignored);
      } else {
        s = write_one(single ? io : plain, b, o, n, src + (pos - off), bypass, single ? &carry : nullptr);
      }
      if (carry) {
        carry = false;
        if (offload_.take(io, true, len, off, tag)) return Status::Deferred();
        s = write_one(plain, b, o, n, src + (pos - off), bypass);  // (out of memory) here after all
      }
      if (s.deferred()) {
        deferred = true;  // the only block: InFlight::then does the rest of this write's checks
        break;
      }
      if (!s.ok()) return s;
      pos += n;
    }
  }
  if (!deferred && records_broken_.load()) {
    // The device failed a record during this write: acknowledged only once the file is aside.
    Status s = failover();
    if (!s.ok()) return s;
  }
  if (write_back()) {
    grow_size(off + len);
    bool high;
    {
      std::shared_lock<RwLock> g(mu_);
      high = marks_.above_high(map_->dirty_count(), map_->slots());
    }
    if (high) kick(false);  // down to the low mark
  }
  return deferred ? Status::Deferred() : Status::Ok();
}

// ---- writes in flight below (see InFlight in cache_filter.h) --------------------------------

struct CacheFilter::InFlight final : Then {
  CacheFilter* f = nullptr;
  uint64_t block = 0;
  bool through = false;  // write_block's (then() finishes it); else a write-back bypass
  uint32_t o = 0, n = 0, slot = kNoSlot;
  bool cache_it = false, record_failed = false;
  Status st;
  uint64_t gen = 0;
  InFlight* next = nullptr;  // in f->inflight_[stripe], under the stripe
  size_t at = 0;             // a MultiFlight's: where the block's bytes start in the request's

  // On the thread that completed the write below (or its worker): data is the write's bytes
  // (the framework's copy; this one block's: a longer write is a MultiFlight).
  Status then(Status s, void* data, size_t*) override {
    CacheFilter* const c = f;
    const bool was_through = through;
    {
      std::lock_guard<std::mutex> sl(c->stripe(block));
      c->unlist(this);
      if (through)
        s = c->write_block_done(s, block, o, n, static_cast<const uint8_t*>(data), slot, cache_it, st, record_failed,
                                gen);
    }
    delete this;
    // Landed below after the last sync may have cleared the flag: the next sync must sync below.
    if (!was_through && s.ok()) c->below_unsynced_.store(true, std::memory_order_relaxed);
    // As write(): a record the device failed meanwhile is set aside before the write is acknowledged.
    if (s.ok() && c->records_broken_.load()) s = c->failover();
    return s;
  }
};

struct CacheFilter::MultiFlight final : Then {
  static constexpr size_t kInline = 16;  // 1 MiB of 64 KiB blocks without a second allocation
  CacheFilter* f = nullptr;
  uint64_t stripes = 0;  // its blocks' (cache::stripe_mask), taken in ascending order
  bool through = false;  // write-through/-around blocks (finished as write_block's); else bypasses
  size_t count = 0;
  InFlight inline_blocks[kInline];
  std::unique_ptr<InFlight[]> more;  // when count > kInline
  InFlight* blocks() { return more ? more.get() : inline_blocks; }

  // As InFlight::then, for every block of the write: data is the whole write's bytes.
  Status then(Status s, void* data, size_t*) override {
    CacheFilter* const c = f;
    const bool was_through = through;
    {
      std::array<std::unique_lock<std::mutex>, kStripes> held;
      c->lock_stripes(stripes, &held);
      s = c->multi_done(this, s, static_cast<const uint8_t*>(data));
    }
    delete this;
    if (!was_through && s.ok()) c->below_unsynced_.store(true, std::memory_order_relaxed);
    if (s.ok() && c->records_broken_.load()) s = c->failover();
    return s;
  }
};

void CacheFilter::lock_stripes(uint64_t mask, std::array<std::unique_lock<std::mutex>, kStripes>* held) {
  for (int i = 0; i < kStripes; ++i)
    if (mask >> i & 1) (*held)[i] = std::unique_lock<std::mutex>(stripes_[i]);
}

void CacheFilter::unlock_stripes(std::array<std::unique_lock<std::mutex>, kStripes>* held) {
  for (auto& h : *held)
    if (h.owns_lock()) h.unlock();
}

Status CacheFilter::multi_done(MultiFlight* mf, Status s, const uint8_t* data) {
  InFlight* const k = mf->blocks();
  // Out of the lists first: two blocks of this write in one stripe must not keep each other
  // "in flight" (a fill waits only for other writes).
  for (size_t i = 0; i < mf->count; ++i) unlist(&k[i]);
  if (!mf->through) return s;
  for (size_t i = 0; i < mf->count; ++i)
    (void)write_block_done(s, k[i].block, k[i].o, k[i].n, data ? data + k[i].at : nullptr, k[i].slot, k[i].cache_it,
                           k[i].st, k[i].record_failed, k[i].gen);
  return s;  // as write_block: a cache failure is not the guest's (the data is below)
}

bool CacheFilter::write_multi(const Io& io, const uint8_t* src, size_t len, uint64_t off, bool bypass, Status* out,
                              bool* carry) {
  const uint64_t bs = p_.block, fb = off / bs, lb = (off + len - 1) / bs;
  const size_t count = static_cast<size_t>(lb - fb + 1);
  const uint64_t mask = cache::stripe_mask(fb, lb);
  std::array<std::unique_lock<std::mutex>, kStripes> held;
  lock_stripes(mask, &held);
  if (passthrough_.load()) {  // failover() finished meanwhile
    *out = next_->write(io, src, len, off);
    return true;
  }
  // Read under the stripes, as write_one does: every block of the write in one mode.
  const cache::Mode mode = mode_.load(std::memory_order_acquire);
  const bool wb = mode == cache::Mode::WriteBack;
  if (wb) {
    // Write-back sends a block below only when it has no slot and gets none (a stream, a
    // failed device, a write of it in flight, or every slot dirty): whole below only when
    // that holds for every block; otherwise block by block (see register_cache).
    std::shared_lock<RwLock> g(mu_);
    const bool full = map_->dirty_count() >= map_->slots();
    const bool no_slots = bypass || full || degraded_.load(std::memory_order_relaxed);
    bool whole = true;
    for (uint64_t b = fb; b <= lb; ++b)
      if (map_->find(b) != kNoSlot || !(no_slots || in_flight(b))) whole = false;
    if (!whole) {
      // Block by block: carried on this filter's threads when a block of it would go below.
      if (may_defer())
        for (uint64_t b = fb; b <= lb && !*carry; ++b) {
          const uint64_t pos = std::max(off, b * bs);
          const uint32_t o = static_cast<uint32_t>(pos - b * bs);
          *carry = wb_touches_below_locked(b, o, static_cast<uint32_t>(std::min<uint64_t>(bs - o, off + len - pos)),
                                           bypass, false);
        }
      return false;
    }
  }
  std::unique_ptr<MultiFlight> mf(new (std::nothrow) MultiFlight);
  if (!mf) return false;  // block by block, on this thread
  if (count > MultiFlight::kInline) {
    mf->more.reset(new (std::nothrow) InFlight[count]);
    if (!mf->more) return false;
  }
  mf->f = this;
  mf->stripes = mask;
  mf->through = !wb;
  mf->count = count;
  InFlight* const k = mf->blocks();
  for (size_t i = 0; i < count; ++i) {
    const uint64_t b = fb + i, pos = std::max(off, b * bs);
    k[i].f = this;
    k[i].block = b;
    k[i].o = static_cast<uint32_t>(pos - b * bs);
    k[i].n = static_cast<uint32_t>(std::min<uint64_t>(bs - k[i].o, off + len - pos));
    k[i].at = static_cast<size_t>(pos - off);
    if (wb) bypasses_.fetch_add(1, std::memory_order_relaxed);
    else through_begin(&k[i], bypass, mode);
    InFlight*& head = inflight_[stripe_index(b)];
    k[i].next = head;
    head = &k[i];
  }
  if (wb) below_unsynced_.store(true, std::memory_order_relaxed);
  Status s = next_->write(io, src, len, off);
  if (s.deferred()) {
    io.defer->then(mf.release());  // the write is below: the framework's until its hook ran
    *out = s;
    return true;
  }
  *out = multi_done(mf.get(), s, src);
  return true;
}

Status CacheFilter::write_down(const Io& io, InFlight* fl, const uint8_t* src, uint32_t n, uint64_t at) {
  if (!fl) return next_->write(io, src, n, at);
  InFlight*& head = inflight_[stripe_index(fl->block)];
  fl->next = head;
  head = fl;
  Status s = next_->write(io, src, n, at);
  if (s.deferred()) {
    io.defer->then(fl);  // the write is below: fl is the framework's until it has run
    return s;
  }
  unlist(fl);
  return s;
}

bool CacheFilter::in_flight(uint64_t b) const {
  for (const InFlight* f = inflight_[stripe_index(b)]; f; f = f->next)
    if (f->block == b) return true;
  return false;
}

bool CacheFilter::wb_touches_below_locked(uint64_t b, uint32_t o, uint32_t n, bool bypass, bool whole) const {
  const bool partial = o % kPage || n % kPage;
  const uint32_t slot = map_->find(b);
  const bool busy = in_flight(b);
  if (slot == kNoSlot) {
    // Straight below (no slot for it) goes with the request's Deferrer when it is the whole
    // request, else on this thread; a fresh slot has no valid page, so a write that covers
    // part of one reads the rest from below.
    const bool gets_slot = !bypass && !busy && !degraded_.load(std::memory_order_relaxed) &&
                           map_->dirty_count() < map_->slots();
    return gets_slot ? partial : !whole;
  }
  if (busy || degraded_.load(std::memory_order_relaxed)) return true;  // evacuate() sends it below
  if (!partial) return false;
  const Meta& m = meta_[slot];
  const uint32_t pa = o / kPage, pe = (o + n + kPage - 1) / kPage;
  return (o % kPage && !m.valid.test(pa)) || ((o + n) % kPage && !m.valid.test(pe - 1));
}

void CacheFilter::unlist(InFlight* fl) {
  InFlight** link = &inflight_[stripe_index(fl->block)];
  while (*link && *link != fl) link = &(*link)->next;
  if (*link) *link = fl->next;
  fl->next = nullptr;
}

Status CacheFilter::write_one(const Io& io, uint64_t b, uint32_t o, uint32_t n, const uint8_t* src, bool bypass,
                             bool* carry) {
  std::lock_guard<std::mutex> sl(stripe(b));
  if (passthrough_.load()) return next_->write(io, src, n, b * p_.block + o);  // failover() finished meanwhile
  // Read under the stripe: reconfigure() changes the mode holding every stripe, so a block's
  // write is all in one mode.
  const cache::Mode mode = mode_.load(std::memory_order_acquire);
  if (carry && mode == cache::Mode::WriteBack && may_defer()) {
    std::shared_lock<RwLock> g(mu_);
    if (wb_touches_below_locked(b, o, n, bypass, true)) {
      *carry = true;  // nothing done: the caller carries the write on this filter's threads
      return Status::Ok();
    }
  }
  return mode == cache::Mode::WriteBack ? write_back_block(io, b, o, n, src, bypass)
                                        : write_block(io, b, o, n, src, bypass, mode);
}

// write-through and write-around (stripe held)
Status CacheFilter::write_block(const Io& io, uint64_t b, uint32_t o, uint32_t n, const uint8_t* src, bool bypass,
                                cache::Mode mode) {
  InFlight prep;
  prep.f = this;
  prep.block = b;
  prep.o = o;
  prep.n = n;
  through_begin(&prep, bypass, mode);
  // With the request's Deferrer the write goes below marked in flight (see InFlight).
  std::unique_ptr<InFlight> fl(io.defer ? new (std::nothrow) InFlight(prep) : nullptr);
  Status s = write_down(fl ? io : Io{io.direct}, fl.get(), src, n, b * p_.block + o);
  if (s.deferred() && fl) {
    (void)fl.release();  // InFlight::then finishes the write when it has landed
    return s;
  }
  return write_block_done(s, b, o, n, src, prep.slot, prep.cache_it, prep.st, prep.record_failed, prep.gen);
}

void CacheFilter::through_begin(InFlight* fl, bool bypass, cache::Mode mode) {
  const uint64_t b = fl->block;
  const uint32_t o = fl->o, n = fl->n;
  const uint32_t pa = o / kPage, pe = (o + n + kPage - 1) / kPage;
  const uint32_t fa = (o + kPage - 1) / kPage, fe = (o + n) / kPage;  // pages covered whole
  const bool cache_it =
      mode == cache::Mode::WriteThrough && !bypass && fa < fe && !degraded_.load(std::memory_order_relaxed);
  uint32_t slot;
  uint64_t gen = 0;
  {
    std::lock_guard<RwLock> g(mu_);
    slot = map_->find(b);
    if (slot == kNoSlot && cache_it) slot = alloc_locked(b);
    if (slot != kNoSlot) {
      // The pages this write touches are stale in the cache from now on.
      uint32_t dropped = 0;
      for (uint32_t p = pa; p < pe; ++p)
        if (meta_[slot].valid.test(p)) ++dropped;
      meta_[slot].valid.clear_range(pa, pe);
      valid_pages_.fetch_sub(dropped, std::memory_order_relaxed);
      if (dropped) invalidations_.fetch_add(1, std::memory_order_relaxed);
      gen = ++meta_[slot].gen;
      map_->pin(slot);
    } else if (bypass) {
      bypasses_.fetch_add(1, std::memory_order_relaxed);
    }
  }
  // The record says so before the bytes below change: a crash in between must not leave a
  // record that vouches for the old bytes.
  const Status st = slot != kNoSlot ? persist(slot) : Status::Ok();
  fl->through = true;
  fl->slot = slot;
  fl->cache_it = cache_it;
  fl->st = st;
  fl->record_failed = !st.ok();
  fl->gen = gen;
}

Status CacheFilter::write_block_done(Status s, uint64_t b, uint32_t o, uint32_t n, const uint8_t* src, uint32_t slot,
                                     bool cache_it, Status st, bool record_failed, uint64_t gen) {
  const uint32_t fa = (o + kPage - 1) / kPage, fe = (o + n) / kPage;  // pages covered whole
  // Fill only while the cache and below agree on the order: no other write of the block is in
  // flight below (it might land after this one) and none began since (gen), nor a failover.
  bool fill = s.ok() && st.ok() && slot != kNoSlot && cache_it && !in_flight(b) && !passthrough_.load();
  if (fill) {
    std::shared_lock<RwLock> g(mu_);
    fill = meta_[slot].gen == gen;
  }
  if (fill) {
    st = store_->write(slot, b, fa * kPage, src + (fa * kPage - o), size_t(fe - fa) * kPage);
    if (st.ok()) {
      {
        std::lock_guard<RwLock> g(mu_);
        meta_[slot].valid.set_range(fa, fe);
        valid_pages_.fetch_add(fe - fa, std::memory_order_relaxed);
      }
      st = persist(slot);
      record_failed = !st.ok();
    }
  }
  if (slot == kNoSlot) return s;
  // A record that could not be written may still vouch for the old bytes: write() sets the
  // file aside before it acknowledges.
  if (record_failed) records_failed(std::string("write failed: ") + std::strerror(st.err));
  else if (!st.ok()) degrade(std::string("write failed: ") + std::strerror(st.err));
  std::lock_guard<RwLock> g(mu_);
  if (!st.ok()) {
    valid_pages_.fetch_sub(meta_[slot].valid.count(), std::memory_order_relaxed);
    meta_[slot].valid = PageMask{};
  }
  map_->unpin(slot);
  if (!meta_[slot].valid.any() && !meta_[slot].dirty.any() && map_->pins(slot) == 0) map_->erase(b);
  return s;  // a cache failure is not the guest's: the data is below
}

Status CacheFilter::write_back_block(const Io& io, uint64_t b, uint32_t o, uint32_t n, const uint8_t* src,
                                     bool bypass) {
  const uint64_t base = b * p_.block;
  const Io plain{io.direct};  // io may carry a Deferrer: only the bypass below passes it on
  // A write of this block still in flight below (see InFlight) may land after anything this
  // one would cache: it goes below too (or, if the block has a slot, takes it out of the cache).
  const bool busy = in_flight(b);
  uint32_t slot;
  bool fresh = false;
  PageMask valid;
  {
    std::lock_guard<RwLock> g(mu_);
    slot = map_->find(b);
    if (slot == kNoSlot && !bypass && !busy && !degraded_.load(std::memory_order_relaxed)) {
      slot = alloc_locked(b);
      fresh = slot != kNoSlot;
    }
    if (slot != kNoSlot) {
      map_->pin(slot);
      valid = meta_[slot].valid;
    }
  }
  if (slot == kNoSlot) {
    // Not cached and no room (or a sequential stream, or a failed device): straight below.
    bypasses_.fetch_add(1, std::memory_order_relaxed);
    below_unsynced_.store(true, std::memory_order_relaxed);
    std::unique_ptr<InFlight> fl(io.defer ? new (std::nothrow) InFlight : nullptr);
    if (fl) {
      fl->f = this;
      fl->block = b;
    }
    Status s = write_down(fl ? io : plain, fl.get(), src, n, base + o);
    if (s.deferred() && fl) (void)fl.release();  // InFlight::then when it has landed
    return s;
  }
  // A degraded device takes nothing new: the block goes below with its dirty pages and leaves.
  if (busy || degraded_.load(std::memory_order_relaxed)) return evacuate(plain, b, slot, o, n, src);
  const uint32_t pa = o / kPage, pe = (o + n + kPage - 1) / kPage;
  const size_t span = size_t(pe - pa) * kPage;
  const uint8_t* data = src;
  Status s = Status::Ok();
  if (o % kPage || n % kPage) {
    // Edge pages: the rest of their bytes from the cache if valid there, else from below.
    uint8_t* tmp = scratch(1, span);
    if (!tmp) {
      std::lock_guard<RwLock> g(mu_);
      map_->unpin(slot);
      return kNoBuffer;
    }
    const bool head = o % kPage != 0, tail = (o + n) % kPage != 0;
    uint32_t edges[2];
    int ne = 0;
    if (head) edges[ne++] = pa;
    if (tail && !(head && pe - 1 == pa)) edges[ne++] = pe - 1;
    for (int e = 0; e < ne; ++e) {
      const uint32_t p = edges[e];
      uint8_t* at = tmp + size_t(p - pa) * kPage;
      if (valid.test(p)) {
        s = store_->read(slot, b, p * kPage, at, kPage);
      } else {
        size_t g = 0;
        s = read_below(plain, at, kPage, base + p * kPage, &g);
      }
      if (!s.ok()) break;
    }
    if (!s.ok() && valid.any()) {
      // The cached copy of an edge page cannot be read: below gets the block (evacuate reads
      // only its dirty pages, and fails only if one of those cannot be read).
      degrade(std::string("read failed: ") + std::strerror(s.err));
      return evacuate(plain, b, slot, o, n, src);
    }
    if (!s.ok()) {
      std::lock_guard<RwLock> g(mu_);
      map_->unpin(slot);
      return s;
    }
    std::memcpy(tmp + (o - pa * kPage), src, n);
    data = tmp;
  }
  bool record_failed = false;
  if (fresh) {
    s = persist(slot);  // the slot's old record must not outlive its old data
    record_failed = !s.ok();
  }
  if (s.ok()) s = store_->write(slot, b, pa * kPage, data, span);
  if (s.ok()) {
    {
      std::lock_guard<RwLock> g(mu_);
      Meta& m = meta_[slot];
      for (uint32_t p = pa; p < pe; ++p) {
        if (!m.valid.test(p)) valid_pages_.fetch_add(1, std::memory_order_relaxed);
        if (!m.dirty.test(p)) dirty_pages_.fetch_add(1, std::memory_order_relaxed);
      }
      m.valid.set_range(pa, pe);
      m.dirty.set_range(pa, pe);
      ++m.gen;
      map_->set_dirty(slot, true);
      grow_size(base + o + n);
    }
    s = persist(slot);  // acknowledged only once the record says so
    if (s.ok()) {
      std::lock_guard<RwLock> g(mu_);
      map_->unpin(slot);
      return Status::Ok();
    }
    record_failed = true;
  }
  if (record_failed) records_failed(std::string("write failed: ") + std::strerror(s.err));
  else degrade(std::string("write failed: ") + std::strerror(s.err));
  return evacuate(plain, b, slot, o, n, src);
}

Status CacheFilter::evacuate(const Io& io, uint64_t b, uint32_t slot, uint32_t o, uint32_t n, const uint8_t* src) {
  wait_destaged(b, b);  // older bytes of the block on their way below land first
  const uint64_t base = b * p_.block;
  const uint32_t fa = (o + kPage - 1) / kPage, fe = (o + n) / kPage;  // pages the write covers whole
  PageMask dirty;
  {
    std::lock_guard<RwLock> g(mu_);
    dirty = meta_[slot].dirty;
  }
  // The block's dirty pages first (a page the write covers in part is completed by them),
  // then the write on top; synced, so the record may then forget them.
  Status s = Status::Ok();
  uint8_t* page = nullptr;
  for (uint32_t p = 0; s.ok() && p < pages(); ++p) {
    if (!dirty.test(p) || (p >= fa && p < fe)) continue;
    if (!page) page = scratch(1, kPage);
    if (!page) s = kNoBuffer;
    else if (!store_->read(slot, b, p * kPage, page, kPage).ok()) s = kLost;
    else s = pages_below(io, page, kPage, base + p * kPage, disk_end());
  }
  if (s.ok()) s = next_->write(io, src, n, base + o);
  if (s.ok()) {
    if (dirty.any()) s = next_->sync(io, false);
    else below_unsynced_.store(true, std::memory_order_relaxed);
  }
  cache::Record r;
  {
    std::lock_guard<RwLock> g(mu_);
    map_->unpin(slot);
    if (!s.ok()) return s;  // the block stays as it was (dirty in the cache)
    Meta& m = meta_[slot];
    valid_pages_.fetch_sub(m.valid.count(), std::memory_order_relaxed);
    dirty_pages_.fetch_sub(m.dirty.count(), std::memory_order_relaxed);
    m.valid = PageMask{};
    m.dirty = PageMask{};
    ++m.gen;
    map_->set_dirty(slot, false);
    r = record_locked(slot);  // an empty record: the block is gone from the cache
    if (map_->pins(slot) == 0) map_->erase(b);
  }
  if (store_->persistent() && !records_broken_.load() && !store_->put_record(r).ok()) {
    // The data is below, but the file still names it dirty: a later open would destage older
    // bytes over it. write() sets the file aside (failover) before it acknowledges.
    records_failed("write failed: cannot update a record");
  }
  return Status::Ok();
}

// ---- destage ------------------------------------------------------------------------------

Status CacheFilter::destage_pass(size_t max_blocks, size_t* cleaned) {
  *cleaned = 0;
  if (!store_ || !write_back()) return Status::Ok();
  std::lock_guard<std::mutex> dg(destage_mu_);
  struct Item {
    uint64_t block;
    uint32_t slot;
    uint64_t gen;
    PageMask dirty;
  };
  std::vector<Item> items;
  {
    std::lock_guard<RwLock> g(mu_);
    const size_t n = map_->slots();
    for (size_t i = 0; i < n && items.size() < max_blocks; ++i) {
      const uint32_t s = static_cast<uint32_t>((cursor_ + i) % n);
      if (map_->dirty(s)) items.push_back(Item{map_->block_of(s), s, 0, {}});
    }
    cursor_ = items.empty() ? cursor_ : (items.back().slot + 1) % n;
  }
  if (items.empty()) return Status::Ok();
  uint8_t* buf = nullptr;
  uint64_t bytes = 0;
  // The dirty runs of one block: [first page, end page).
  std::vector<std::pair<uint32_t, uint32_t>> runs;
  for (Item& it : items) {
    Status s = Status::Ok();
    {
      // Under the stripe: what is dirty, and its bytes, read out of the store.
      std::lock_guard<std::mutex> sl(stripe(it.block));
      {
        std::lock_guard<RwLock> g(mu_);
        if (map_->find(it.block) != it.slot) {
          it.slot = kNoSlot;
          continue;
        }
        it.gen = meta_[it.slot].gen;
        it.dirty = meta_[it.slot].dirty;
        map_->pin(it.slot);
      }
      runs.clear();
      for (uint32_t p = 0; p < pages();) {
        if (!it.dirty.test(p)) {
          ++p;
          continue;
        }
        uint32_t q = p;
        while (q < pages() && it.dirty.test(q)) ++q;
        runs.emplace_back(p, q);
        p = q;
      }
      if (!buf) buf = scratch(1, p_.block);
      if (!buf) s = kNoBuffer;
      for (size_t r = 0; s.ok() && r < runs.size(); ++r) {
        const auto [p, q] = runs[r];
        s = store_->read(it.slot, it.block, p * kPage, buf + size_t(p) * kPage, size_t(q - p) * kPage);
        if (!s.ok()) {
          degrade(std::string("read failed: ") + std::strerror(s.err));
          spdlog::error("{}: cache: dirty data of block {} cannot be read from {}", info_.path, it.block, store_path_);
          s = kLost;
        }
      }
      if (s.ok()) begin_destage(it.block);
    }
    // Below without the stripe: a throttle there may hold this write, and the block's other
    // requests go on meanwhile. A write of the block into the cache changes its gen (so it
    // stays dirty, below); what would send the block's bytes below waits (wait_destaged).
    const uint64_t end = runs.empty() ? 0 : disk_end();
    for (size_t r = 0; s.ok() && r < runs.size(); ++r) {
      const auto [p, q] = runs[r];
      const size_t len = size_t(q - p) * kPage;
      s = pages_below(Io{}, buf + size_t(p) * kPage, len, it.block * p_.block + uint64_t(p) * kPage, end);
      bytes += len;
    }
    end_destage();
    {
      std::lock_guard<RwLock> g(mu_);
      map_->unpin(it.slot);
    }
    if (!s.ok()) return s;
  }
  // Below holds it for good before the cache forgets it is dirty.
  Status s = next_->sync(Io{}, false);
  if (!s.ok()) return s;
  for (Item& it : items) {
    if (it.slot == kNoSlot) continue;
    std::lock_guard<std::mutex> sl(stripe(it.block));
    cache::Record r;
    {
      std::lock_guard<RwLock> g(mu_);
      if (map_->find(it.block) != it.slot || meta_[it.slot].gen != it.gen) continue;  // written meanwhile
      Meta& m = meta_[it.slot];
      dirty_pages_.fetch_sub(m.dirty.count(), std::memory_order_relaxed);
      m.dirty = PageMask{};
      r = record_locked(it.slot);
    }
    // A device that refuses records: the data is below and synced, so the map may call the
    // block clean; the file, still naming it dirty with the same bytes, is set aside by
    // failover() before anything newer is acknowledged.
    if (store_->persistent() && !records_broken_.load()) {
      s = store_->put_record(r);
      if (!s.ok()) records_failed(std::string("write failed: ") + std::strerror(s.err));
    }
  }
  // The clean records are durable before their slots may be reused.
  if (!records_broken_.load()) {
    s = store_->sync();
    if (!s.ok()) records_failed(std::string("sync failed: ") + std::strerror(s.err));
  }
  std::lock_guard<RwLock> g(mu_);
  for (Item& it : items) {
    if (it.slot == kNoSlot || map_->find(it.block) != it.slot) continue;
    if (!meta_[it.slot].dirty.any()) {
      map_->set_dirty(it.slot, false);
      ++*cleaned;
    }
  }
  destaged_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  rate_.add(bytes, now_ns());
  return Status::Ok();
}

void CacheFilter::begin_destage(uint64_t block) {
  std::lock_guard<std::mutex> g(dst_mu_);
  destaging_ = block;
}

void CacheFilter::end_destage() {
  {
    std::lock_guard<std::mutex> g(dst_mu_);
    if (destaging_ == kNoBlock) return;
    destaging_ = kNoBlock;
  }
  dst_cv_.notify_all();
}

void CacheFilter::wait_destaged(uint64_t first, uint64_t last) {
  std::unique_lock<std::mutex> g(dst_mu_);
  dst_cv_.wait(g, [&] { return destaging_ == kNoBlock || destaging_ < first || destaging_ > last; });
}

Status CacheFilter::drain() {
  if (!store_ || passthrough_.load()) return Status::Ok();
  if (records_broken_.load()) return failover();
  if (!write_back()) return Status::Ok();
  Status s = drain_dirty();
  if (!s.ok()) return s;
  if (records_broken_.load()) return failover();  // the device failed while draining
  below_unsynced_.store(false);
  return Status::Ok();
}

Status CacheFilter::drain_dirty() {
  for (int round = 0;; ++round) {
    {
      std::lock_guard<RwLock> g(mu_);
      if (map_->dirty_count() == 0) break;
    }
    size_t n = 0;
    Status s = destage_pass(256, &n);
    if (!s.ok()) return s;
    if (round > 1000000) return Status::Error(EBUSY, "cache: dirty data keeps coming while draining");
  }
  return Status::Ok();
}

void CacheFilter::records_failed(const std::string& why) {
  degrade(why);
  if (!records_broken_.exchange(true)) {
    spdlog::error("{}: cache: {} no longer takes record updates: its dirty data goes below, then the file is set "
                  "aside",
                  info_.path, store_path_);
    kick();
  }
}

Status CacheFilter::failover() {
  std::lock_guard<std::mutex> fg(failover_mu_);
  if (passthrough_.load()) return Status::Ok();
  for (;;) {
    Status s = write_back() ? drain_dirty() : Status::Ok();
    if (!s.ok()) return s;
    // No request inside a block (every stripe) and the map still: nothing dirty may be left.
    std::array<std::unique_lock<std::mutex>, kStripes> held;
    for (int i = 0; i < kStripes; ++i) held[i] = std::unique_lock<std::mutex>(stripes_[i]);
    std::lock_guard<RwLock> g(mu_);
    if (map_->dirty_count() > 0) continue;
    // Every acknowledged write is below (synced by the destage passes). The file may still
    // name dirty blocks, with the bytes below or older ones: set it aside so no open replays it.
    std::string how;
    s = store_->retire(&how);
    if (!s.ok()) {
      spdlog::error("{}: cache: {} cannot be set aside ({}); writes fail until it can",
                    info_.path, store_path_, s.what ? s.what : std::strerror(s.err));
      return kRecordsFail;
    }
    for (Meta& m : meta_) {
      m.valid = PageMask{};
      m.dirty = PageMask{};
      ++m.gen;
    }
    valid_pages_.store(0);
    dirty_pages_.store(0);
    passthrough_.store(true);
    spdlog::warn("{}: cache: every dirty block is below; {}; the disk runs without its cache until it reopens",
                 info_.path, how);
    return Status::Ok();
  }
}

// ---- the rest of the data path ------------------------------------------------------------

Status CacheFilter::sync(const Io& io, bool datasync) {
  if (!store_ || passthrough_.load()) return next_->sync(io, datasync);
  if (records_broken_.load()) {
    Status s = failover();
    if (!s.ok()) return s;
    return next_->sync(io, datasync);
  }
  if (!write_back()) return next_->sync(io, datasync);
  Status s = store_->sync();
  if (!s.ok()) {
    // What was acknowledged may not be durable on the device: write it all below instead.
    records_failed(std::string("sync failed: ") + std::strerror(s.err));
    s = failover();
    if (!s.ok()) return s;
    return next_->sync(io, datasync);
  }
  if (below_unsynced_.exchange(false)) {
    s = next_->sync(io, datasync);
    if (!s.ok()) below_unsynced_.store(true);
  }
  return s;
}

Status CacheFilter::drop_range_locked(uint64_t off, uint64_t end, bool all_dirty) {
  if (end <= off) return Status::Ok();
  const uint64_t fb = off / p_.block, lb = (end - 1) / p_.block;
  struct Edge {
    uint64_t block;
    uint32_t slot, page, from, to;  // zeros over [from, to) of the page
  };
  std::vector<uint32_t> touched;  // slots whose record changes
  std::vector<Edge> edges;        // dirty pages the range covers in part
  bool forgot_dirty = false;
  bool dirty_records = false;  // a record about dirty pages changes: the store is synced after
  {
    std::lock_guard<RwLock> g(mu_);
    for (uint32_t s = 0; s < map_->slots(); ++s) {
      if (map_->queue_of(s) == cache::BlockMap::Queue::Free) continue;
      const uint64_t b = map_->block_of(s);
      Meta& m = meta_[s];
      if (b < fb || b > lb) {
        if (all_dirty && m.dirty.any()) {
          touched.push_back(s);  // its record names the old size
          dirty_records = true;
        }
        continue;
      }
      const uint64_t base = b * p_.block;
      const uint32_t pa = static_cast<uint32_t>(off > base ? (off - base) / kPage : 0);
      const uint32_t pe = static_cast<uint32_t>(std::min<uint64_t>(pages(), (end - base + kPage - 1) / kPage));
      bool changed = false;
      for (uint32_t p = pa; p < pe; ++p) {
        const uint64_t ps = base + uint64_t(p) * kPage;
        const uint64_t a = std::max(off, ps), e = std::min(end, ps + kPage);
        if (a == ps && e == ps + kPage) {  // covered whole: below now holds what the page would
          if (m.valid.test(p)) valid_pages_.fetch_sub(1, std::memory_order_relaxed);
          if (m.dirty.test(p)) {
            dirty_pages_.fetch_sub(1, std::memory_order_relaxed);
            forgot_dirty = true;
          }
          changed |= m.valid.test(p) || m.dirty.test(p);
          m.valid.clear_range(p, p + 1);
          m.dirty.clear_range(p, p + 1);
        } else if (m.dirty.test(p)) {  // its dirty bytes outside the range stay, zeros inside
          edges.push_back(Edge{b, s, p, static_cast<uint32_t>(a - ps), static_cast<uint32_t>(e - ps)});
          map_->pin(s);
        } else if (m.valid.test(p)) {
          valid_pages_.fetch_sub(1, std::memory_order_relaxed);
          m.valid.clear_range(p, p + 1);
          changed = true;
        }
      }
      ++m.gen;  // no fill of bytes from before the range changed lands (read_done, write_block_done)
      if (!m.dirty.any()) map_->set_dirty(s, false);
      if (changed) invalidations_.fetch_add(1, std::memory_order_relaxed);
      if (changed || (all_dirty && m.dirty.any())) touched.push_back(s);
      if (all_dirty && m.dirty.any()) dirty_records = true;
    }
  }
  dirty_records |= forgot_dirty || !edges.empty();
  Status s = Status::Ok();
  uint8_t* page = nullptr;
  for (const Edge& e : edges) {
    if (s.ok() && !page && !(page = scratch(1, kPage))) s = kNoBuffer;
    if (s.ok() && !store_->read(e.slot, e.block, e.page * kPage, page, kPage).ok()) {
      degrade("read failed");
      spdlog::error("{}: cache: dirty data of block {} cannot be read from {}", info_.path, e.block, store_path_);
      s = kLost;
    }
    if (s.ok()) {
      std::memset(page + e.from, 0, e.to - e.from);
      Status w = store_->write(e.slot, e.block, e.page * kPage, page, kPage);
      if (!w.ok()) {
        // The page may be torn on the device: below gets it instead, and the cache forgets it.
        degrade(std::string("write failed: ") + std::strerror(w.err));
        s = pages_below(Io{}, page, kPage, e.block * p_.block + uint64_t(e.page) * kPage, disk_end());
        if (s.ok()) {
          std::lock_guard<RwLock> g(mu_);
          Meta& m = meta_[e.slot];
          if (m.valid.test(e.page)) valid_pages_.fetch_sub(1, std::memory_order_relaxed);
          if (m.dirty.test(e.page)) dirty_pages_.fetch_sub(1, std::memory_order_relaxed);
          m.valid.clear_range(e.page, e.page + 1);
          m.dirty.clear_range(e.page, e.page + 1);
          if (!m.dirty.any()) map_->set_dirty(e.slot, false);
          forgot_dirty = true;
          touched.push_back(e.slot);
        }
      }
    }
    std::lock_guard<RwLock> g(mu_);
    map_->unpin(e.slot);
  }
  if (!s.ok()) return s;  // records still name the dirty pages: nothing acknowledged is lost
  // The records may forget dirty pages only once below holds their replacement for good.
  if (forgot_dirty) {
    s = next_->sync(Io{}, false);
    if (!s.ok()) return s;
  } else {
    below_unsynced_.store(true, std::memory_order_relaxed);
  }
  for (uint32_t slot : touched)
    if (!persist(slot).ok()) {
      records_failed("write failed while dropping blocks");
      break;
    }
  // Durable before the request is acknowledged: a later open must not replay what was dropped,
  // nor the old bytes of a page now holding zeros, nor grow the disk back. (Clean records need
  // not be: a kill loses no written record, and after a reboot clean blocks are dropped.)
  if (dirty_records && store_->persistent() && !records_broken_.load()) {
    Status y = store_->sync();
    if (!y.ok()) records_failed(std::string("sync failed: ") + std::strerror(y.err));
  }
  return Status::Ok();
}

Status CacheFilter::fallocate(const Io& io, int mode, uint64_t off, uint64_t len) {
  if (!store_ || passthrough_.load()) return next_->fallocate(io, mode, off, len);
  if (records_broken_.load()) {
    Status s = failover();
    if (!s.ok()) return s;
    return next_->fallocate(io, mode, off, len);
  }
  if (!(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE))) {
    // An allocation: the bytes stay what they are.
    Status s = next_->fallocate(io, mode, off, len);
    uint64_t below = 0;
    if (s.ok() && next_->size(&below).ok()) grow_size(below);
    return s;
  }
  const bool shifts = mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE);
  const uint64_t end = shifts ? UINT64_MAX - p_.block : off + len;
  if (len == 0 || end <= off) return next_->fallocate(io, mode, off, len);
  // Every stripe of the range, while below changes and the cache follows: no destage, fill or
  // write of the range's blocks comes between (a destage landing after the punch would bring
  // back what it punched). Nothing dirty goes below; dirty pages in the range are dropped.
  std::array<std::unique_lock<std::mutex>, kStripes> held;
  for (int attempt = 0;; ++attempt) {
    if (shifts) {
      // Everything past off moves: the cache follows only once nothing is dirty.
      Status s = drain();
      if (!s.ok()) return s;
    }
    lock_stripes(cache::stripe_mask(off / p_.block, (end - 1) / p_.block), &held);
    wait_destaged(off / p_.block, (end - 1) / p_.block);
    if (!shifts) break;
    {
      std::shared_lock<RwLock> g(mu_);
      if (map_->dirty_count() == 0) break;
    }
    unlock_stripes(&held);  // written meanwhile: drain again
    if (attempt == 100) return Status::Error(EBUSY, "cache: dirty data keeps coming before a collapse or insert");
  }
  if (passthrough_.load()) {  // failover() finished meanwhile (it holds every stripe)
    unlock_stripes(&held);
    return next_->fallocate(io, mode, off, len);
  }
  Status s = next_->fallocate(io, mode, off, len);
  if (!s.ok()) return s;  // the cache still holds what it held, dirty or not
  uint64_t below = 0;
  if (next_->size(&below).ok()) grow_size(below);
  s = drop_range_locked(off, end, false);
  if (!s.ok()) return s;
  if (records_broken_.load()) {
    unlock_stripes(&held);
    return failover();  // a record could not drop the range
  }
  return s;
}

Status CacheFilter::resize(const Io& io, uint64_t size) {
  if (!store_ || passthrough_.load()) return next_->resize(io, size);
  if (records_broken_.load()) {
    Status s = failover();
    if (!s.ok()) return s;
    return next_->resize(io, size);
  }
  // Every stripe: pages past the new end may be in any block's stripe.
  std::array<std::unique_lock<std::mutex>, kStripes> held;
  lock_stripes(~uint64_t(0), &held);
  wait_destaged(size / p_.block, UINT64_MAX);
  if (passthrough_.load()) {  // failover() finished meanwhile
    unlock_stripes(&held);
    return next_->resize(io, size);
  }
  Status s = next_->resize(io, size);
  if (!s.ok()) return s;
  const uint64_t before = size_.exchange(size);
  // Shrinking: what lay past the end is dropped (dirty too) and every dirty record is rewritten
  // with the new size, so no later open grows the disk back.
  s = drop_range_locked(size, UINT64_MAX - p_.block, size < before);
  if (!s.ok()) return s;
  if (records_broken_.load()) {
    unlock_stripes(&held);
    return failover();  // a record could not drop the range
  }
  return s;
}

void CacheFilter::grow_size(uint64_t at_least) {
  uint64_t sz = size_.load();
  while (sz < at_least && !size_.compare_exchange_weak(sz, at_least)) {
  }
}

std::vector<std::pair<uint64_t, uint64_t>> CacheFilter::dirty_runs() const {
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  {
    std::shared_lock<RwLock> g(mu_);
    for (uint32_t s = 0; s < map_->slots(); ++s) {
      if (!map_->dirty(s)) continue;
      const uint64_t base = map_->block_of(s) * p_.block;
      const PageMask& d = meta_[s].dirty;
      for (uint32_t p = 0; p < pages();) {
        if (!d.test(p)) {
          ++p;
          continue;
        }
        uint32_t q = p;
        while (q < pages() && d.test(q)) ++q;
        runs.emplace_back(base + uint64_t(p) * kPage, base + uint64_t(q) * kPage);
        p = q;
      }
    }
  }
  std::sort(runs.begin(), runs.end());
  std::vector<std::pair<uint64_t, uint64_t>> merged;
  for (const auto& r : runs) {
    if (!merged.empty() && r.first <= merged.back().second) merged.back().second = std::max(merged.back().second, r.second);
    else merged.push_back(r);
  }
  return merged;
}

Status CacheFilter::seek(const Io& io, uint64_t off, int whence, uint64_t* result) {
  if (!store_ || passthrough_.load() || !write_back() || dirty_bytes() == 0 ||
      (whence != SEEK_DATA && whence != SEEK_HOLE))
    return next_->seek(io, off, whence, result);
  // Dirty pages are data, wherever below's holes are. They are listed before below is asked:
  // a page destaged since is below by then (the destager writes it before it is clean).
  const auto runs = dirty_runs();
  uint64_t size = 0;
  Status s = this->size(&size);
  if (!s.ok()) return s;
  if (off >= size) return Status::Error(ENXIO, "cache: seek past the end");
  // The first run that ends after at.
  auto run_after = [&](uint64_t at) {
    return std::upper_bound(runs.begin(), runs.end(), at,
                            [](uint64_t v, const std::pair<uint64_t, uint64_t>& r) { return v < r.second; });
  };
  if (whence == SEEK_DATA) {
    uint64_t d = UINT64_MAX;
    auto it = run_after(off);
    if (it != runs.end()) d = std::max(off, it->first);
    uint64_t below = 0;
    s = next_->seek(io, off, SEEK_DATA, &below);
    if (s.ok()) d = std::min(d, below);
    else if (s.err != ENXIO) return s;
    if (d >= size) return Status::Error(ENXIO, "cache: no data past the offset");
    *result = d;
    return Status::Ok();
  }
  uint64_t h = off;
  for (;;) {
    auto it = run_after(h);
    if (it != runs.end() && it->first <= h) h = it->second;  // runs are merged: h is outside them now
    if (h >= size) break;
    uint64_t below = 0;
    s = next_->seek(io, h, SEEK_HOLE, &below);
    if (s.ok()) h = below;
    else if (s.err != ENXIO) return s;  // ENXIO: past below's end, a hole up to the disk's end
    if (h >= size) break;
    it = run_after(h);
    if (it == runs.end() || it->first > h) break;  // a hole below that no dirty page fills
  }
  *result = std::min(h, size);
  return Status::Ok();
}

Status CacheFilter::size(uint64_t* out) {
  Status s = next_->size(out);
  if (s.ok() && store_ && write_back() && !passthrough_.load()) *out = std::max(*out, size_.load());
  return s;
}

// ---- reporting ----------------------------------------------------------------------------

uint64_t CacheFilter::dirty_bytes() const { return dirty_pages_.load(std::memory_order_relaxed) * kPage; }

std::string CacheFilter::stats_json() const {
  const uint64_t h = hits_.load(), m = misses_.load();
  char ratio[32];
  std::snprintf(ratio, sizeof ratio, "%.4f", h + m ? double(h) / double(h + m) : 0.0);
  uint64_t rate = 0, used = 0, dirty_blocks = 0;
  {
    std::lock_guard<RwLock> g(mu_);
    if (map_) {
      rate = rate_.per_second(now_ns());
      used = map_->used();
      dirty_blocks = map_->dirty_count();
    }
  }
  std::string s = std::string("{\"mode\":\"") + cache::to_string(mode_.load()) + "\"";
  s += ",\"read_hits\":" + std::to_string(h) + ",\"read_misses\":" + std::to_string(m);
  s += ",\"hits\":" + std::to_string(h) + ",\"misses\":" + std::to_string(m);  // iofilterctl top
  s += ",\"hit_ratio\":" + std::string(ratio);
  s += ",\"bytes_cached\":" + std::to_string(valid_pages_.load() * kPage);
  s += ",\"blocks_cached\":" + std::to_string(used) + ",\"blocks\":" + std::to_string(p_.slots());
  s += ",\"dirty_bytes\":" + std::to_string(dirty_bytes()) + ",\"dirty_blocks\":" + std::to_string(dirty_blocks);
  s += ",\"destaged_bytes\":" + std::to_string(destaged_bytes_.load());
  s += ",\"destage_rate\":" + std::to_string(rate);
  s += ",\"evictions\":" + std::to_string(evictions_.load()) + ",\"bypasses\":" + std::to_string(bypasses_.load());
  s += ",\"invalidations\":" + std::to_string(invalidations_.load());
  s += ",\"requests_offloaded\":" + std::to_string(offload_.taken());
  s += ",\"replayed_dirty_blocks\":" + std::to_string(replayed_.load());
  s += ",\"device\":" + json_str(store_path_);
  std::string hl = degraded_reason();
  s += ",\"state\":" + json_str(hl.empty() ? "ok" : "degraded: " + hl) + "}";
  return s;
}

std::string CacheFilter::describe() const {
  std::lock_guard<std::mutex> g(p_mu_);
  return cache::describe_cache(p_);
}

// In place: the mode (leaving write-back after a full destage), the watermarks, the sequential
// cutoff and `unsafe`. memory, device, size and block make a new store (another file or
// geometry): false, and the framework replaces the filter (the old one is drained first).
bool CacheFilter::reconfigure(const YAML::Node& params) {
  cache::CacheParams np;
  if (!cache::parse_cache(params, &np).empty()) return false;
  cache::CacheParams cur;
  {
    std::lock_guard<std::mutex> g(p_mu_);
    cur = p_;
  }
  if (np.memory != cur.memory || np.device != cur.device || np.size != cur.size || np.block != cur.block) return false;
  // A cache that runs without its device (degraded at open, or failed over): a fresh instance
  // tries the device again.
  if (!store_ || passthrough_.load()) return false;
  if (np.mode != cur.mode) {
    const bool leaving_wb = cur.mode == cache::Mode::WriteBack;
    for (int attempt = 0;; ++attempt) {
      // Leaving write-back: everything below first (outside the locks: a drain takes them).
      if (leaving_wb && !drain().ok()) return false;
      if (passthrough_.load()) return false;  // the device failed while draining
      // No request inside a block (every stripe) and the map still: the mode changes between
      // two writes of any block, and nothing dirty is left behind in a mode that never destages.
      std::array<std::unique_lock<std::mutex>, kStripes> held;
      for (int i = 0; i < kStripes; ++i) held[i] = std::unique_lock<std::mutex>(stripes_[i]);
      std::lock_guard<RwLock> g(mu_);
      if (leaving_wb && map_->dirty_count() > 0) {
        if (attempt < 100) continue;  // written meanwhile: drain again
        return false;
      }
      if (np.mode == cache::Mode::WriteBack) {
        // The disk's size as write-back tracks it, and below's writes of the old mode are
        // synced by the next guest flush.
        uint64_t below = 0;
        if (!next_->size(&below).ok()) return false;
        size_.store(below);
        below_unsynced_.store(true);
      }
      mode_.store(np.mode, std::memory_order_release);
      break;
    }
    if (np.mode == cache::Mode::WriteBack) start_destager();
    else if (leaving_wb) stop_destager();
  }
  {
    std::lock_guard<RwLock> g(mu_);
    marks_ = cache::Watermarks(np.high_watermark, np.low_watermark);
  }
  {
    std::lock_guard<std::mutex> g(seq_mu_);
    seq_ = cache::SequentialCutoff(np.sequential_cutoff);
    cutoff_.store(np.sequential_cutoff, std::memory_order_relaxed);
  }
  {
    std::lock_guard<std::mutex> g(p_mu_);
    p_ = np;
  }
  if (np.mode == cache::Mode::WriteBack) kick(false);  // new marks: the destager looks again
  spdlog::info("{}: cache: reconfigured in place: {}", info_.path, cache::describe_cache(np));
  return true;
}

void register_cache(Registry& r) {
  FilterInfo info;
  info.name = "cache";
  info.cls = FilterClass::Cache;
  info.api_version = kFilterApiVersion;
  info.description =
      "caches blocks in RAM or in a cache file on a fast device: write-through, write-around, or write-back with "
      "crash-safe dirty data and background destaging between watermarks; S3-FIFO eviction, sequential bypass";
  info.params = cache::cache_keys();
  info.validate = [](const YAML::Node& params, YAML::Node* where) { return cache::validate_cache(params, where); };
  info.create = [](const YAML::Node& params) -> std::unique_ptr<Filter> {
    cache::CacheParams p;
    if (!cache::parse_cache(params, &p).empty()) return nullptr;
    return std::make_unique<CacheFilter>(p);
  };
  // Per request (filter.h, "Deferring"): the cache hands the Deferrer down where it returns
  // below's answer untouched and keeps nothing of it — everything while it is pass-through (no
  // store, or after a failover) — and with every read that misses, of one block or several,
  // filled or not, as one request, whose dirty overlay, fill and unpinning a completion hook
  // finishes (ReadFlight), unless it is not page-aligned and a block of it has a slot; and with every one-block write that goes below (write-through, write-around, a
  // write-back bypass), which stays marked in flight in its stripe until it has landed, and
  // whose bookkeeping (the fill, the record, the slot's pin) a completion hook finishes before
  // it is acknowledged (InFlight); a write of several blocks goes below as one request, every
  // block in flight, one hook for all (MultiFlight), in write-back when none of its blocks is
  // cached or can be. Unaligned reads of cached blocks, and write-back's own trips below
  // (an edge page read, an evacuation, the bypassing blocks of a write with a cached block, a
  // destage on the requesting thread) go below without it, and so wait on their worker behind
  // a throttle.
  info.passes_deferral = true;
  info.discard = [](const YAML::Node& params, const std::string& image) -> std::string {
    cache::CacheParams p;
    std::string err = cache::parse_cache(params, &p);
    if (!err.empty()) return err;
    if (p.device.empty()) return "the cache is in memory: nothing outlives the daemon";
    return cache::discard_cache_file(p.device, image);
  };
  r.add(std::move(info));
}

}  // namespace iofilterfs
