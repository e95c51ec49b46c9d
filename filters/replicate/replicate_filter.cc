#include "replicate/replicate_filter.h"

#include <fcntl.h>
#include <linux/capability.h>
#include <sched.h>
#include <sys/syscall.h>
#include <sys/file.h>
#include <linux/falloc.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <map>
#include <set>

#include "json.h"
#include "replicate/crc32c.h"
#include "units.h"

namespace iofilterfs {
namespace {

namespace rp = replicate;

const Status kUnreachable = Status::Error(EIO, "replicate: the replica is unreachable (on-target-error: fail)");
const Status kBitmapFailed = Status::Error(EIO, "replicate: the dirty bitmap cannot be saved");
const Status kJournalFailed = Status::Error(EIO, "replicate: the journal cannot be synced");
const Status kHistoryFailed = Status::Error(EIO, "replicate: the history (retention) cannot be written");
const Status kNotOpen = Status::Error(EIO, "replicate: the filter is not open");
const Status kDrainUnreachable =
    Status::Error(EHOSTDOWN, "replicate: the replica is unreachable; the journal and bitmap keep what it lacks");
const Status kStopped = Status::Error(ECANCELED, "replicate: stopping");

constexpr uint64_t kShipBatch = 8u << 20;          // bytes shipped between ship-point updates
constexpr uint64_t kPersistEvery = 32u << 20;      // bytes shipped between durable ship points
constexpr uint64_t kPersistIntervalNs = 200'000'000;  // ... or this long after the last one
constexpr uint64_t kResetAbove = 64u << 20;        // a fully shipped journal is cut above this
constexpr uint64_t kCleanIntervalNs = 1'000'000'000;
constexpr uint64_t kResyncBatch = 64;              // regions per pass before other work
constexpr uint64_t kActivityRegions = 8192;        // sync: marked regions kept before cleaning

uint64_t mono_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}
uint64_t real_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// The image's relative path as one file name: '%' and '/' escaped.
std::string escape(const std::string& rel) {
  std::string o;
  for (char c : rel) {
    if (c == '%') o += "%25";
    else if (c == '/') o += "%2F";
    else o += c;
  }
  return o;
}

// Which filter instance owns an image's state files. A re-plumb opens the new instance before
// it closes the old one; the old one must not write the files after that.
std::mutex g_owner_mu;
std::map<std::string, uint64_t> g_owners;
uint64_t g_next_token = 1;

bool all_zero(const uint8_t* p, size_t n) {
  static const uint8_t z[4096] = {};
  while (n >= sizeof z) {
    if (std::memcmp(p, z, sizeof z)) return false;
    p += sizeof z;
    n -= sizeof z;
  }
  return n == 0 || std::memcmp(p, z, n) == 0;
}

// Whether this process may raise a thread back from SCHED_IDLE (CAP_SYS_NICE, or an RLIMIT_NICE
// that allows nice 0): without it a thread put to idle would stay there.
bool can_leave_idle() {
  struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
  struct __user_cap_data_struct data[2] = {};
  if (syscall(SYS_capget, &hdr, data) == 0 && (data[CAP_SYS_NICE / 32].effective & (1u << (CAP_SYS_NICE % 32))))
    return true;
  struct rlimit rl;
  return getrlimit(RLIMIT_NICE, &rl) == 0 && (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= 20);
}

// Puts thread `tid` in SCHED_IDLE (idle true) or back in SCHED_OTHER; false if refused.
bool set_idle(pid_t tid, bool idle) {
  struct sched_param sp = {};
  return tid > 0 && sched_setscheduler(tid, idle ? SCHED_IDLE : SCHED_OTHER, &sp) == 0;
}

}  // namespace

ReplicateFilter::ReplicateFilter(rp::ReplicateParams p)
    : params_(std::move(p)),
      shift_(params_.region_shift),
      inflight_(new std::atomic<uint32_t>[kStripes]),
      gen_(new std::atomic<uint32_t>[kStripes]),
      max_lag_(params_.max_lag),
      backpressure_(params_.on_overflow == rp::Overflow::Backpressure),
      fail_on_error_(params_.on_error == rp::OnError::Fail),
      reconnect_max_us_(params_.reconnect_max_us) {
  for (uint64_t i = 0; i < kStripes; ++i) {
    inflight_[i].store(0, std::memory_order_relaxed);
    gen_[i].store(0, std::memory_order_relaxed);
  }
}

ReplicateFilter::~ReplicateFilter() {
  offload_.stop();  // none is left after a close (the disk released them): its idle threads
  close();
}

uint64_t ReplicateFilter::now_ns() const { return mono_ns(); }

bool ReplicateFilter::owner() const {
  std::lock_guard<std::mutex> g(g_owner_mu);
  auto it = g_owners.find(base_);
  return it != g_owners.end() && it->second == token_;
}

bool ReplicateFilter::save_bitmap() {
  if (!owner()) return true;  // a newer instance owns the file; ours is retired
  std::string e = bitmap_->save();
  if (e.empty()) return true;
  note_error(e);
  spdlog::error("{}: replicate: {}", relpath_, e);
  return false;
}

void ReplicateFilter::note_error(const std::string& e) {
  std::lock_guard<std::mutex> g(err_mu_);
  last_error_ = e;
}

void ReplicateFilter::boost() {
  if (bg_sched_idle_.exchange(false)) (void)set_idle(bg_tid_.load(), false);
}

void ReplicateFilter::wake() {
  if (bg_idle_.load(std::memory_order_relaxed)) bg_cv_.notify_one();
}

void ReplicateFilter::target_failed(const std::string& e) {
  target_errors_.fetch_add(1, std::memory_order_relaxed);
  need_reconnect_.store(true);
  if (connected_.exchange(false)) {
    note_error(e);
    spdlog::warn("{}: replica unreachable: {}; changes are tracked and will be resent", relpath_, e);
  }
  bg_cv_.notify_one();
}

template <typename Send>
bool ReplicateFilter::send_or_track(bool attempt, uint64_t r0, uint64_t r1, Send&& send) {
  bool sent = false;
  std::string err;
  if (attempt && connected_.load()) {
    target_rw_.lock_shared();
    if (connected_.load() && target_) {
      err = send(*target_);
      sent = err.empty();
    }
    target_rw_.unlock_shared();
  }
  if (!sent) {
    for (uint64_t r = r0; r <= r1; ++r) pending_.set(r);  // before leaving: the cleaner re-checks
    if (!err.empty()) target_failed(err);
    wake();
  }
  return sent;
}

bool ReplicateFilter::enter(uint64_t r0, uint64_t r1, bool mark_dirty) {
  bool fresh = false;
  for (uint64_t r = r0; r <= r1; ++r) {
    inflight_[stripe(r)].fetch_add(1, std::memory_order_seq_cst);
    gen_[stripe(r)].fetch_add(1, std::memory_order_seq_cst);
    if (mark_dirty && bitmap_->set(r)) fresh = true;
  }
  if (fresh && !save_bitmap()) {
    leave(r0, r1);
    return false;
  }
  return true;
}

void ReplicateFilter::leave(uint64_t r0, uint64_t r1) {
  for (uint64_t r = r0; r <= r1; ++r) inflight_[stripe(r)].fetch_sub(1, std::memory_order_seq_cst);
}

bool ReplicateFilter::mark_pending(uint64_t r0, uint64_t r1) {
  bool fresh = false;
  for (uint64_t r = r0; r <= r1; ++r) {
    if (bitmap_->set(r)) fresh = true;
    pending_.set(r);
  }
  writes_tracked_.fetch_add(1, std::memory_order_relaxed);
  wake();
  return !fresh || save_bitmap();
}

// ---------------------------------------------------------------------------------------------
// Sealing (a policy that also encrypts; see the header).

namespace {

// This thread's buffer for sealed data: page-aligned, grown to the largest request seen, freed
// when the thread exits. Not a thread_buffer() slot: the encrypt filter below uses the Filter
// slot while this one still holds what goes to the target.
uint8_t* seal_buffer(size_t n) {
  struct Buf {
    uint8_t* p = nullptr;
    size_t cap = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf b;
  if (b.cap < n) {
    const size_t cap = (n + 65535) & ~size_t(65535);
    void* p = std::aligned_alloc(4096, cap);
    if (!p) return nullptr;
    std::free(b.p);
    b.p = static_cast<uint8_t*>(p);
    b.cap = cap;
  }
  return b.p;
}

const Status kNoMemory = Status::Error(ENOMEM, "replicate: no memory for the sealed copy");

}  // namespace

void ReplicateFilter::lock_edges(uint64_t off, uint64_t len, EdgeLocks* l) {
  constexpr uint64_t S = AtRest::kSector;
  int idx[2];
  int n = 0;
  auto stripe_of = [](uint64_t sector) { return static_cast<int>((sector * 0x9E3779B97F4A7C15ull) >> 58); };
  if (off % S) idx[n++] = stripe_of(off / S);
  if ((off + len) % S) {
    const int t = stripe_of((off + len) / S);
    if (n == 0 || t != idx[0]) idx[n++] = t;
  }
  if (n == 2 && idx[1] < idx[0]) std::swap(idx[0], idx[1]);
  for (int i = 0; i < n; ++i) {
    edge_mu_[idx[i]].lock();
    l->m[i] = &edge_mu_[idx[i]];
  }
}

Status ReplicateFilter::seal_range(const void* buf, size_t len, uint64_t off, const uint8_t** out, uint64_t* aoff,
                                   size_t* alen) {
  constexpr uint64_t S = AtRest::kSector;
  const uint64_t a0 = off / S * S, a1 = (off + len + S - 1) / S * S;
  const size_t n = static_cast<size_t>(a1 - a0);
  uint8_t* p = seal_buffer(n);
  if (!p) return kNoMemory;
  *out = p;
  *aoff = a0;
  *alen = n;
  if (a0 == off && a1 == off + len && buf) return seal_->seal(a0, buf, p, n);  // aligned: one pass, no copy
  auto read_sector = [&](uint64_t at, uint8_t* to) -> Status {
    size_t got = 0;
    Status st = next_->read(Io{}, to, S, at, &got);
    if (st.ok() && got < S) std::memset(to + got, 0, S - got);  // past the end: zeros
    return st;
  };
  Status st;
  if (a0 != off) st = read_sector(a0, p);
  if (st.ok() && a1 != off + len && (a1 - S != a0 || a0 == off)) st = read_sector(a1 - S, p + n - S);
  if (!st.ok()) return st;
  if (buf) std::memcpy(p + (off - a0), buf, len);
  else std::memset(p + (off - a0), 0, len);
  return seal_->seal(a0, p, p, n);
}

Status ReplicateFilter::outgoing(const void* buf, size_t len, uint64_t off, EdgeLocks* edges, const void** data,
                                 uint64_t* doff, size_t* dlen) {
  *data = buf;
  *doff = off;
  *dlen = len;
  if (!seal_) return Status::Ok();
  lock_edges(off, len, edges);
  const uint8_t* sealed = nullptr;
  Status s = seal_range(buf, len, off, &sealed, doff, dlen);
  if (s.ok()) *data = sealed;
  return s;
}

Status ReplicateFilter::seal_edge(uint64_t sector_off, uint64_t z0, uint64_t z1, uint8_t* out) {
  constexpr uint64_t S = AtRest::kSector;
  size_t got = 0;
  Status st = next_->read(Io{}, out, S, sector_off, &got);
  if (!st.ok()) return st;
  if (got < S) std::memset(out + got, 0, S - got);
  std::memset(out + (z0 - sector_off), 0, z1 - z0);
  return seal_->seal(sector_off, out, out, S);
}

std::string ReplicateFilter::target_sealed_zero(uint64_t off, uint64_t len) {
  constexpr size_t kChunk = 1u << 20;
  uint8_t* p = seal_buffer(kChunk);
  if (!p) return "no memory for sealed zeros";
  while (len) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(len, kChunk));
    std::memset(p, 0, n);
    Status st = seal_->seal(off, p, p, n);
    if (!st.ok()) return std::string("cannot seal: ") + (st.what ? st.what : std::strerror(st.err));
    std::string e = target_->pwrite(p, n, off);
    if (!e.empty()) return e;
    off += n;
    len -= n;
  }
  return "";
}

std::string ReplicateFilter::copy_header(rp::Target* t) {
  std::vector<uint8_t> b(std::min<uint64_t>(header_bytes_, 1u << 20));
  for (uint64_t o = 0; o < header_bytes_;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(b.size(), header_bytes_ - o));
    Status st = seal_->read_header(b.data(), n, o);
    if (!st.ok()) return std::string("cannot read the container's header: ") + (st.what ? st.what : std::strerror(st.err));
    std::string e = t->pwrite_header(b.data(), n, o);
    if (!e.empty()) return e;
    o += n;
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// Open and close.

Status ReplicateFilter::open(const DiskInfo& info) {
  relpath_ = info.path;
  // The policy also encrypts: everything kept or sent is sealed, the history too (see the header).
  seal_ = info.at_rest;
  header_bytes_ = seal_ ? seal_->header_bytes() : 0;
  // CDP needs the data itself, and sealing the ciphertext as it was: those keep the copying journal.
  by_ref_ = params_.mode == rp::Mode::Async && !seal_ && !params_.retention_us;
  if (::mkdir(params_.journal.c_str(), 0700) != 0 && errno != EEXIST) {
    spdlog::error("{}: replicate: cannot create the journal directory {}: {}", relpath_, params_.journal,
                  std::strerror(errno));
    return Status::Error(errno, "replicate: cannot create the journal directory");
  }
  base_ = params_.journal + "/" + escape(relpath_);
  {
    std::lock_guard<std::mutex> g(g_owner_mu);
    token_ = g_next_token++;
    g_owners[base_] = token_;
  }
  // A sealed replica (a LUKS container) and a plaintext one of the same target are different
  // replicas: a bitmap made for the other kind is not trusted (a full sync follows).
  bitmap_ = std::make_unique<rp::PersistentBitmap>(
      base_ + ".bitmap", shift_, rp::target_id_of(seal_ ? params_.target + "\n(sealed)" : params_.target));
  bool found = false;
  std::string note;
  uint64_t bad_pages = 0;
  std::string e = bitmap_->load(&found, &note, &bad_pages);
  if (!e.empty()) {
    spdlog::error("{}: replicate: {}", relpath_, e);
    return Status::Error(EIO, "replicate: the dirty bitmap cannot be read");
  }
  if (!note.empty()) spdlog::warn("{}: replicate: {}", relpath_, note);
  uint64_t size = 0;
  Status s = next_->size(&size);
  if (!s.ok()) return s;
  const uint64_t region = uint64_t(1) << shift_;
  const uint64_t nreg = (size + region - 1) >> shift_;
  if (nreg > rp::AtomicBits::kCapacity) return Status::Error(EFBIG, "replicate: the image has too many regions");

  // A journal left by an earlier run. In async mode it is shipped from its ship point; in sync
  // mode (a policy that changed) what it holds unshipped is folded into the bitmap, and with
  // retention it goes on as the history journal.
  const std::string jpath = base_ + ".journal";
  std::string jnote;
  if (params_.mode == rp::Mode::Async || params_.retention_us || ::access(jpath.c_str(), F_OK) == 0) {
    e = rp::Journal::open(jpath, &journal_, &jnote);
    if (!e.empty()) {
      spdlog::error("{}: replicate: {}", relpath_, e);
      return Status::Error(EIO, "replicate: the journal cannot be opened");
    }
    if (!jnote.empty()) spdlog::warn("{}: replicate: {}", relpath_, jnote);
  }

  if (!found) {
    // Nothing is known about this target: the initial sync sends every region (holes as zeros).
    for (uint64_t r = 0; r < nreg; ++r) {
      bitmap_->set(r);
      pending_.set(r);
    }
    if (journal_ && !params_.retention_us) {
      e = journal_->reset();  // everything it held is covered by the full sync
      if (!e.empty()) spdlog::error("{}: replicate: {}", relpath_, e);
    }
    spdlog::info("{}: replicate: initial sync of {} ({} regions) to {}", relpath_, format_size(size), nreg,
                 params_.target);
  } else {
    for (uint64_t r = bitmap_->next(0); r != rp::AtomicBits::npos; r = bitmap_->next(r + 1))
      pending_.set(r);
    if (pending_.count())
      spdlog::info("{}: replicate: {} regions changed since the replica was last confirmed; resending them",
                   relpath_, pending_.count());
  }
  if (journal_ && params_.mode == rp::Mode::Sync) {
    uint64_t folded = 0;
    e = journal_->headers(journal_->ship_off(), [&](const rp::RecordHeader& h) {
      if (h.type == static_cast<uint16_t>(rp::RecType::Resize) || h.type == static_cast<uint16_t>(rp::RecType::Point) ||
          h.len == 0)
        return;
      for (uint64_t r = region_of(h.off); r <= region_of(h.off + h.len - 1); ++r) {
        bitmap_->set(r);
        pending_.set(r);
      }
      ++folded;
    });
    if (!e.empty()) spdlog::warn("{}: replicate: {}", relpath_, e);
    if (params_.retention_us) {
      // The history journal: nothing ships from it; its ship point only says where the scan at
      // the next open starts.
      hist_ = std::move(journal_);
      e = hist_->set_shipped(hist_->end(), hist_->next_seq());
      if (!e.empty()) {
        spdlog::error("{}: replicate: {}", relpath_, e);
        return Status::Error(EIO, "replicate: the history journal cannot be written");
      }
    } else {
      journal_.reset();
      ::unlink(jpath.c_str());
    }
    if (folded) spdlog::info("{}: replicate: {} unshipped journal records folded into the bitmap", relpath_, folded);
  }
  if (!save_bitmap()) return kBitmapFailed;
  if (!params_.retention_us && ::access((base_ + ".cdp-meta").c_str(), F_OK) == 0) {
    // A history from a run with retention: the changes made from now on are not kept, so it
    // would restore wrong bytes. It goes (a later run with retention starts a new one).
    ::unlink((base_ + ".cdp-meta").c_str());
    ::unlink((base_ + ".cdp-base").c_str());
    spdlog::warn("{}: replicate: retention is off: the history kept by an earlier run is dropped", relpath_);
  }
  if (params_.retention_us) {
    e = start_history();
    if (!e.empty()) {
      spdlog::error("{}: replicate: {}", relpath_, e);
      return Status::Error(EIO, "replicate: the history (retention) cannot be set up");
    }
  }
  if (journal_) {
    shipped_pos_.store(journal_->ship_off());
    shipped_seq_ = journal_->ship_seq();
    // The unshipped tail left by the last run counts as appended (the lag includes it, records
    // by reference with their length), and its records by reference and their preserved
    // pieces are found again (refmap.h).
    std::lock_guard<std::mutex> l(jmu_);
    uint64_t unshipped = 0;
    const bool ok = rebuild_refs(&unshipped);
    appended_bytes_.store(unshipped);
    if (!ok)
      collapse_locked("the journal holds records by reference that this policy (retention or encryption) cannot ship");
  }
  resync_total_.store(pending_.count());
  buf_.resize(region);
  target_size_.store(size);
  stop_.store(false);
  opened_ = true;
  // One attempt now, so a reachable target takes the first writes; after that the thread
  // retries with backoff.
  (void)connect_target();
  bg_ = std::thread([this] { run(); });
  return Status::Ok();
}

void ReplicateFilter::shutdown() {
  if (!bg_.joinable()) return;
  stop_.store(true);
  boost();
  {
    std::lock_guard<std::mutex> g(bg_mu_);
  }
  bg_cv_.notify_all();
  jcv_.notify_all();
  bg_.join();
}

void ReplicateFilter::close() {
  if (!opened_) return;
  shutdown();
  {
    std::lock_guard<RwLock> g(target_rw_);
    if (target_) target_->close();
    target_.reset();
    connected_.store(false);
  }
  if (journal_ && owner()) (void)journal_->sync();
  if (hist_ && owner()) (void)hist_->sync();
  if (owner()) (void)save_bitmap();
  {
    std::lock_guard<std::mutex> g(g_owner_mu);
    auto it = g_owners.find(base_);
    if (it != g_owners.end() && it->second == token_) g_owners.erase(it);
  }
  opened_ = false;
}

bool ReplicateFilter::reconfigure(const YAML::Node& params) {
  rp::ReplicateParams p;
  if (!rp::parse_replicate(params, &p).empty()) return false;
  if (p.target != params_.target || p.journal != params_.journal || p.mode != params_.mode ||
      p.region_shift != params_.region_shift || (p.retention_us == 0) != (params_.retention_us == 0))
    return false;  // a new instance, with its own state
  max_lag_.store(p.max_lag);
  backpressure_.store(p.on_overflow == rp::Overflow::Backpressure);
  fail_on_error_.store(p.on_error == rp::OnError::Fail);
  reconnect_max_us_.store(p.reconnect_max_us);
  {
    // Only the tunables change (the data path reads mode and target without a lock).
    std::lock_guard<std::mutex> g(err_mu_);
    params_.max_lag = p.max_lag;
    params_.on_overflow = p.on_overflow;
    params_.on_error = p.on_error;
    params_.reconnect_max_us = p.reconnect_max_us;
    params_.retention_us = p.retention_us;
  }
  jcv_.notify_all();
  return true;
}

// ---------------------------------------------------------------------------------------------
// The data path.

Status ReplicateFilter::journal_locked(rp::RecType type, uint64_t off, uint64_t len, const void* data,
                                       uint32_t data_crc, std::optional<rp::Reservation>* res, uint16_t flags) {
  const uint64_t lag = appended_bytes_.load() - shipped_bytes_.load();
  if (jmode_ == JMode::Journal && lag >= max_lag_.load()) {
    if (backpressure_.load() && connected_.load()) {
      // Backpressure holds guest writes (the caller waits and tries again). Every other change
      // (a zero-range, a resize, the records of a sealed punch) is journaled over the limit:
      // it may not be left out, and it carries little or no data.
      if (res) return Status::Error(EAGAIN);
    } else {
      collapse_locked(connected_.load() ? "the journal reached max-lag" : "the journal reached max-lag with the replica unreachable");
    }
  }
  if (jmode_ == JMode::Journal) {
    // A Write record by reference holds no data; it counts for the lag with its length.
    const bool byref = type == rp::RecType::Write && (flags & rp::kByRef);
    const uint32_t dlen = type == rp::RecType::Write && !byref ? static_cast<uint32_t>(len) : 0;
    std::string e;
    if (res && type == rp::RecType::Write) {
      // Group commit: only the place is taken here; the caller writes the record unlocked.
      res->emplace(journal_->reserve(type, real_ns(), off, len, dlen, data_crc, flags));
    } else {
      e = journal_->append(type, real_ns(), off, len, data, dlen, flags);
    }
    if (e.empty()) {
      journaled_bytes_.fetch_add(dlen, std::memory_order_relaxed);
      if (byref) referenced_bytes_.fetch_add(len, std::memory_order_relaxed);
      appended_bytes_.fetch_add(sizeof(rp::RecordHeader) + (byref ? len : dlen));
      return Status::Ok();
    }
    note_error(e);
    // With retention the journal is the history: a change it cannot keep is not made (EIO), as
    // in sync mode, or every restore of a later moment would lack it.
    if (params_.retention_us) return history_failed_locked(e);
    spdlog::error("{}: replicate: {}; tracking changes in the bitmap", relpath_, e);
    collapse_locked("the journal could not be written");
  }
  // Bitmap mode: the regions are marked (saved by the caller).
  uint64_t r0 = region_of(off), r1 = region_of(off + std::max<uint64_t>(len, 1) - 1);
  if (type == rp::RecType::Resize) {
    r0 = region_of(std::min(off, len));
    r1 = region_of(std::max({len, target_size_.load(), off}) + 1);
  }
  bool fresh = false;
  for (uint64_t r = r0; r <= r1; ++r) {
    if (bitmap_->set(r)) fresh = true;
    pending_.set(r);
  }
  writes_tracked_.fetch_add(1, std::memory_order_relaxed);
  return fresh ? Status::Error(EINPROGRESS) : Status::Ok();  // EINPROGRESS: save the bitmap
}

void ReplicateFilter::journal_failed(const std::string& e) {
  note_error(e);
  std::lock_guard<std::mutex> l(jmu_);
  if (!journal_->broken()) return;  // another writer collapsed it already
  spdlog::error("{}: replicate: {}; tracking changes in the bitmap", relpath_, e);
  collapse_locked("the journal could not be written");
}

void ReplicateFilter::collapse_locked(const char* why) {
  // Everything not confirmed on the target goes to the bitmap; the journal starts empty. Records
  // reserved before are let finish first (their writers need no lock for it): they are in the
  // scan below, or, if the journal broke, their writers mark their regions themselves.
  journal_->wait_idle();
  if (journal_->broken()) {
    std::string re = journal_->repair();  // with retention the file is kept: cut the broken tail
    if (!re.empty()) spdlog::error("{}: replicate: {}", relpath_, re);
  }
  uint64_t records = 0;
  std::string e = journal_->headers(journal_->ship_off(), [&](const rp::RecordHeader& h) {
    ++records;
    if (h.type == static_cast<uint16_t>(rp::RecType::Point)) return;
    uint64_t a = h.off, b = h.off + h.len;
    if (h.type == static_cast<uint16_t>(rp::RecType::Resize)) {
      a = h.len;
      b = std::max(h.len, target_size_.load()) + 1;
    }
    if (b <= a) return;
    for (uint64_t r = region_of(a); r <= region_of(b - 1); ++r) {
      bitmap_->set(r);
      pending_.set(r);
    }
  });
  if (!e.empty()) {
    // Unreadable records: which regions they touched is unknown, so all of them are resent.
    spdlog::error("{}: replicate: {}; resending the whole image", relpath_, e);
    uint64_t size = 0;
    if (next_->size(&size).ok())
      for (uint64_t r = 0; r <= region_of(size + 1); ++r) {
        bitmap_->set(r);
        pending_.set(r);
      }
  }
  (void)save_bitmap();
  if (owner()) {
    // With retention the records stay (they are the history): only the ship point moves on.
    e = params_.retention_us ? journal_->set_shipped(journal_->end(), journal_->next_seq()) : journal_->reset();
    if (!e.empty()) spdlog::error("{}: replicate: {}", relpath_, e);
  }
  shipped_pos_.store(journal_->end());
  shipped_seq_ = journal_->next_seq();
  shipped_bytes_.store(appended_bytes_.load());
  flushed_bytes_.store(appended_bytes_.load());
  head_time_ns_.store(0);
  {
    std::lock_guard<std::mutex> r(rmu_);  // nothing unshipped references the image any more
    refs_.clear();
  }
  jepoch_.fetch_add(1);
  if (!params_.retention_us) {
    jmode_ = JMode::Bitmap;
    collapsed_.store(true);
  }
  collapses_.fetch_add(1, std::memory_order_relaxed);
  resync_total_.store(pending_.count());
  resync_done_.store(0);
  spdlog::warn("{}: replicate: {}: {} unshipped records collapsed into the dirty bitmap ({} regions to resync)",
               relpath_, why, records, pending_.count());
  bg_cv_.notify_one();
}


// ---------------------------------------------------------------------------------------------
// The journal by reference (refmap.h).

namespace {
// Pieces larger than this are split (each is one Preserve record, below kMaxRecordData).
constexpr uint64_t kMaxPiece = 16u << 20;
// A change whose copy-before-write would exceed this (a shrink or punch over a large unshipped
// area) collapses the journal into the bitmap instead.
constexpr uint64_t kMaxPreserve = 64u << 20;
const Status kPreserveTooBig = Status::Error(EFBIG);
}  // namespace

ReplicateFilter::Preserved& ReplicateFilter::thread_preserved() {
  static thread_local Preserved p;
  return p;
}

template <typename Fn>
void ReplicateFilter::with_refs(Fn&& fn) {
  // The background thread (the only caller) may be at SCHED_IDLE: a writer must never wait on
  // it for rmu_.
  const bool idle = bg_sched_idle_.load();
  if (idle) boost();
  {
    std::lock_guard<std::mutex> g(rmu_);
    fn();
  }
  if (idle && set_idle(bg_tid_.load(), true)) bg_sched_idle_.store(true);
}

Status ReplicateFilter::preserve_read(const Io& io, uint64_t off, uint64_t len, Preserved* p) {
  p->spans.clear();
  p->at.clear();
  p->crc.clear();
  p->res.clear();
  {
    std::lock_guard<std::mutex> g(rmu_);
    refs_.referenced(off, len, &p->spans);
  }
  if (p->spans.empty()) return Status::Ok();
  // Split into pieces of at most kMaxPiece.
  uint64_t total = 0;
  for (size_t i = 0; i < p->spans.size(); ++i) {
    rp::Span& sp = p->spans[i];
    if (sp.len > kMaxPiece) {
      rp::Span rest{sp.off + kMaxPiece, sp.len - kMaxPiece, sp.seq};
      sp.len = kMaxPiece;
      p->spans.insert(p->spans.begin() + static_cast<long>(i) + 1, rest);
    }
    total += rp::kPreserveHead + p->spans[i].len;
  }
  if (total > kMaxPreserve) return kPreserveTooBig;
  if (p->buf.size() < total) p->buf.resize(total);
  size_t at = 0;
  for (const rp::Span& sp : p->spans) {
    uint8_t* d = p->buf.data() + at;
    std::memcpy(d, &sp.seq, rp::kPreserveHead);
    size_t got = 0;
    Status s = next_->read(io, d + rp::kPreserveHead, static_cast<size_t>(sp.len), sp.off, &got);
    if (!s.ok()) return s;
    if (got < sp.len) std::memset(d + rp::kPreserveHead + got, 0, sp.len - got);  // past the end
    p->at.push_back(at);
    p->crc.push_back(rp::crc32c(0, d, rp::kPreserveHead + sp.len));
    at += rp::kPreserveHead + sp.len;
  }
  preserves_.fetch_add(p->spans.size(), std::memory_order_relaxed);
  preserved_bytes_.fetch_add(total, std::memory_order_relaxed);
  return Status::Ok();
}

void ReplicateFilter::preserve_reserve_locked(Preserved* p) {
  for (size_t i = 0; i < p->spans.size(); ++i) {
    const uint32_t dlen = static_cast<uint32_t>(rp::kPreserveHead + p->spans[i].len);
    p->res.push_back(journal_->reserve(rp::RecType::Preserve, real_ns(), p->spans[i].off, p->spans[i].len, dlen,
                                       p->crc[i]));
    appended_bytes_.fetch_add(sizeof(rp::RecordHeader) + dlen);
  }
}

std::string ReplicateFilter::preserve_commit(Preserved* p) {
  std::string first;
  for (size_t i = 0; i < p->res.size(); ++i) {
    std::string e = journal_->commit(p->res[i], p->buf.data() + p->at[i]);
    if (first.empty()) first = e;
  }
  return first;
}

void ReplicateFilter::preserve_attach(const Preserved& p) {
  if (p.res.empty()) return;
  std::lock_guard<std::mutex> g(rmu_);
  for (size_t i = 0; i < p.res.size(); ++i)
    (void)refs_.attach(p.spans[i].seq, rp::Piece{p.spans[i].off, p.spans[i].len,
                                                 p.res[i].at + sizeof(rp::RecordHeader) + rp::kPreserveHead});
}

Status ReplicateFilter::preserve_changed(const Io& io, uint64_t off, uint64_t len) {
  if (jmode_ != JMode::Journal) return Status::Ok();
  Preserved& p = thread_preserved();
  Status s = preserve_read(io, off, len, &p);
  if (s.err == EFBIG && !s.what) {
    collapse_locked("a change over more unshipped bytes than it may copy");
    return Status::Ok();
  }
  if (!s.ok()) return s;
  if (!p.spans.empty()) {
    // Rare (zero ranges, shrinks): written under jmu_, before the change's own record.
    preserve_reserve_locked(&p);
    std::string e = preserve_commit(&p);
    if (!e.empty()) {
      note_error(e);
      spdlog::error("{}: replicate: {}; tracking changes in the bitmap", relpath_, e);
      collapse_locked("the journal could not be written");
      return Status::Ok();
    }
    preserve_attach(p);
  }
  std::lock_guard<std::mutex> g(rmu_);
  refs_.drop(off, len);
  return Status::Ok();
}

bool ReplicateFilter::rebuild_refs(uint64_t* unshipped) {
  std::lock_guard<std::mutex> g(rmu_);
  refs_.clear();
  bool foreign = false;
  *unshipped = 0;
  for (uint64_t pos = journal_->ship_off(); pos < journal_->end();) {
    rp::RecordHeader h;
    if (!journal_->read_header(pos, &h).empty()) break;  // the scan at open checked them
    if (rp::by_reference(h)) {
      if (!by_ref_) foreign = true;
      refs_.add(h.seq, h.off, h.len, true);
      *unshipped += h.len;
    } else if (h.type == static_cast<uint16_t>(rp::RecType::Preserve)) {
      uint64_t owner = 0;
      if (::pread(journal_->fd(), &owner, sizeof owner, static_cast<off_t>(pos + sizeof h)) == sizeof owner)
        (void)refs_.attach(owner, rp::Piece{h.off, h.len, pos + sizeof h + rp::kPreserveHead});
    }
    pos += sizeof h + h.data_len;
    *unshipped += sizeof h + h.data_len;
  }
  return !foreign;
}

std::string ReplicateFilter::ship_by_ref(const rp::RecordHeader& h, uint64_t epoch, bool* local) {
  *local = false;
  pieces_.clear();
  with_refs([&] { refs_.pieces(h.seq, &pieces_); });
  // The parts no piece covers, from the image (this record's write has landed there).
  for (auto [a, n] : rp::gaps(h.off, h.len, pieces_)) {
    while (n) {
      const size_t c = static_cast<size_t>(std::min<uint64_t>(n, kShipBatch));
      size_t got = 0;
      Status s;
      {
        BelowGuard b = below();
        // File to file when the layers below read the range verbatim from the image file
        // (src/filter.h): one copy in the kernel instead of a read and a write through a buffer.
        uint64_t at = 0;
        const int fd = b ? b->verbatim(a, c, &at) : -1;
        if (fd >= 0) {
          if (jepoch_.load() != epoch) return "";
          bool copied = false;
          std::string e = target_->copy_from(fd, at, c, a, &copied);
          if (!e.empty()) return e;
          if (copied) {
            bytes_copied_.fetch_add(c, std::memory_order_relaxed);
            a += c;
            n -= c;
            continue;
          }
        }
        if (rec_.size() < c) rec_.resize(c);
        s = b ? b->read(Io{}, rec_.data(), c, a, &got) : Status::Error(ESHUTDOWN, "the filter left the chain");
      }
      if (!s.ok()) {
        *local = true;
        return std::string("cannot read the image for a journal record: ") + (s.what ? s.what : std::strerror(s.err));
      }
      if (got < c) std::memset(rec_.data() + got, 0, c - got);  // cut later (a Resize record follows)
      if (jepoch_.load() != epoch) return "";
      std::string e = target_->pwrite(rec_.data(), c, a);
      if (!e.empty()) return e;
      a += c;
      n -= c;
    }
  }
  // Then every piece: one attached while the copy above ran is among them, and wins.
  pieces_.clear();
  with_refs([&] { refs_.shipped(h.seq, &pieces_); });
  for (const rp::Piece& p : pieces_) {
    if (jepoch_.load() != epoch) return "";
    bool copied = false;
    std::string e = target_->copy_from(journal_->fd(), p.at, static_cast<size_t>(p.len), p.off, &copied);
    if (!e.empty()) return e;
    if (copied) {
      bytes_copied_.fetch_add(p.len, std::memory_order_relaxed);
      continue;
    }
    if (rec_.size() < p.len) rec_.resize(p.len);
    if (::pread(journal_->fd(), rec_.data(), p.len, static_cast<off_t>(p.at)) != static_cast<ssize_t>(p.len)) {
      *local = true;
      return "cannot read preserved bytes from " + journal_->path() + ": " + std::strerror(errno);
    }
    e = target_->pwrite(rec_.data(), p.len, p.off);
    if (!e.empty()) return e;
  }
  return "";
}

void ReplicateFilter::lock_range(uint64_t off, uint64_t len, rp::RangeLock::Guard* g) {
  if (seal_) {
    // Sealing works on whole sectors: two changes that share a sector are ordered as well.
    constexpr uint64_t S = AtRest::kSector;
    const uint64_t end = off + len < off ? UINT64_MAX : off + len;
    const uint64_t a0 = off / S * S, a1 = end > UINT64_MAX - S ? UINT64_MAX : (end + S - 1) / S * S;
    ranges_.lock(a0, a1 - a0, g);
  } else {
    ranges_.lock(off, len, g);
  }
}

Status ReplicateFilter::write(const Io& req, const void* buf, size_t len, uint64_t off) {
  if (!opened_) return kNotOpen;
  // The work around the local write (the range, the journal or the send, the bitmap) needs a
  // thread from start to end: with a Deferrer, one of this filter's own (offload.h), so that a
  // throttle below holds that thread, not a FUSE worker. Below, never with the request's
  // Deferrer (there, with the carrying thread's own: write_local).
  if (req.defer && may_defer() && offload_.take(req, true, len, off)) return Status::Deferred();
  return write_change(Io{req.direct}, buf, len, off, false);
}

Status ReplicateFilter::write_local(const Io& io, const void* buf, size_t len, uint64_t off, bool carried) {
  if (!carried) return next_->write(io, buf, len, off);
  // On this filter's thread: the filters below may defer the write and finish it in their
  // hooks (a cache then holds no block lock while a throttle holds the write); this thread
  // waits for it, as it would inside a blocking call.
  Offload::Waiter w(buf);
  size_t got = 0;
  return w.wait(next_->write(Io{io.direct, &w}, buf, len, off), &got);
}

Status ReplicateFilter::write_change(const Io& io, const void* buf, size_t len, uint64_t off, bool carried) {
  if (!opened_) return kNotOpen;
  if (len == 0) return next_->write(io, buf, len, off);
  const uint64_t r0 = region_of(off), r1 = region_of(off + len - 1);
  if (r1 >= rp::AtomicBits::kCapacity) return Status::Error(EFBIG, "replicate: the write is past the bitmap's reach");
  rp::RangeLock::Guard order;
  lock_range(off, len, &order);

  if (params_.mode == rp::Mode::Sync) {
    if (fail_on_error_.load(std::memory_order_relaxed) && !connected_.load()) return kUnreachable;
    if (!enter(r0, r1, true)) return kBitmapFailed;
    EdgeLocks edges;
    const void* tdata;
    uint64_t toff;
    size_t tlen;
    Status ss = outgoing(buf, len, off, &edges, &tdata, &toff, &tlen);
    if (ss.ok() && hist_) ss = history_record(rp::RecType::Write, toff, tlen, tdata, static_cast<uint32_t>(tlen));
    if (!ss.ok()) {
      leave(r0, r1);
      return ss;
    }
    Status s = write_local(io, buf, len, off, carried);
    if (!s.ok()) {
      for (uint64_t r = r0; r <= r1; ++r) pending_.set(r);  // what the target has is unknown
      leave(r0, r1);
      return s;
    }
    const bool sent = send_or_track(true, r0, r1, [&](rp::Target& t) { return t.pwrite(tdata, tlen, toff); });
    if (!sent) writes_tracked_.fetch_add(1, std::memory_order_relaxed);
    else bytes_sent_.fetch_add(len, std::memory_order_relaxed);
    leave(r0, r1);
    if (!sent && fail_on_error_.load(std::memory_order_relaxed)) return kUnreachable;
    return Status::Ok();
  }

  // Async: the journal first, so a crash after the local write can never leave it out.
  if (!enter(r0, r1, false)) return kBitmapFailed;
  EdgeLocks edges;
  const void* jdata;
  uint64_t joff;
  size_t jlen;
  Status ss = outgoing(buf, len, off, &edges, &jdata, &joff, &jlen);
  if (!ss.ok()) {
    leave(r0, r1);
    return ss;
  }
  // By reference (journal.h): the record holds no data; what unshipped records still read
  // from the image in this range is copied into the journal first (copy-before-write: this
  // thread holds the range, so nothing else changes those bytes meanwhile).
  const bool byref = by_ref_;
  Preserved* keep = nullptr;
  bool too_big = false;
  if (byref) {
    keep = &thread_preserved();
    Status ps = preserve_read(io, off, len, keep);
    too_big = ps.err == EFBIG && !ps.what;
    if (!ps.ok() && !too_big) {
      leave(r0, r1);
      return ps;
    }
  }
  // The checksum of the data before the lock: under it only the header's (journal.h).
  const uint32_t dcrc = byref ? 0 : rp::crc32c(0, jdata, jlen);
  const uint16_t jflags = byref ? rp::kByRef : 0;
  std::optional<rp::Reservation> res;
  Status js;
  {
    std::unique_lock<std::mutex> l(jmu_);
    if (too_big && jmode_ == JMode::Journal) collapse_locked("a change over more unshipped bytes than it may copy");
    for (;;) {
      js = journal_locked(rp::RecType::Write, joff, jlen, jdata, dcrc, &res, jflags);
      if (js.err != EAGAIN) break;
      backpressure_waits_.fetch_add(1, std::memory_order_relaxed);
      boost();
      wake();
      jcv_.wait_for(l, std::chrono::milliseconds(50));
      if (stop_.load()) {
        js = Status::Ok();
        collapse_locked("stopping with writes held by backpressure");
        js = journal_locked(rp::RecType::Write, joff, jlen, jdata, dcrc, &res, jflags);
        break;
      }
    }
    if (res && byref) {
      // The old bytes' records go with this one (a collapse meanwhile cleared the references
      // they were read for: then the records are just skipped by the shipper).
      preserve_reserve_locked(keep);
      std::lock_guard<std::mutex> r(rmu_);
      refs_.add(res->h.seq, off, len);
    }
  }
  // A by-reference record is shipped only once its write has landed in the image (or failed:
  // then the region is pending anyway).
  struct Landed {
    ReplicateFilter* f;
    uint64_t seq;
    ~Landed() {
      if (!seq) return;
      std::lock_guard<std::mutex> r(f->rmu_);
      f->refs_.landed(seq);
    }
  } landed{this, res && byref ? res->h.seq : 0};
  if (res) {
    // Returns once this record and every earlier one are in the journal file; then the old
    // bytes' records, reserved after it (commit() goes in reservation order). A crash between
    // the two leaves this record without the pieces, but also without its image write.
    std::string e = journal_->commit(*res, byref ? nullptr : jdata);
    std::string e2 = keep ? preserve_commit(keep) : std::string();
    if (e.empty()) e = e2;
    if (!e.empty() && params_.retention_us) {
      // The history cannot keep this write: it is not made (see journal_locked), and its
      // record, cut off below, will never ship (a drain waits for appended_bytes_).
      note_error(e);
      appended_bytes_.fetch_sub(sizeof(rp::RecordHeader) + res->h.data_len);
      journaled_bytes_.fetch_sub(res->h.data_len, std::memory_order_relaxed);
      Status hs;
      {
        std::lock_guard<std::mutex> l(jmu_);
        hs = history_failed_locked(e);
      }
      leave(r0, r1);
      return hs;
    }
    if (!e.empty()) {
      journal_failed(e);
      if (!mark_pending(r0, r1)) {  // replay stops before this record: the bitmap has it
        leave(r0, r1);
        return kBitmapFailed;
      }
    } else if (keep) {
      preserve_attach(*keep);  // before the image changes (refmap.h)
    }
  } else if (js.err == EINPROGRESS && !save_bitmap()) {
    leave(r0, r1);
    return kBitmapFailed;
  }
  Status s = write_local(io, buf, len, off, carried);
  if (!s.ok()) {
    // The journal holds data the local image may lack: what the image now holds is resent
    // after it (the region goes pending; a resync reads the local bytes).
    (void)mark_pending(r0, r1);
  }
  leave(r0, r1);
  wake();
  return s;
}

Status ReplicateFilter::sync(const Io& io, bool datasync) {
  if (!opened_) return kNotOpen;
  if (journal_ && params_.mode == rp::Mode::Async) {
    std::string e = journal_->sync();
    if (!e.empty()) {
      note_error(e);
      return kJournalFailed;
    }
  }
  if (hist_) {
    std::string e = hist_->sync();
    if (!e.empty()) {
      note_error(e);
      return kHistoryFailed;
    }
  }
  Status s = next_->sync(io, datasync);
  if (!s.ok() || params_.mode == rp::Mode::Async) return s;
  if (connected_.load()) {
    std::string err;
    target_rw_.lock_shared();
    if (connected_.load() && target_) err = target_->flush();
    target_rw_.unlock_shared();
    if (err.empty()) return Status::Ok();
    target_failed(err);  // the reconnect resends every region not confirmed since the last clean
  }
  if (fail_on_error_.load(std::memory_order_relaxed)) return kUnreachable;
  return Status::Ok();
}

Status ReplicateFilter::fallocate(const Io& io, int mode, uint64_t off, uint64_t len) {
  if (!opened_) return kNotOpen;
  const int kind = mode & ~FALLOC_FL_KEEP_SIZE;
  const bool zeroes = kind == FALLOC_FL_PUNCH_HOLE || kind == FALLOC_FL_ZERO_RANGE;
  uint64_t before = 0;
  Status s = next_->size(&before);
  if (!s.ok()) return s;
  if (len == 0 || !zeroes) {
    s = next_->fallocate(io, mode, off, len);
    uint64_t after = before;
    if (s.ok() && next_->size(&after).ok() && after != before) {
      // Growth reads as zeros; the regions are resent (cheaply: holes go as zeros).
      if (params_.mode == rp::Mode::Async) {
        std::lock_guard<std::mutex> l(jmu_);
        Status js = journal_locked(rp::RecType::Resize, 0, after, nullptr, 0, nullptr);
        if (js.err == EINPROGRESS) (void)save_bitmap();
      } else {
        (void)mark_pending(region_of(std::min(before, after)), region_of(std::max(before, after)));
        if (hist_) (void)history_record(rp::RecType::Resize, 0, after, nullptr, 0);  // after it: it may fail
      }
    }
    return s;
  }
  const uint64_t r0 = region_of(off), r1 = region_of(off + len - 1);
  if (r1 >= rp::AtomicBits::kCapacity) return Status::Error(EFBIG, "replicate: past the bitmap's reach");
  rp::RangeLock::Guard order;
  lock_range(off, len, &order);
  s = next_->size(&before);  // again, under the range: a resize past it is ordered now
  if (!s.ok()) return s;
  if (seal_) return fallocate_sealed(io, mode, off, len, before);
  if (params_.mode == rp::Mode::Sync) {
    if (fail_on_error_.load() && !connected_.load()) return kUnreachable;
    if (!enter(r0, r1, true)) return kBitmapFailed;
    if (hist_) {
      Status hs = history_record(rp::RecType::Zero, off, len, nullptr, 0);
      if (hs.ok() && !(mode & FALLOC_FL_KEEP_SIZE) && kind == FALLOC_FL_ZERO_RANGE && off + len > before)
        hs = history_record(rp::RecType::Resize, 0, off + len, nullptr, 0);
      if (!hs.ok()) {
        leave(r0, r1);
        return hs;
      }
    }
    s = next_->fallocate(io, mode, off, len);
    uint64_t after = before;
    if (s.ok()) (void)next_->size(&after);
    const bool sent = send_or_track(s.ok(), r0, r1, [&](rp::Target& t) {
      std::string err = t.zero(off, std::min(len, std::max(after, before) > off ? std::max(after, before) - off : 0));
      if (err.empty() && after != before) err = t.resize(before, after);
      return err;
    });
    leave(r0, r1);
    if (s.ok() && !sent && fail_on_error_.load()) return kUnreachable;
    return s;
  }
  if (!enter(r0, r1, false)) return kBitmapFailed;
  Status js;
  {
    std::lock_guard<std::mutex> l(jmu_);
    if (by_ref_ && off < before) {
      // By reference: the bytes unshipped records still read from the image go to the journal
      // first (refmap.h); then nothing references the range any more.
      Status ps = preserve_changed(io, off, std::min(len, before - off));
      if (!ps.ok()) {
        leave(r0, r1);
        return ps;
      }
    }
    js = journal_locked(rp::RecType::Zero, off, len, nullptr, 0, nullptr);
    if (js.ok() && !(mode & FALLOC_FL_KEEP_SIZE) && kind == FALLOC_FL_ZERO_RANGE && off + len > before)
      js = journal_locked(rp::RecType::Resize, 0, off + len, nullptr, 0, nullptr);
  }
  if (!js.ok() && js.err != EINPROGRESS) {  // the history cannot keep it (retention): not made
    leave(r0, r1);
    return js;
  }
  if (js.err == EINPROGRESS && !save_bitmap()) {
    leave(r0, r1);
    return kBitmapFailed;
  }
  s = next_->fallocate(io, mode, off, len);
  if (!s.ok()) (void)mark_pending(r0, r1);
  leave(r0, r1);
  wake();
  return s;
}

// Punch and zero-range under sealing. The range splits into partly covered edge sectors (sent
// or journaled as the ciphertext of the sector with its covered part zeroed, read before the
// change under the edge locks) and the whole sectors between (a hole for a punch, as the
// encrypt filter leaves them, and sealed zeros for a zero-range, as it writes them). Only the
// part inside the image counts, unless a zero-range grows it (the resize goes first then).
Status ReplicateFilter::fallocate_sealed(const Io& io, int mode, uint64_t off, uint64_t len, uint64_t before) {
  constexpr uint64_t S = AtRest::kSector;
  const int kind = mode & ~FALLOC_FL_KEEP_SIZE;
  const bool zero_range = kind == FALLOC_FL_ZERO_RANGE;
  const bool grows = zero_range && !(mode & FALLOC_FL_KEEP_SIZE) && off + len > before;
  const uint64_t end = grows ? off + len : std::min(off + len, before);
  const uint64_t r0 = region_of(off), r1 = region_of(off + len - 1);
  EdgeLocks edges;
  lock_edges(off, len, &edges);
  struct Edge {
    uint64_t off;
    alignas(16) uint8_t data[S];
  };
  Edge edge[2];
  int nedges = 0;
  uint64_t z0 = 0, z1 = 0;  // whole sectors between the edges
  Status s;
  if (off < end) {
    const uint64_t h = (off + S - 1) / S * S, t = end / S * S;
    if (h > t) {
      edge[nedges].off = off / S * S;
      s = seal_edge(edge[nedges].off, off, end, edge[nedges].data);
      ++nedges;
    } else {
      if (off % S) {
        edge[nedges].off = off / S * S;
        s = seal_edge(edge[nedges].off, off, h, edge[nedges].data);
        ++nedges;
      }
      if (s.ok() && end % S) {
        edge[nedges].off = t;
        s = seal_edge(t, t, end, edge[nedges].data);
        ++nedges;
      }
      z0 = h;
      z1 = t;
    }
    if (!s.ok()) return s;
  }
  const uint16_t zflags = zero_range ? rp::kZeroSealed : 0;

  if (params_.mode == rp::Mode::Sync) {
    if (fail_on_error_.load() && !connected_.load()) return kUnreachable;
    if (!enter(r0, r1, true)) return kBitmapFailed;
    if (hist_) {
      // In the order the target gets them; a zero-range as its ciphertext (history.h).
      Status hs;
      if (grows) hs = history_record(rp::RecType::Resize, 0, off + len, nullptr, 0);
      for (int i = 0; i < nedges && hs.ok(); ++i) hs = history_record(rp::RecType::Write, edge[i].off, S, edge[i].data, S);
      if (hs.ok() && z1 > z0)
        hs = zero_range ? history_sealed_zero(z0, z1 - z0) : history_record(rp::RecType::Zero, z0, z1 - z0, nullptr, 0);
      if (!hs.ok()) {
        leave(r0, r1);
        return hs;
      }
    }
    s = next_->fallocate(io, mode, off, len);
    uint64_t after = before;
    if (s.ok()) (void)next_->size(&after);
    const bool sent = send_or_track(s.ok(), r0, r1, [&](rp::Target& t) {
      std::string err;
      if (after > before) err = t.resize(before, after);
      for (int i = 0; i < nedges && err.empty(); ++i) err = t.pwrite(edge[i].data, S, edge[i].off);
      if (err.empty() && z1 > z0) err = zero_range ? target_sealed_zero(z0, z1 - z0) : t.zero(z0, z1 - z0);
      if (err.empty() && after < before) err = t.resize(before, after);
      return err;
    });
    leave(r0, r1);
    if (s.ok() && !sent && fail_on_error_.load()) return kUnreachable;
    return s;
  }
  if (!enter(r0, r1, false)) return kBitmapFailed;
  Status js;
  bool save = false;
  {
    std::lock_guard<std::mutex> l(jmu_);
    auto rec = [&](rp::RecType type, uint64_t o, uint64_t n, const void* data, uint16_t flags) {
      if (!js.ok() && js.err != EINPROGRESS) return;
      js = journal_locked(type, o, n, data, 0, nullptr, flags);
      if (js.err == EINPROGRESS) save = true;
    };
    if (grows) rec(rp::RecType::Resize, 0, off + len, nullptr, 0);
    for (int i = 0; i < nedges; ++i) rec(rp::RecType::Write, edge[i].off, S, edge[i].data, 0);
    if (z1 > z0 && zero_range && params_.retention_us) {
      // The journal is the history: a zero-range is kept as its ciphertext (a restore has no
      // key to seal zeros), in Write records the shipper sends as they are.
      for (uint64_t o = z0; o < z1 && (js.ok() || js.err == EINPROGRESS);) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(z1 - o, 1u << 20));
        uint8_t* p = seal_buffer(n);
        Status ss = p ? Status::Ok() : kNoMemory;
        if (ss.ok()) {
          std::memset(p, 0, n);
          ss = seal_->seal(o, p, p, n);
        }
        if (!ss.ok()) {
          js = ss;
          break;
        }
        rec(rp::RecType::Write, o, n, p, 0);
        o += n;
      }
    } else if (z1 > z0) {
      rec(rp::RecType::Zero, z0, z1 - z0, nullptr, zflags);
    }
  }
  if (!js.ok() && js.err != EINPROGRESS) {
    (void)mark_pending(r0, r1);  // some records may be in: the resync sends what the image holds
    leave(r0, r1);
    return js;
  }
  if (save && !save_bitmap()) {
    leave(r0, r1);
    return kBitmapFailed;
  }
  s = next_->fallocate(io, mode, off, len);
  if (!s.ok()) (void)mark_pending(r0, r1);
  leave(r0, r1);
  wake();
  return s;
}

Status ReplicateFilter::resize(const Io& io, uint64_t size) {
  if (!opened_) return kNotOpen;
  uint64_t before = 0;
  Status s = next_->size(&before);
  if (!s.ok()) return s;
  // Ordered against every change at or past the shorter end (a write there races a truncate).
  rp::RangeLock::Guard order;
  const uint64_t from = std::min(before, size);
  lock_range(from, UINT64_MAX - from, &order);
  s = next_->size(&before);  // again, now that no change past `from` is in flight
  if (!s.ok()) return s;
  const uint64_t q0 = region_of(std::min(before, size)), q1 = region_of(std::max(before, size));
  if (params_.mode == rp::Mode::Async) {
    std::lock_guard<std::mutex> l(jmu_);
    if (by_ref_ && size < before) {
      Status ps = preserve_changed(io, size, before - size);  // a shrink overwrites the tail
      if (!ps.ok()) return ps;
    }
    Status js = journal_locked(rp::RecType::Resize, 0, size, nullptr, 0, nullptr);
    if (!js.ok() && js.err != EINPROGRESS) return js;  // the history cannot keep it (retention): not made
    if (js.err == EINPROGRESS && !save_bitmap()) return kBitmapFailed;
  } else {
    // Sync: in flight over the regions the size change touches until it is made, so a resync
    // that read the old size meanwhile does not count them done (it skips them, or sets them
    // pending again), and the next pass sends them at the new size.
    (void)enter(q0, q1, false);
    Status ts = mark_pending(q0, q1) ? Status::Ok() : kBitmapFailed;
    if (ts.ok() && hist_) ts = history_record(rp::RecType::Resize, 0, size, nullptr, 0);
    if (!ts.ok()) {
      leave(q0, q1);
      return ts;
    }
  }
  s = next_->resize(io, size);
  if (params_.mode == rp::Mode::Sync) {
    for (uint64_t r = q0; r <= q1; ++r) pending_.set(r);  // again, now that the size is the new one
    leave(q0, q1);
  }
  if (!s.ok() && params_.mode == rp::Mode::Async) (void)mark_pending(q0, q1);
  wake();
  return s;
}

// ---------------------------------------------------------------------------------------------
// Control.

Status ReplicateFilter::drain() {
  if (!opened_) return Status::Ok();
  if (journal_ && params_.mode == rp::Mode::Async) {
    std::string e = journal_->sync();
    if (!e.empty()) return kJournalFailed;
  }
  const uint64_t goal = journal_ ? appended_bytes_.load() : 0;
  const uint64_t req = drain_req_.fetch_add(1) + 1;
  {
    uint64_t g = drain_goal_.load();
    while (g < goal && !drain_goal_.compare_exchange_weak(g, goal)) {
    }
  }
  boost();
  bg_cv_.notify_one();
  std::unique_lock<std::mutex> l(bg_mu_);
  // While the target is unreachable, one fresh connection attempt decides: if it fails too,
  // the drain fails at once rather than hang a flush or an unmount.
  uint64_t started = connect_started_.load();
  bool waiting_attempt = false;
  while (drain_done_.load() < req) {
    if (stop_.load()) return kStopped;
    if (!connected_.load()) {
      if (!waiting_attempt) {
        started = connect_started_.load();
        waiting_attempt = true;
        kick_.store(true);
        bg_cv_.notify_one();
      } else if (connect_failed_.load() > started && !connected_.load()) {
        return kDrainUnreachable;
      }
    } else {
      waiting_attempt = false;
    }
    done_cv_.wait_for(l, std::chrono::milliseconds(20));
  }
  return Status::Ok();
}

Status ReplicateFilter::quiesce() {
  if (journal_ && params_.mode == rp::Mode::Async && !journal_->sync().empty()) return kJournalFailed;
  if (hist_ && !hist_->sync().empty()) return kHistoryFailed;  // sync mode's history, durable too
  return Status::Ok();
}

uint64_t ReplicateFilter::replica_lag_bytes() const {
  if (!opened_) return 0;
  uint64_t lag = pending_.count() << shift_;
  if (journal_) lag += appended_bytes_.load() - shipped_bytes_.load();
  return lag;
}

std::string ReplicateFilter::degraded_reason() const {
  if (!opened_ || connected_.load()) return {};
  return "replica unreachable";
}

std::string ReplicateFilter::describe() const {
  std::lock_guard<std::mutex> g(err_mu_);
  return rp::describe_replicate(params_);
}

std::string ReplicateFilter::stats_json() const {
  auto n = [](const std::atomic<uint64_t>& a) { return std::to_string(a.load(std::memory_order_relaxed)); };
  std::string s = "{\"mode\":";
  s += params_.mode == rp::Mode::Sync ? "\"sync\"" : "\"async\"";
  s += ",\"target\":" + json_str(params_.target);
  s += std::string(",\"sealed\":") + (seal_ ? "true" : "false");
  const bool conn = connected_.load();
  const uint64_t pend = pending_.count();
  std::string state = !opened_ ? "closed" : !conn ? "unreachable" : pend ? "resyncing" : "in-sync";
  if (conn && !pend && journal_ && replica_lag_bytes() > 0) state = "shipping";
  s += ",\"target_state\":" + json_str(state);
  s += ",\"lag_bytes\":" + std::to_string(replica_lag_bytes());
  // The age of the oldest record the target lacks (read from the journal: the shipper may be
  // waiting for the target).
  uint64_t head = 0;
  if (journal_ && appended_bytes_.load() > shipped_bytes_.load()) {
    rp::RecordHeader h;
    if (journal_->read_header(shipped_pos_.load(), &h).empty()) head = h.time_ns;
  }
  const uint64_t rn = real_ns();
  char sec[32];
  std::snprintf(sec, sizeof sec, "%.3f", head && rn > head ? (rn - head) / 1e9 : 0.0);
  s += ",\"lag_seconds\":" + std::string(sec);
  s += ",\"journal_bytes\":" + std::to_string(journal_ ? journal_->end() - rp::kJournalHeader : 0);
  {
    // jmode_ is read without jmu_: a moment's value for a report.
    s += ",\"journal_mode\":";
    s += !journal_ ? "null" : (collapsed_.load() ? "\"bitmap\"" : "\"journal\"");
  }
  s += ",\"dirty_regions\":" + std::to_string(bitmap_ ? bitmap_->count() : 0);
  s += ",\"pending_regions\":" + std::to_string(pend);
  s += ",\"region_size\":" + std::to_string(uint64_t(1) << shift_);
  s += ",\"resync_total_regions\":" + n(resync_total_) + ",\"resync_done_regions\":" + n(resync_done_);
  s += ",\"bytes_sent\":" + n(bytes_sent_) + ",\"bytes_resent\":" + n(bytes_resent_) +
       ",\"bytes_zeroed\":" + n(bytes_zeroed_);
  s += ",\"journal_by_reference\":" + std::string(by_ref_ ? "true" : "false") +
       ",\"referenced_bytes\":" + n(referenced_bytes_) + ",\"preserved_bytes\":" + n(preserved_bytes_) +
       ",\"preserves\":" + n(preserves_);
  s += ",\"journaled_bytes\":" + n(journaled_bytes_) + ",\"shipped_bytes\":" + n(shipped_bytes_) +
       ",\"records_shipped\":" + n(records_shipped_) + ",\"bytes_copied\":" + n(bytes_copied_);
  s += ",\"writes_tracked\":" + n(writes_tracked_) + ",\"collapses\":" + n(collapses_) +
       ",\"backpressure_waits\":" + n(backpressure_waits_) +
       ",\"overlap_waits\":" + std::to_string(ranges_.waits()) +
       ",\"requests_offloaded\":" + std::to_string(offload_.taken());
  s += ",\"target_errors\":" + n(target_errors_) + ",\"reconnects\":" + n(reconnects_);
  s += ",\"bitmap_saves\":" + std::to_string(bitmap_ ? bitmap_->saves() : 0);
  s += ",\"bitmap_pages_written\":" + std::to_string(bitmap_ ? bitmap_->pages_written() : 0);
  if (params_.retention_us) {
    s += ",\"history\":{\"journal\":" + json_str(history_.journal) + ",\"base\":" + json_str(history_.base) +
         ",\"meta\":" + json_str(history_.meta) + ",\"retention_s\":" + std::to_string(params_.retention_us / 1'000'000) +
         ",\"window_start_ns\":" + n(window_start_ns_) + ",\"compacted_records\":" + n(compacted_records_) +
         ",\"points\":" + n(points_) + ",\"bytes\":" +
         std::to_string(hjournal() ? hjournal()->end() - rp::kJournalHeader : 0) + "}";
  } else {
    s += ",\"history\":null";
  }
  const uint64_t lc = last_consistent_ns_.load();
  s += ",\"last_consistent_ns\":" + (lc ? std::to_string(lc) : std::string("null"));
  std::lock_guard<std::mutex> g(err_mu_);
  s += ",\"last_error\":" + (last_error_.empty() ? std::string("null") : json_str(last_error_)) + "}";
  return s;
}

// ---------------------------------------------------------------------------------------------
// The background thread.

bool ReplicateFilter::connect_target() {
  {
    std::lock_guard<RwLock> g(target_rw_);
    connected_.store(false);
    if (target_) target_->close();
    target_.reset();
  }
  // Numbered when it starts: drain() trusts only the failure of an attempt that began after
  // its own request, not one already under way before the target came back.
  const uint64_t attempt = connect_started_.fetch_add(1) + 1;
  uint64_t size = 0;
  {
    BelowGuard below_ = below();  // this runs on the filter's own thread (filter.h)
    if (!below_ || !below_->size(&size).ok()) return false;
  }
  std::unique_ptr<rp::Target> t = rp::make_target(params_.target, params_.target_is_nbd);
  if (seal_) t = rp::make_container_target(std::move(t), header_bytes_);
  std::string e = t->connect(relpath_, size);
  // The replica is the whole container: its header first (keyslots may have changed offline
  // since the last connection, so it is copied every time; it is small).
  if (e.empty() && seal_) e = copy_header(t.get());
  if (!e.empty()) {
    {
      uint64_t f = connect_failed_.load();
      while (f < attempt && !connect_failed_.compare_exchange_weak(f, attempt)) {
      }
    }
    done_cv_.notify_all();
    bool first;
    {
      std::lock_guard<std::mutex> g(err_mu_);
      first = last_error_ != e;
      last_error_ = e;
    }
    if (first) spdlog::warn("{}: replicate: {} (retrying with backoff)", relpath_, e);
    return false;
  }
  // Whatever the target had not confirmed (flushed) may be lost with the old connection.
  for (uint64_t r = bitmap_->next(0); r != rp::AtomicBits::npos; r = bitmap_->next(r + 1))
    pending_.set(r);
  if (journal_) {
    std::lock_guard<std::mutex> l(jmu_);
    shipped_pos_.store(journal_->ship_off());
    shipped_seq_ = journal_->ship_seq();
    shipped_bytes_.store(flushed_bytes_.load());
  }
  target_size_.store(size);
  {
    std::lock_guard<RwLock> g(target_rw_);
    target_ = std::move(t);
    need_reconnect_.store(false);
    connected_.store(true);
  }
  const bool again = ever_connected_;
  ever_connected_ = true;
  if (again) reconnects_.fetch_add(1, std::memory_order_relaxed);
  spdlog::info("{}: replicate: {} {} ({} regions to resync, {} journal bytes to ship)", relpath_,
               again ? "reconnected to" : "connected to", target_->where(), pending_.count(),
               journal_ ? journal_->end() - shipped_pos_.load() : 0);
  return true;
}

std::string ReplicateFilter::sync_target_size(uint64_t size) {
  const uint64_t cur = target_size_.load();
  if (size == cur) return "";
  std::string e = target_->resize(cur, size);
  if (e.empty()) target_size_.store(size);
  return e;
}

bool ReplicateFilter::ship_some(std::string* err) {
  const uint64_t epoch = jepoch_.load();
  uint64_t pos = shipped_pos_.load();
  const uint64_t end = journal_->end();
  if (pos >= end) {
    head_time_ns_.store(0);
    return false;
  }
  uint64_t sent = 0, seq = shipped_seq_, bytes = 0, last_time = 0;
  // The copies run at idle priority while nothing waits for them, so shipping uses CPU the
  // guest's writes leave over: not while a drain waits, the lag is past half of max-lag (before
  // backpressure can hold writers on it), or the thread stops; drain() and writers held by
  // backpressure raise it themselves (boost()). Only the copy loop: the thread takes jmu_ and
  // the bitmap's lock at normal priority, so a writer never waits on an idle holder.
  // By reference, a shipper far behind makes overwrites copy their old bytes first (refmap.h):
  // it leaves idle priority once the lag passes a quarter of the image.
  const uint64_t lag = appended_bytes_.load() - shipped_bytes_.load();
  const bool idle = may_idle_ && drain_req_.load() <= drain_done_.load() && lag < max_lag_.load() / 2 &&
                    (!by_ref_ || lag < target_size_.load() / 4);
  if (idle && set_idle(bg_tid_.load(), true)) bg_sched_idle_.store(true);
  struct Raise {
    ReplicateFilter* f;
    ~Raise() { f->boost(); }
  } raise{this};
  while (pos < end && sent < kShipBatch && !stop_.load()) {
    rp::RecordHeader h;
    bool local = false;
    // A Write record's data goes from the journal to the target in the kernel when the target
    // can take it that way (a directory: one copy instead of a read and a write). Records below
    // end() need no checksum here: this process wrote them, or the scan at open checked them.
    bool copied = false;
    std::string e = journal_->read_header(pos, &h);
    const bool byref = e.empty() && rp::by_reference(h);
    if (byref) {
      // From the image, once this record's write has landed there (refmap.h).
      bool landed = false;
      with_refs([&] { landed = refs_.is_landed(h.seq); });
      if (!landed) break;  // its writer wakes us
      if (by_ref_) {
        e = ship_by_ref(h, epoch, &local);
      } else {  // never reached: open() collapses such a journal (sealing must not ship plaintext)
        e = "a record by reference under a policy that cannot ship it";
        local = true;
      }
      if (jepoch_.load() != epoch) return true;
      if (!e.empty() && !local) {
        *err = e;
        break;
      }
      copied = true;
    } else if (e.empty() && h.type == static_cast<uint16_t>(rp::RecType::Preserve)) {
      copied = true;  // shipped with the record it belongs to
    } else if (e.empty() && h.type == static_cast<uint16_t>(rp::RecType::Write) && h.data_len) {
      if (jepoch_.load() != epoch) return true;
      e = target_->copy_from(journal_->fd(), pos + sizeof h, h.data_len, h.off, &copied);
      if (copied) bytes_copied_.fetch_add(h.data_len, std::memory_order_relaxed);
      // A collapse cut the journal under the copy: what landed is in regions now pending.
      if (jepoch_.load() != epoch) return true;
      if (!e.empty()) {
        *err = e;
        break;
      }
    }
    if (e.empty() && !copied) e = journal_->read(pos, &h, &rec_);
    if (jepoch_.load() != epoch) return true;  // collapsed meanwhile: start over
    if (!e.empty()) {
      spdlog::error("{}: replicate: {}; collapsing the journal into the bitmap", relpath_, e);
      boost();  // normal priority before jmu_
      std::lock_guard<std::mutex> l(jmu_);
      if (jepoch_.load() == epoch) collapse_locked("a journal record could not be read");
      return true;
    }
    head_time_ns_.store(h.time_ns);
    switch (static_cast<rp::RecType>(h.type)) {
      case rp::RecType::Write:
        if (!copied) e = target_->pwrite(rec_.data(), h.data_len, h.off);
        break;
      case rp::RecType::Zero:
        e = seal_ && (h.flags & rp::kZeroSealed) ? target_sealed_zero(h.off, h.len) : target_->zero(h.off, h.len);
        break;
      case rp::RecType::Resize:
        e = target_->resize(target_size_.load(), h.len);
        if (e.empty()) target_size_.store(h.len);
        break;
      case rp::RecType::Point:
      case rp::RecType::Preserve: break;
    }
    if (!e.empty()) {
      *err = e;
      break;
    }
    pos += sizeof h + h.data_len;
    seq = h.seq + 1;
    sent += sizeof h + (byref ? h.len : h.data_len);
    bytes += byref ? h.len : h.type == static_cast<uint16_t>(rp::RecType::Preserve) ? 0 : h.data_len;
    last_time = h.time_ns;
    if (h.type != static_cast<uint16_t>(rp::RecType::Preserve))  // part of an earlier record's shipping
      records_shipped_.fetch_add(1, std::memory_order_relaxed);
  }
  boost();  // normal priority before jmu_
  if (sent == 0) return !err->empty();
  bytes_sent_.fetch_add(bytes, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> l(jmu_);
    if (jepoch_.load() != epoch) return true;
    shipped_pos_.store(pos);
    shipped_seq_ = seq;
    shipped_bytes_.fetch_add(sent);
    unflushed_ += sent;
  }
  if (last_time) last_shipped_time_ = last_time;
  if (pos >= end) head_time_ns_.store(0);
  jcv_.notify_all();
  // The ship point is made durable every kPersistEvery bytes, and when caught up at most five
  // times a second (a target flush and a journal fdatasync each): run() does the last one.
  if (err->empty() && (unflushed_ >= kPersistEvery ||
                       (pos >= journal_->end() && mono_ns() - last_persist_ns_ >= kPersistIntervalNs)))
    *err = persist_ship_point(false);
  return true;
}

std::string ReplicateFilter::persist_ship_point(bool cut) {
  if (!journal_ || (unflushed_ == 0 && !cut)) return "";
  std::string e = target_->flush();
  if (!e.empty()) return e;
  std::lock_guard<std::mutex> l(jmu_);
  flushed_bytes_.store(shipped_bytes_.load());
  if (last_shipped_time_) last_consistent_ns_.store(last_shipped_time_);
  unflushed_ = 0;
  last_persist_ns_ = mono_ns();
  if (!owner()) return "";
  const uint64_t pos = shipped_pos_.load();
  bool cut_now = !params_.retention_us && pos >= journal_->end() && (cut || journal_->end() > kResetAbove);
  if (cut_now) {
    // Records reserved before we took jmu_ may still be on their way into the file (not in
    // end() yet): let them land, and cut only if they were shipped too.
    journal_->wait_idle();
    cut_now = pos >= journal_->end();
  }
  if (cut_now) {
    e = journal_->reset();
    if (e.empty()) {
      shipped_pos_.store(journal_->end());
      shipped_seq_ = journal_->next_seq();
      std::lock_guard<std::mutex> r(rmu_);
      refs_.clear();
      jepoch_.fetch_add(1);
    }
  } else {
    e = journal_->set_shipped(pos, shipped_seq_);
    if (e.empty()) {
      // Flushed on the target and past the durable ship point: no replay or reconnect ships
      // these records again, so their bytes need no preserving any more (refmap.h).
      std::lock_guard<std::mutex> r(rmu_);
      refs_.forget_before(shipped_seq_);
    }
  }
  if (!e.empty()) spdlog::error("{}: replicate: {}", relpath_, e);
  return "";
}

bool ReplicateFilter::resync_some(std::string* err) {
  if (pending_.count() == 0) return false;
  // The filter's own thread: every call below goes through a BelowGuard (filter.h), held for
  // the reads only, never across the target's network I/O. The size is read once: the target
  // is given it and the regions are copied at it (a resize after this marks its regions
  // pending again, so the next pass resizes the target before it copies them).
  uint64_t size = 0;
  {
    BelowGuard below_ = below();
    if (!below_ || !below_->size(&size).ok()) return false;
  }
  std::string e = sync_target_size(size);
  if (!e.empty()) {
    *err = e;
    return true;
  }
  const uint64_t region = uint64_t(1) << shift_;
  bool did = false;
  for (uint64_t n = 0; n < kResyncBatch && !stop_.load(); ++n) {
    uint64_t r = pending_.next(resync_cursor_);
    if (r == rp::AtomicBits::npos) {
      if (resync_cursor_ == 0) break;
      resync_cursor_ = 0;
      r = pending_.next(0);
      if (r == rp::AtomicBits::npos) break;
    }
    resync_cursor_ = r + 1;
    const uint64_t st = stripe(r);
    if (inflight_[st].load() != 0) continue;  // a write is on its way there; come back
    const uint32_t g0 = gen_[st].load();
    if (!pending_.clear(r)) continue;
    did = true;
    const uint64_t off = r << shift_;
    uint64_t data = 0, zeroed = 0;
    if (off >= size) {
      e = target_->zero(off, region);
      zeroed = region;
    } else {
      const uint64_t len = std::min(region, size - off);
      std::optional<BelowGuard> below_(below());
      if (!*below_) {  // left the chain: nothing to read from any more
        pending_.set(r);
        return did;
      }
      uint64_t d = 0;
      Status s = (*below_)->seek(Io{}, off, SEEK_DATA, &d);
      if ((!s.ok() && s.err == ENXIO) || (s.ok() && d >= off + len)) {
        below_.reset();
        e = target_->zero(off, region);  // a hole
        zeroed = region;
      } else {
        size_t got = 0;
        s = (*below_)->read(Io{}, buf_.data(), static_cast<size_t>(len), off, &got);
        holes_.clear();
        if (seal_ && s.ok()) {
          // The holes inside the region (a punched range): the backing file has zero bytes there,
          // not the encryption of zeros, and so must the replica (byte-exact). A write that fills
          // one meanwhile changes the generation, and the region is sent again.
          for (uint64_t p = off; p < off + got;) {
            uint64_t h = 0, d = off + got;
            if (!(*below_)->seek(Io{}, p, SEEK_HOLE, &h).ok() || h >= off + got) break;
            uint64_t dd = 0;
            if ((*below_)->seek(Io{}, h, SEEK_DATA, &dd).ok() && dd < d) d = dd;
            if (d <= h || h < p) break;
            holes_.push_back({h, d});
            p = d;
          }
        }
        below_.reset();
        if (!s.ok()) {
          pending_.set(r);
          spdlog::error("{}: replicate: cannot read region {} for the resync: {}", relpath_, r,
                        s.what ? s.what : std::strerror(s.err));
          return did;
        }
        if (seal_) {
          // Sealed again: XTS gives the very bytes the backing file holds (zero plaintext too:
          // the region has data, so the encrypt filter wrote it as ciphertext).
          const size_t whole = (got + AtRest::kSector - 1) / AtRest::kSector * AtRest::kSector;
          if (whole > got) std::memset(buf_.data() + got, 0, whole - got);
          s = seal_->seal(off, buf_.data(), buf_.data(), whole);
          for (const auto& [h0, h1] : holes_) {
            const uint64_t a = (h0 + AtRest::kSector - 1) / AtRest::kSector * AtRest::kSector;
            const uint64_t b = std::min<uint64_t>(h1 / AtRest::kSector * AtRest::kSector, off + whole);
            if (b > a) std::memset(buf_.data() + (a - off), 0, b - a);
          }
          e = s.ok() ? target_->pwrite(buf_.data(), whole, off)
                     : std::string("cannot seal: ") + (s.what ? s.what : std::strerror(s.err));
          data = whole;
          got = whole;
          if (e.empty() && got < region) e = target_->zero(off + got, region - got);
        } else if (all_zero(buf_.data(), got)) {
          e = target_->zero(off, region);
          zeroed = region;
        } else {
          e = target_->pwrite(buf_.data(), got, off);
          data = got;
          if (e.empty() && got < region) e = target_->zero(off + got, region - got);
        }
      }
    }
    if (!e.empty()) {
      pending_.set(r);
      *err = e;
      return true;
    }
    bytes_resent_.fetch_add(data, std::memory_order_relaxed);
    bytes_zeroed_.fetch_add(zeroed, std::memory_order_relaxed);
    if (inflight_[st].load() != 0 || gen_[st].load() != g0) pending_.set(r);  // written meanwhile
    else resync_done_.fetch_add(1, std::memory_order_relaxed);
    unflushed_regions_ = true;
  }
  {
    // The image changed size during the pass: the regions between the two sizes may have gone
    // at the old one, so they go again (the next pass gives the target the new size first).
    uint64_t now = size;
    BelowGuard below_ = below();
    if (below_ && below_->size(&now).ok() && now != size)
      for (uint64_t r = region_of(std::min(now, size)); r <= region_of(std::max(now, size)); ++r) {
        bitmap_->set(r);
        pending_.set(r);
      }
  }
  if (pending_.count() == 0 && journal_) {
    std::lock_guard<std::mutex> l(jmu_);
    if (jmode_ == JMode::Bitmap && pending_.count() == 0) {
      jmode_ = JMode::Journal;
      collapsed_.store(false);
      spdlog::info("{}: replicate: resync done; journaling again", relpath_);
    }
  }
  return did;
}

bool ReplicateFilter::clean(bool force, std::string* err) {
  // Dirty bits of regions the target has (not pending, no write in flight, and — unless
  // forced — not written since the last pass, so hot regions stay marked, as DRBD's activity
  // log keeps hot extents) are cleared after a target flush.
  std::vector<uint64_t>& cleared = cleared_;
  cleared.clear();
  rp::PersistentBitmap& bits = *bitmap_;
  // Sync mode marks every write's regions: they stay marked while there are few (an activity
  // window of kActivityRegions, as DRBD's activity log), so a guest that keeps writing the same
  // areas pays no bitmap write; a flush or a crowded window clears the cold ones.
  const bool crowded = params_.mode == rp::Mode::Async || bits.count() > kActivityRegions;
  for (uint64_t r = crowded || force ? bits.next(0) : rp::AtomicBits::npos; r != rp::AtomicBits::npos; r = bits.next(r + 1)) {
    const uint64_t st = stripe(r);
    const uint32_t g = gen_[st].load();
    const bool cold = force || clean_gen_[st] == g;
    clean_gen_[st] = g;
    if (!cold || pending_.test(r) || inflight_[st].load() != 0) continue;
    bits.clear(r);
    if (inflight_[st].load() != 0 || pending_.test(r)) bits.set(r);  // a writer came by: keep it
    else cleared.push_back(r);
  }
  if (cleared.empty() && !unflushed_regions_) return false;
  std::string e = target_->flush();
  if (!e.empty()) {
    for (uint64_t r : cleared) {
      bits.set(r);
      pending_.set(r);
    }
    *err = e;
    return true;
  }
  unflushed_regions_ = false;
  if (!cleared.empty()) (void)save_bitmap();
  return !cleared.empty();
}

void ReplicateFilter::run() {
  uint64_t backoff_us = 100'000;
  clean_gen_.assign(kStripes, 0);
  // Async: the thread copies records at idle priority (SCHED_IDLE, see ship_some()) where the
  // process may raise it again (CAP_SYS_NICE).
  may_idle_ = params_.mode == rp::Mode::Async && can_leave_idle();
  bg_tid_.store(static_cast<pid_t>(syscall(SYS_gettid)));
  while (!stop_.load()) {
    if (!connected_.load() || need_reconnect_.load()) {
      if (!connect_target()) {
        std::unique_lock<std::mutex> l(bg_mu_);
        bg_cv_.wait_for(l, std::chrono::microseconds(backoff_us), [&] { return stop_.load() || kick_.exchange(false); });
        backoff_us = std::min(backoff_us * 2, reconnect_max_us_.load());
        continue;
      }
      backoff_us = 100'000;
      done_cv_.notify_all();
    }
    std::string err;
    bool did = false;
    {
      target_rw_.lock_shared();  // no reconnect can swap the target while we use it
      if (journal_) did |= ship_some(&err);
      if (err.empty()) did |= resync_some(&err);
      const uint64_t req = drain_req_.load();
      const uint64_t now = now_ns();
      const bool draining = req > drain_done_.load();
      if (err.empty() && (draining || now >= clean_after_ns_)) {
        did |= clean(draining, &err);
        clean_after_ns_ = now + kCleanIntervalNs;
      }
      if (err.empty() && draining && pending_.count() == 0 &&
          (!journal_ || shipped_bytes_.load() >= std::min(drain_goal_.load(), appended_bytes_.load()))) {
        err = journal_ ? persist_ship_point(true) : target_->flush();
        if (err.empty()) {
          drain_done_.store(req);
          done_cv_.notify_all();
        }
      }
      target_rw_.unlock_shared();
    }
    if (!err.empty()) {
      target_failed(err);
      continue;
    }
    if (params_.retention_us) compact();
    if (!did && journal_ && unflushed_ && mono_ns() - last_persist_ns_ >= kPersistIntervalNs) {
      target_rw_.lock_shared();
      err = persist_ship_point(false);
      target_rw_.unlock_shared();
      if (!err.empty()) {
        target_failed(err);
        continue;
      }
    }
    if (!did) {
      std::unique_lock<std::mutex> l(bg_mu_);
      bg_idle_.store(true);
      bg_cv_.wait_for(l, std::chrono::milliseconds(20), [&] {
        return stop_.load() || need_reconnect_.load() || drain_req_.load() > drain_done_.load();
      });
      bg_idle_.store(false);
    }
  }
  boost();
  // Stopping: leave the target with what it has confirmed, and the files saying so.
  if (connected_.load()) {
    std::string err;
    target_rw_.lock_shared();
    (void)clean(false, &err);
    if (err.empty() && journal_) (void)persist_ship_point(false);
    target_rw_.unlock_shared();
  }
}

// ---------------------------------------------------------------------------------------------
// Continuous data protection.

std::string ReplicateFilter::start_history() {
  history_ = rp::HistoryFiles{base_ + ".journal", base_ + ".cdp-base", base_ + ".cdp-meta"};
  rp::Journal* j = hjournal();
  const uint64_t po = seal_ ? header_bytes_ : 0;  // where the payload starts in the base
  rp::HistoryMeta m;
  if (rp::read_history_meta(history_.meta, &m).empty()) {
    // Kept, unless it is of the other kind (sealed or not) or does not fit the journal.
    if (m.payload_off == po && m.history_off <= j->end() && m.history_seq <= j->next_seq()) {
      window_start_ns_.store(m.window_start_ns);
      return "";
    }
    spdlog::warn("{}: replicate: the history kept by an earlier run does not fit this policy or journal; a new one starts",
                 relpath_);
  }
  // No history yet: the base is the image as it is now, before any write of this open; the
  // records appended from here on are its history. Under encryption it is the container: the
  // header, then the payload sealed again (XTS: the bytes the backing file holds), holes kept.
  constexpr uint64_t S = AtRest::kSector;
  const int fd = ::open(history_.base.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return "cannot create " + history_.base + ": " + std::strerror(errno);
  uint64_t size = 0;
  Status s = next_->size(&size);
  std::string err;
  if (s.ok() && ::ftruncate(fd, static_cast<off_t>(po + size)) != 0) err = "cannot size " + history_.base;
  std::vector<uint8_t> buf(1u << 20);
  if (seal_ && err.empty()) {
    for (uint64_t o = 0; o < po && err.empty();) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), po - o));
      Status hs = seal_->read_header(buf.data(), n, o);
      if (!hs.ok()) err = std::string("cannot read the container's header: ") + (hs.what ? hs.what : std::strerror(hs.err));
      else if (::pwrite(fd, buf.data(), n, static_cast<off_t>(o)) != static_cast<ssize_t>(n))
        err = "cannot write " + history_.base + ": " + std::strerror(errno);
      o += n;
    }
  }
  for (uint64_t off = 0; s.ok() && err.empty() && off < size;) {
    uint64_t d = 0;
    Status k = next_->seek(Io{}, off, SEEK_DATA, &d);
    if (!k.ok()) break;  // ENXIO: the rest is a hole
    if (seal_) d = std::max(off, d / S * S);
    uint64_t h = size;
    if (!next_->seek(Io{}, d, SEEK_HOLE, &h).ok()) h = size;
    if (h <= d) h = std::min(size, d + buf.size());
    for (uint64_t p = d; p < h && err.empty();) {
      size_t got = 0;
      s = next_->read(Io{}, buf.data(), static_cast<size_t>(std::min<uint64_t>(buf.size(), h - p)), p, &got);
      if (!s.ok() || got == 0) break;
      size_t put = got;
      if (seal_) {
        put = (got + S - 1) / S * S;  // whole sectors (the tail of the last one reads as zeros)
        std::memset(buf.data() + got, 0, put - got);
        s = seal_->seal(p, buf.data(), buf.data(), put);
        if (!s.ok()) break;
      }
      if (::pwrite(fd, buf.data(), put, static_cast<off_t>(po + p)) != static_cast<ssize_t>(put))
        err = "cannot write " + history_.base + ": " + std::strerror(errno);
      p += put;
    }
    off = std::max(h, d + 1);
  }
  if (!s.ok() && err.empty()) err = std::string("cannot read the image: ") + (s.what ? s.what : std::strerror(s.err));
  if (err.empty() && ::fdatasync(fd) != 0) err = "cannot sync " + history_.base;
  ::close(fd);
  if (!err.empty()) return err;
  m.window_start_ns = real_ns();
  m.history_off = j->end();
  m.history_seq = j->next_seq();
  m.payload_off = po;
  err = rp::write_history_meta(history_.meta, m);
  if (!err.empty()) return err;
  err = j->drop_history(m.history_off, m.history_seq);
  window_start_ns_.store(m.window_start_ns);
  spdlog::info("{}: replicate: history kept for {}s from now (base {} of {})", relpath_,
               params_.retention_us / 1'000'000, history_.base, format_size(size));
  return err;
}

void ReplicateFilter::compact() {
  const uint64_t now = real_ns();
  if (now < next_compact_ns_ || !owner()) return;
  next_compact_ns_ = now + 1'000'000'000ull;
  const uint64_t cutoff = now - std::min(now, params_.retention_us * 1000);
  const int lock = ::open(history_.meta.c_str(), O_RDONLY | O_CLOEXEC);
  if (lock < 0) return;
  if (::flock(lock, LOCK_EX | LOCK_NB) != 0) {  // a restore is reading: later
    ::close(lock);
    return;
  }
  rp::Journal* j = hjournal();
  std::string e;
  if (hist_) {
    // Sync mode: the history journal is made durable and its ship point moved over it, so the
    // scan at the next open starts there (and only durable records are folded below).
    uint64_t off = 0, seq = 0;
    {
      std::lock_guard<std::mutex> l(hmu_);
      hist_->wait_idle();  // end() and next_seq() then name the same place
      off = hist_->end();
      seq = hist_->next_seq();
    }
    if (off > hist_->ship_off()) {
      e = hist_->sync();
      if (e.empty()) {
        std::lock_guard<std::mutex> l(hmu_);
        e = hist_->set_shipped(off, seq);
      }
    }
  }
  rp::HistoryMeta m;
  if (e.empty()) e = rp::read_history_meta(history_.meta, &m);
  uint64_t ship_off = 0;
  {
    // Async: only what the target has confirmed is folded; sync: what is durable.
    std::lock_guard<std::mutex> l(hlock());
    ship_off = j->ship_off();
  }
  // The records to fold: older than the retention, shipped, at most 64 MiB per pass.
  uint64_t new_off = m.history_off, new_seq = m.history_seq, newest = 0, n = 0;
  const uint64_t po = m.payload_off;
  const int jfd = j->fd();
  auto reader = [jfd](uint64_t off, void* buf, size_t len) -> long {
    ssize_t r = ::pread(jfd, buf, len, static_cast<off_t>(off));
    return r < 0 ? -1 : static_cast<long>(r);
  };
  if (e.empty())
    rp::scan_journal(reader, m.history_off, m.history_seq, [&](const rp::RecordHeader& h, const uint8_t*, uint64_t at) {
      if (at >= ship_off || h.time_ns >= cutoff || new_off - m.history_off > (64u << 20)) return false;
      new_off = at + sizeof h + h.data_len;
      new_seq = h.seq + 1;
      newest = std::max(newest, h.time_ns);
      ++n;
      return true;
    });
  if (e.empty() && n) {
    // 1. No restore may ask for a moment the base is about to pass.
    rp::HistoryMeta m1 = m;
    m1.window_start_ns = std::max(m.window_start_ns, newest);
    e = rp::write_history_meta(history_.meta, m1);
    // 2. Fold the records into the base.
    const int bfd = e.empty() ? ::open(history_.base.c_str(), O_RDWR | O_CLOEXEC) : -1;
    if (e.empty() && bfd < 0) e = "cannot open " + history_.base;
    if (bfd >= 0) {
      rp::scan_journal(reader, m.history_off, m.history_seq, [&](const rp::RecordHeader& h, const uint8_t* data, uint64_t at) {
        if (at >= new_off) return false;
        bool ok = true;
        if (h.type == static_cast<uint16_t>(rp::RecType::Preserve) ||
            rp::by_reference(h)) {
          // Never in a history (see history.cc, restore): the base is not folded over it.
          e = "a record without its data (journal by reference) in the history of " + history_.base;
          return false;
        }
        switch (static_cast<rp::RecType>(h.type)) {
          case rp::RecType::Write: ok = ::pwrite(bfd, data, h.data_len, static_cast<off_t>(po + h.off)) == h.data_len; break;
          case rp::RecType::Zero:
            ok = ::fallocate(bfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(po + h.off),
                             static_cast<off_t>(h.len)) == 0;
            break;
          case rp::RecType::Resize: ok = ::ftruncate(bfd, static_cast<off_t>(po + h.len)) == 0; break;
          case rp::RecType::Point:
          case rp::RecType::Preserve: break;  // refused above
        }
        if (!ok) e = "cannot write " + history_.base + ": " + std::strerror(errno);
        return ok;
      });
      if (e.empty() && ::fdatasync(bfd) != 0) e = "cannot sync " + history_.base;
      ::close(bfd);
    }
    // 3. The new history point, then the folded records go.
    if (e.empty()) {
      rp::HistoryMeta m2 = m1;
      m2.history_off = new_off;
      m2.history_seq = new_seq;
      e = rp::write_history_meta(history_.meta, m2);
      if (e.empty()) {
        std::lock_guard<std::mutex> l(hlock());
        e = j->drop_history(new_off, new_seq);
      }
      window_start_ns_.store(m2.window_start_ns);
      compacted_records_.fetch_add(n, std::memory_order_relaxed);
    }
  }
  ::flock(lock, LOCK_UN);
  ::close(lock);
  if (!e.empty()) {
    note_error(e);
    spdlog::error("{}: replicate: history compaction: {}", relpath_, e);
  }
}

Status ReplicateFilter::history_record(rp::RecType type, uint64_t off, uint64_t len, const void* data,
                                       uint32_t data_len, uint16_t flags) {
  const uint32_t dcrc = rp::crc32c(0, data, data_len);  // before the lock (journal.h)
  rp::Reservation res;
  {
    std::lock_guard<std::mutex> l(hmu_);
    res = hist_->reserve(type, real_ns(), off, len, data_len, dcrc, flags);
  }
  std::string e = hist_->commit(res, data);
  if (e.empty()) return Status::Ok();
  note_error(e);
  std::lock_guard<std::mutex> l(hmu_);
  return history_failed_locked(e);
}

Status ReplicateFilter::history_failed_locked(const std::string& e) {
  rp::Journal* const j = hjournal();
  if (j->broken()) {
    // The first to get here cuts the broken tail (every record reserved after it failed too,
    // and their changes with them), so the history goes on from its last sound record.
    spdlog::error("{}: replicate: {}; the change fails (EIO) and is not made", relpath_, e);
    std::string re = j->repair();
    if (!re.empty()) spdlog::error("{}: replicate: {}", relpath_, re);
  }
  return kHistoryFailed;
}

Status ReplicateFilter::history_sealed_zero(uint64_t off, uint64_t len) {
  constexpr size_t kChunk = 1u << 20;
  while (len) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(len, kChunk));
    uint8_t* p = seal_buffer(n);
    if (!p) return kNoMemory;
    std::memset(p, 0, n);
    Status st = seal_->seal(off, p, p, n);
    if (st.ok()) st = history_record(rp::RecType::Write, off, n, p, static_cast<uint32_t>(n));
    if (!st.ok()) return st;
    off += n;
    len -= n;
  }
  return Status::Ok();
}

Status ReplicateFilter::snapshot(std::string_view name) {
  if (!opened_ || !params_.retention_us) return Status::Ok();
  std::lock_guard<std::mutex> l(hlock());
  rp::Journal* j = hjournal();
  std::string e = j->append(rp::RecType::Point, real_ns(), 0, name.size(), name.data(),
                            static_cast<uint32_t>(name.size()));
  if (e.empty()) {
    if (params_.mode == rp::Mode::Async) appended_bytes_.fetch_add(sizeof(rp::RecordHeader) + name.size());
    e = j->sync();
  }
  if (!e.empty()) {
    note_error(e);
    spdlog::error("{}: replicate: restore point '{}': {}", relpath_, std::string(name), e);
    return Status::Error(EIO, "replicate: the restore point could not be recorded");
  }
  points_.fetch_add(1, std::memory_order_relaxed);
  spdlog::info("{}: replicate: restore point '{}'", relpath_, std::string(name));
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------

void register_replicate(Registry& r) {
  FilterInfo info;
  info.name = "replicate";
  info.cls = FilterClass::Replicate;
  info.api_version = kFilterApiVersion;
  info.description =
      "keeps a replica in a directory or on an NBD server, synchronously or through a crash-safe journal, with a "
      "persistent dirty bitmap so that only changed regions are resent";
  info.params = rp::replicate_keys();
  info.validate = [](const YAML::Node& params, YAML::Node* where) { return rp::validate_replicate(params, where); };
  info.create = [](const YAML::Node& params) -> std::unique_ptr<Filter> {
    rp::ReplicateParams p;
    if (!rp::parse_replicate(params, &p).empty()) return nullptr;
    return std::make_unique<ReplicateFilter>(p);
  };
  // Per request (filter.h, "Deferring"): a guest's read passes through untouched (the default
  // Filter::read), so it goes below with the request's Deferrer and a throttle below may park
  // it. A write does not: replicate works on its result (the send, the bitmap, the range lock
  // it holds until then), so write() takes it and carries it on its own threads, where it goes
  // below with a Deferrer of the carrying thread's, which waits for it (Offload::Waiter).
  info.passes_deferral = true;
  r.add(std::move(info));
}

}  // namespace iofilterfs
