#include "format/qcow2.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <unistd.h>
#include <zlib.h>
#ifdef IOFILTERFS_HAVE_ZSTD
#include <zstd.h>
#endif

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>

#include "format/file.h"

namespace iofilterfs::format {
namespace {

constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;  // L1 and standard L2 entries: bits 9-55
constexpr uint64_t kCopied = 1ull << 63;
constexpr uint64_t kZero = 1ull;  // v3 standard L2 entries without extended L2
constexpr uint64_t kMaxL1Bytes = 32ull << 20;        // QEMU's limit too
constexpr uint64_t kMaxRefTableBytes = 8ull << 20;   // QEMU's limit too
constexpr uint64_t kMaxVirtualSize = 1ull << 56;     // 64 PiB: more than any host offset can address
constexpr uint64_t kMaxFileOffset = 1ull << 56;      // offsets are 56-bit in L2 entries
constexpr uint32_t kMaxSnapshots = 65536;
constexpr size_t kCacheBytes = 32u << 20;  // per cache, clean tables beyond it are dropped
constexpr size_t kMaxDirtyTables = 256;    // then flush

// Incompatible feature bits.
constexpr uint64_t kIncDirty = 1, kIncCorrupt = 2, kIncExternalData = 4, kIncCompression = 8, kIncExtL2 = 16;

// Header extension types.
constexpr uint32_t kExtEnd = 0, kExtBackingFormat = 0xe2792aca, kExtFeatureTable = 0x6803f857;

uint32_t be32(const uint8_t* p) { return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3]; }
uint64_t be64(const uint8_t* p) { return (uint64_t{be32(p)} << 32) | be32(p + 4); }
void put_be32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (24 - 8 * i));
}
void put_be64(uint8_t* p, uint64_t v) {
  put_be32(p, static_cast<uint32_t>(v >> 32));
  put_be32(p + 4, static_cast<uint32_t>(v));
}

bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
  return alen && blen && a < b + blen && b < a + alen;
}

std::string dirname_of(const std::string& p) {
  size_t s = p.rfind('/');
  if (s == std::string::npos) return ".";
  if (s == 0) return "/";
  return p.substr(0, s);
}

std::string real_path(const std::string& p) {
  char* r = ::realpath(p.c_str(), nullptr);
  if (!r) return {};
  std::string out(r);
  std::free(r);
  return out;
}

// Per-thread scratch for cluster-sized work (compressed input, composed clusters).
std::vector<char>& scratch(int which, size_t n) {
  thread_local std::vector<char> bufs[3];
  if (bufs[which].size() < n) bufs[which].resize(n);
  return bufs[which];
}

}  // namespace

// ---- open -------------------------------------------------------------------------------------

Status Qcow2::open_owned(std::unique_ptr<Layer> file, const Qcow2Options& opt, std::unique_ptr<Qcow2>* out,
                         std::string* err) {
  Layer* f = file.get();
  Status s = open(f, opt, out, err);
  if (s.ok()) (*out)->owned_file_ = std::move(file);
  return s;
}

Status Qcow2::open(Layer* file, const Qcow2Options& opt, std::unique_ptr<Qcow2>* out, std::string* err) {
  std::unique_ptr<Qcow2> q(new Qcow2());
  q->file_ = file;
  q->opt_ = opt;
  q->read_only_ = opt.read_only;
  Status s = q->parse(err);
  if (!s.ok()) return s;
  q->info_.read_only_reason = q->read_only_ ? (q->info_.read_only_reason.empty() && opt.read_only
                                                   ? std::string("opened read-only")
                                                   : q->info_.read_only_reason)
                                            : std::string();
  *out = std::move(q);
  return Status::Ok();
}

Qcow2::~Qcow2() {
  if (!read_only_ && !corrupt_.load()) (void)flush();
}

#define FAIL(...)                 \
  do {                            \
    *err = std::string(__VA_ARGS__); \
    return Status::Error(EINVAL, "qcow2: invalid image"); \
  } while (0)

Status Qcow2::parse(std::string* err) {
  uint64_t fsize = 0;
  Status s = file_->size(&fsize);
  if (!s.ok()) {
    *err = "cannot size the image file";
    return s;
  }
  if (fsize < 72) FAIL("qcow2: file too short for a header (" + std::to_string(fsize) + " bytes)");
  uint8_t h[104] = {};
  s = read_zero_padded(*file_, h, sizeof h, 0);
  if (!s.ok()) {
    *err = "cannot read the header";
    return s;
  }
  if (be32(h) != kMagic) FAIL("qcow2: bad magic");
  version_ = be32(h + 4);
  if (version_ != 2 && version_ != 3) FAIL("qcow2: unsupported version " + std::to_string(version_));
  const uint64_t bf_off = be64(h + 8);
  const uint32_t bf_len = be32(h + 16);
  cluster_bits_ = be32(h + 20);
  if (cluster_bits_ < 9 || cluster_bits_ > 21)
    FAIL("qcow2: cluster_bits " + std::to_string(cluster_bits_) + " outside 9..21");
  cs_ = 1ull << cluster_bits_;
  size_ = be64(h + 24);
  if (size_ > kMaxVirtualSize) FAIL("qcow2: virtual size " + std::to_string(size_) + " is absurd");
  if (be32(h + 32) != 0) FAIL("qcow2: encrypted images (crypt_method " + std::to_string(be32(h + 32)) +
                              ") are not supported; use a LUKS volume inside the raw view instead");
  const uint32_t l1_size = be32(h + 36);
  l1_off_ = be64(h + 40);
  rt_off_ = be64(h + 48);
  rt_clusters_ = be32(h + 56);
  const uint32_t nb_snap = be32(h + 60);
  snap_off_ = be64(h + 64);

  uint64_t incompat = 0, compat = 0, autoclear = 0;
  uint32_t header_len = 72;
  rc_order_ = 4;
  if (version_ == 3) {
    incompat = be64(h + 72);
    compat = be64(h + 80);
    autoclear = be64(h + 88);
    rc_order_ = be32(h + 96);
    header_len = be32(h + 100);
    if (header_len < 104 || header_len % 8 || header_len > cs_)
      FAIL("qcow2: header_length " + std::to_string(header_len) + " is invalid");
    if (header_len > 104) {
      uint8_t ct = 0;
      s = read_zero_padded(*file_, &ct, 1, 104);
      if (!s.ok()) return s;
      compression_ = ct;
    }
  }
  (void)compat;  // lazy refcounts are allowed; this code keeps refcounts exact anyway
  if (fsize < cs_) FAIL("qcow2: file shorter than one cluster");
  if (rc_order_ > 6) FAIL("qcow2: refcount_order " + std::to_string(rc_order_) + " is invalid");

  // Header extensions: within the first cluster, after the header.
  std::vector<std::pair<uint8_t, std::string>> incompat_names;
  std::string backing_fmt;
  {
    std::vector<uint8_t> c(cs_);
    s = read_zero_padded(*file_, c.data(), cs_, 0);
    if (!s.ok()) return s;
    uint64_t p = header_len;
    for (int n = 0; n < 1024; ++n) {
      if (p + 8 > cs_) FAIL("qcow2: header extensions run past the first cluster");
      uint32_t type = be32(&c[p]), len = be32(&c[p + 4]);
      if (type == kExtEnd) break;
      if (p + 8 + len > cs_) FAIL("qcow2: header extension runs past the first cluster");
      const uint8_t* d = &c[p + 8];
      if (type == kExtBackingFormat) {
        backing_fmt.assign(reinterpret_cast<const char*>(d), len);
      } else if (type == kExtFeatureTable) {
        for (uint32_t i = 0; i + 48 <= len; i += 48) {
          if (d[i] != 0) continue;  // only incompatible features matter for the message
          const char* nm = reinterpret_cast<const char*>(d + i + 2);
          incompat_names.emplace_back(d[i + 1], std::string(nm, strnlen(nm, 46)));
        }
      }
      p += 8 + ((uint64_t{len} + 7) & ~7ull);
    }
    if (bf_off) {
      if (bf_len == 0 || bf_len > 1023 || bf_off + bf_len > cs_)
        FAIL("qcow2: backing file name lies outside the first cluster or is too long");
      info_.backing_file.assign(reinterpret_cast<const char*>(&c[bf_off]), bf_len);
    }
  }

  // Feature bits.
  const uint64_t known = kIncDirty | kIncCorrupt | kIncExternalData | kIncCompression | kIncExtL2;
  if (incompat & ~known) {
    std::string names;
    for (int b = 0; b < 64; ++b) {
      if (!((incompat & ~known) >> b & 1)) continue;
      std::string nm = "bit " + std::to_string(b);
      for (auto& [bit, n] : incompat_names)
        if (bit == b) nm = n;
      names += (names.empty() ? "" : ", ") + nm;
    }
    FAIL("qcow2: unsupported incompatible features: " + names);
  }
  if (incompat & kIncExternalData) FAIL("qcow2: images with an external data file are not supported");
  if (incompat & kIncCompression) {
    if (header_len <= 104) FAIL("qcow2: compression type bit set but no compression_type field");
    if (compression_ != 0 && compression_ != 1)
      FAIL("qcow2: unknown compression type " + std::to_string(compression_));
  } else if (compression_ != 0) {
    FAIL("qcow2: compression type set without its incompatible feature bit");
  }
  ext_l2_ = incompat & kIncExtL2;
  if (ext_l2_ && cluster_bits_ < 14) FAIL("qcow2: extended L2 entries need clusters of at least 16 KiB");
  if (incompat & kIncCorrupt) {
    read_only_ = true;
    info_.read_only_reason = "the image is marked corrupt; run qemu-img check -r all";
  } else if ((incompat & kIncDirty) && !read_only_) {
    repair_pending_ = true;  // refcounts rebuilt before the first change: first_write()
  }
  // Bits we do not understand must be cleared by a writer before it changes anything (bitmaps
  // become invalid, as QEMU intends for a writer that does not maintain them): first_write().
  autoclear_set_ = autoclear != 0;
  incompat_ = incompat;
  nb_snap_ = nb_snap;
  first_write_pending_.store(autoclear_set_ || repair_pending_);

  // Geometry.
  entry_bytes_ = ext_l2_ ? 16 : 8;
  l2_bits_ = cluster_bits_ - (ext_l2_ ? 4 : 3);
  sc_size_ = ext_l2_ ? static_cast<uint32_t>(cs_ / 32) : 0;
  rb_bits_ = cluster_bits_ + 3 - rc_order_;
  csize_shift_ = 62 - (cluster_bits_ - 8);
  csize_mask_ = (1ull << (cluster_bits_ - 8)) - 1;
  coffset_mask_ = (1ull << csize_shift_) - 1;

  // L1 table.
  const uint64_t l2_cover = cs_ << l2_bits_;
  const uint64_t need_l1 = (size_ + l2_cover - 1) / l2_cover;
  if (uint64_t{l1_size} * 8 > kMaxL1Bytes) FAIL("qcow2: L1 table of " + std::to_string(l1_size) + " entries is absurd");
  if (l1_size < need_l1) FAIL("qcow2: L1 table too small for the virtual size");
  if (l1_size) {
    if (l1_off_ % cs_) FAIL("qcow2: L1 table offset is not cluster-aligned");
    if (l1_off_ < cs_) FAIL("qcow2: L1 table overlaps the header");
    if (l1_off_ + uint64_t{l1_size} * 8 > fsize) FAIL("qcow2: L1 table lies past the end of the file");
  }
  l1_clusters_ = static_cast<uint32_t>((uint64_t{l1_size} * 8 + cs_ - 1) / cs_);
  // Refcount table.
  if (rt_clusters_ == 0 || uint64_t{rt_clusters_} * cs_ > kMaxRefTableBytes)
    FAIL("qcow2: refcount table of " + std::to_string(rt_clusters_) + " clusters is invalid");
  if (rt_off_ % cs_ || rt_off_ < cs_) FAIL("qcow2: refcount table offset is invalid");
  if (rt_off_ + uint64_t{rt_clusters_} * cs_ > fsize) FAIL("qcow2: refcount table lies past the end of the file");
  if (ranges_overlap(l1_off_, uint64_t{l1_clusters_} * cs_, rt_off_, uint64_t{rt_clusters_} * cs_))
    FAIL("qcow2: L1 table and refcount table overlap");
  // Snapshot table: only located and bounded here (the active disk does not need it).
  if (nb_snap > kMaxSnapshots) FAIL("qcow2: " + std::to_string(nb_snap) + " snapshots is absurd");
  info_.snapshots = nb_snap;
  if (nb_snap) {
    if (snap_off_ % cs_ || snap_off_ < cs_ || snap_off_ >= fsize) FAIL("qcow2: snapshot table offset is invalid");
    snap_len_ = cs_;  // at least its first cluster; used for overlap checks
    if (ranges_overlap(snap_off_, 1, l1_off_, uint64_t{l1_clusters_} * cs_) ||
        ranges_overlap(snap_off_, 1, rt_off_, uint64_t{rt_clusters_} * cs_))
      FAIL("qcow2: snapshot table overlaps other metadata");
  }

  l1_.resize(l1_size);
  if (l1_size) {
    std::vector<uint8_t> raw(uint64_t{l1_size} * 8);
    s = read_zero_padded(*file_, raw.data(), raw.size(), l1_off_);
    if (!s.ok()) return s;
    for (uint32_t i = 0; i < l1_size; ++i) l1_[i] = be64(&raw[uint64_t{i} * 8]);
  }
  rt_.resize(uint64_t{rt_clusters_} * cs_ / 8);
  {
    std::vector<uint8_t> raw(uint64_t{rt_clusters_} * cs_);
    s = read_zero_padded(*file_, raw.data(), raw.size(), rt_off_);
    if (!s.ok()) return s;
    for (size_t i = 0; i < rt_.size(); ++i) rt_[i] = be64(&raw[i * 8]);
  }
  file_end_ = (fsize + cs_ - 1) & ~(cs_ - 1);
  if (file_end_ > kMaxFileOffset) FAIL("qcow2: file too large");
  free_hint_ = old_end_ = file_end_ >> cluster_bits_;
  old_scan_ = 1;

  info_.version = version_;
  info_.cluster_bits = cluster_bits_;
  info_.virtual_size = size_;
  info_.extended_l2 = ext_l2_;
  info_.refcount_bits = 1u << rc_order_;
  info_.backing_format = backing_fmt;

  if (!info_.backing_file.empty()) {
    s = open_backing(info_.backing_file, backing_fmt, err);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

#undef FAIL

Status Qcow2::open_backing(const std::string& name0, const std::string& fmt, std::string* err) {
  auto fail = [&](const std::string& m) {
    *err = "qcow2: backing file " + name0 + ": " + m;
    return Status::Error(EINVAL, "qcow2: backing file unusable");
  };
  std::string name = name0;
  if (name.rfind("file:", 0) == 0) name = name.substr(5);
  if (name.rfind("json:", 0) == 0 || name.find("://") != std::string::npos)
    return fail("protocols other than plain files are not supported");
  if (name.find('\0') != std::string::npos) return fail("invalid name");
  if (static_cast<int>(opt_.chain.size()) + 1 >= opt_.max_chain_depth) return fail("backing chain too deep");
  std::string path;
  if (name[0] == '/') {
    path = name;
  } else {
    if (opt_.path.empty()) return fail("relative name but the image's own path is unknown");
    path = dirname_of(opt_.path) + "/" + name;
  }
  std::string real = real_path(path);
  if (real.empty()) return fail(std::string("cannot resolve ") + path + ": " + std::strerror(errno));
  if (!opt_.backing_root.empty()) {
    std::string root = real_path(opt_.backing_root);
    if (root.empty() || real.compare(0, root.size(), root) != 0 ||
        (real.size() > root.size() && real[root.size()] != '/' && root != "/"))
      return fail("lies outside the datastore");
  }
  std::string self = opt_.path.empty() ? std::string() : real_path(opt_.path);
  if (real == self || std::find(opt_.chain.begin(), opt_.chain.end(), real) != opt_.chain.end())
    return fail("the backing chain loops");
  std::string ferr;
  std::unique_ptr<FdFile> f = FdFile::open(real, false, &ferr);
  if (!f) return fail(ferr);
  std::string kind = fmt;
  if (kind.empty()) {  // probe, as QEMU does without a backing format
    uint8_t m[4] = {};
    Status s = read_zero_padded(*f, m, 4, 0);
    if (!s.ok()) return fail("cannot read it");
    kind = be32(m) == kMagic ? "qcow2" : "raw";
  }
  if (kind == "raw") {
    Status s = f->size(&backing_size_);
    if (!s.ok()) return fail("cannot size it");
    backing_ = std::move(f);
    return Status::Ok();
  }
  if (kind != "qcow2") return fail("format " + kind + " is not supported as a backing file");
  Qcow2Options bo;
  bo.read_only = true;
  bo.path = path;
  bo.backing_root = opt_.backing_root;
  bo.max_chain_depth = opt_.max_chain_depth;
  bo.chain = opt_.chain;
  if (!self.empty()) bo.chain.push_back(self);
  std::unique_ptr<Qcow2> b;
  std::string berr;
  Status s = Qcow2::open_owned(std::move(f), bo, &b, &berr);
  if (!s.ok()) return fail(berr);
  backing_size_ = b->info().virtual_size;
  backing_ = std::move(b);
  return Status::Ok();
}

// ---- metadata ---------------------------------------------------------------------------------

Status Qcow2::mark_corrupt(const char* what) {
  corrupt_.store(true);
  return Status::Error(EIO, what);
}

Status Qcow2::check_table_offset(uint64_t off, const char* what) {
  if (off % cs_ || off < cs_ || off + cs_ > file_end_ ||
      ranges_overlap(off, cs_, l1_off_, uint64_t{l1_clusters_} * cs_) ||
      ranges_overlap(off, cs_, rt_off_, uint64_t{rt_clusters_} * cs_))
    return mark_corrupt(what);
  return Status::Ok();
}

// One cluster-sized table through its cache; `other` is the cache of the other kind, which the
// table must not overlap.
Status Qcow2::load_table(std::unordered_map<uint64_t, Table>& cache, const std::unordered_map<uint64_t, Table>& other,
                         uint64_t off, const char* bad_offset, const char* overlap, Table** t) {
  auto it = cache.find(off);
  if (it != cache.end()) {
    it->second.used = ++lru_;
    *t = &it->second;
    return Status::Ok();
  }
  Status s = check_table_offset(off, bad_offset);
  if (!s.ok()) return s;
  if (other.count(off)) return mark_corrupt(overlap);
  Table nt;
  nt.data.resize(cs_);
  s = read_zero_padded(*file_, nt.data.data(), cs_, off);
  if (!s.ok()) return s;
  nt.used = ++lru_;
  *t = &(cache[off] = std::move(nt));
  return Status::Ok();
}

Status Qcow2::load_l2(uint64_t off, Table** t) {
  return load_table(l2_cache_, rb_cache_, off, "qcow2: L2 table offset is invalid (image corrupt)",
                    "qcow2: L2 table overlaps a refcount block (image corrupt)", t);
}

Status Qcow2::load_rb(uint64_t off, Table** t) {
  return load_table(rb_cache_, l2_cache_, off, "qcow2: refcount block offset is invalid (image corrupt)",
                    "qcow2: refcount block overlaps an L2 table (image corrupt)", t);
}

Qcow2::Entry Qcow2::entry_at(const Table* t, uint32_t idx) const {
  Entry e;
  const uint8_t* p = t->data.data() + uint64_t{idx} * entry_bytes_;
  e.raw = be64(p);
  if (ext_l2_) e.bitmap = be64(p + 8);
  return e;
}

void Qcow2::set_entry(Table* t, uint32_t idx, const Entry& e) {
  uint8_t* p = t->data.data() + uint64_t{idx} * entry_bytes_;
  put_be64(p, e.raw);
  if (ext_l2_) put_be64(p + 8, e.bitmap);
  t->dirty = true;
}

Status Qcow2::get_entry(uint64_t cluster, Entry* e) {
  *e = Entry{};
  uint64_t l1i = cluster >> l2_bits_;
  if (l1i >= l1_.size()) return Status::Ok();
  uint64_t l2off = l1_[l1i] & kOffsetMask;
  if (!l2off) return Status::Ok();
  Table* t = nullptr;
  Status s = load_l2(l2off, &t);
  if (!s.ok()) return s;
  *e = entry_at(t, static_cast<uint32_t>(cluster & ((1u << l2_bits_) - 1)));
  return Status::Ok();
}

Status Qcow2::refcount(uint64_t hc, uint64_t* rc) {
  *rc = 0;
  uint64_t rti = hc >> rb_bits_;
  if (rti >= rt_.size()) return Status::Ok();
  uint64_t rboff = rt_[rti] & ~0x1ffull;
  if (!rboff) return Status::Ok();
  Table* t = nullptr;
  Status s = load_rb(rboff, &t);
  if (!s.ok()) return s;
  uint64_t i = hc & ((1ull << rb_bits_) - 1);
  const uint8_t* d = t->data.data();
  const uint32_t bits = 1u << rc_order_;
  if (bits < 8) {
    uint32_t per = 8 / bits;
    *rc = (d[i / per] >> (bits * (i % per))) & ((1u << bits) - 1);
  } else {
    uint32_t bytes = bits / 8;
    uint64_t v = 0;
    for (uint32_t k = 0; k < bytes; ++k) v = (v << 8) | d[i * bytes + k];
    *rc = v;
  }
  return Status::Ok();
}

Status Qcow2::ensure_refblock(uint64_t hc) {
  uint64_t rti = hc >> rb_bits_;
  if (rti >= rt_.size()) {
    Status s = grow_reftable(rti + 1);
    if (!s.ok()) return s;
  }
  if (rt_[rti] & ~0x1ffull) return Status::Ok();
  uint64_t off = file_end_;
  if (off + cs_ > kMaxFileOffset) return Status::Error(ENOSPC, "qcow2: image file at its maximum size");
  file_end_ += cs_;
  Status s = file_->resize(Io{}, file_end_);
  if (!s.ok()) return s;
  Table nt;
  nt.data.assign(cs_, 0);
  nt.dirty = true;
  nt.used = ++lru_;
  rb_cache_[off] = std::move(nt);
  rt_[rti] = off;
  rt_dirty_ = true;
  return refcount_add(off >> cluster_bits_, 1);  // the block counts itself (or its neighbour does)
}

Status Qcow2::grow_reftable(uint64_t min_entries) {
  uint64_t entries = std::max<uint64_t>(min_entries + min_entries / 2, rt_.size() * 2);
  uint64_t clusters = (entries * 8 + cs_ - 1) / cs_;
  if (clusters * cs_ > kMaxRefTableBytes) return Status::Error(ENOSPC, "qcow2: refcount table at its maximum size");
  uint64_t off = file_end_;
  file_end_ += clusters * cs_;
  Status s = file_->resize(Io{}, file_end_);
  if (!s.ok()) return s;
  // The old table is dropped once the header points at the new one.
  for (uint32_t i = 0; i < rt_clusters_; ++i) pending_drop_.emplace_back((rt_off_ >> cluster_bits_) + i, epoch_);
  rt_.resize(clusters * cs_ / 8, 0);
  rt_off_ = off;
  rt_clusters_ = static_cast<uint32_t>(clusters);
  rt_dirty_ = rt_moved_ = true;
  for (uint64_t i = 0; i < clusters; ++i) {
    s = refcount_add((off >> cluster_bits_) + i, 1);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

Status Qcow2::refcount_add(uint64_t hc, int64_t delta) {
  if (delta > 0) {
    Status s = ensure_refblock(hc);
    if (!s.ok()) return s;
  }
  uint64_t rti = hc >> rb_bits_;
  if (rti >= rt_.size() || !(rt_[rti] & ~0x1ffull)) return mark_corrupt("qcow2: dropping a reference of an uncounted cluster");
  Table* t = nullptr;
  Status s = load_rb(rt_[rti] & ~0x1ffull, &t);
  if (!s.ok()) return s;
  uint64_t i = hc & ((1ull << rb_bits_) - 1);
  uint8_t* d = t->data.data();
  const uint32_t bits = 1u << rc_order_;
  const uint64_t maxv = bits == 64 ? ~0ull : (1ull << bits) - 1;
  uint64_t v;
  if (bits < 8) {
    uint32_t per = 8 / bits;
    v = (d[i / per] >> (bits * (i % per))) & maxv;
  } else {
    v = 0;
    for (uint32_t k = 0; k < bits / 8; ++k) v = (v << 8) | d[i * (bits / 8) + k];
  }
  if (delta < 0 && v < static_cast<uint64_t>(-delta)) return mark_corrupt("qcow2: refcount underflow (image corrupt)");
  if (delta > 0 && maxv - v < static_cast<uint64_t>(delta)) return Status::Error(EMLINK, "qcow2: refcount overflow");
  v += static_cast<uint64_t>(delta);
  if (bits < 8) {
    uint32_t per = 8 / bits, sh = bits * (i % per);
    d[i / per] = static_cast<uint8_t>((d[i / per] & ~(maxv << sh)) | (v << sh));
  } else {
    for (uint32_t k = bits / 8; k-- > 0;) {
      d[i * (bits / 8) + k] = static_cast<uint8_t>(v);
      v >>= 8;
    }
  }
  t->dirty = true;
  return Status::Ok();
}

Status Qcow2::scan_free(uint64_t from, uint64_t to, uint64_t* cluster, uint64_t* stop) {
  *cluster = 0;
  const uint64_t per = 1ull << rb_bits_;
  const uint32_t bits = 1u << rc_order_;
  uint64_t c = std::max<uint64_t>(from, 1);
  while (c < to) {
    const uint64_t rti = c >> rb_bits_;
    const uint64_t block_end = std::min(to, (rti + 1) * per);
    const uint64_t rboff = rti < rt_.size() ? rt_[rti] & ~0x1ffull : 0;
    const uint8_t* d = nullptr;
    if (rboff) {
      Table* t = nullptr;
      Status s = load_rb(rboff, &t);
      if (!s.ok()) return s;
      d = t->data.data();
    }
    for (; c < block_end; ++c) {
      bool zero;
      const uint64_t i = c & (per - 1);
      if (!d) {
        zero = true;  // no block: nothing in its range is counted
      } else if (bits < 8) {
        zero = ((d[i * bits / 8] >> (bits * (i % (8 / bits)))) & ((1u << bits) - 1)) == 0;
      } else {
        zero = true;
        for (uint32_t k = 0; k < bits / 8 && zero; ++k) zero = d[i * (bits / 8) + k] == 0;
      }
      // Never hand out something the tables in memory still use (that would be a corrupt image).
      if (zero && !overlaps_metadata(c << cluster_bits_, cs_)) {
        *cluster = c;
        *stop = c + 1;
        return Status::Ok();
      }
    }
  }
  *stop = std::max(c, to);
  return Status::Ok();
}

Status Qcow2::find_free(uint64_t* cluster) {
  *cluster = 0;
  const uint64_t end = file_end_ >> cluster_bits_;
  Status s;
  if (free_hint_ < end) {  // freed in this session, or past the end as opened
    s = scan_free(free_hint_, end, cluster, &free_hint_);
    if (!s.ok() || *cluster) return s;
  }
  if (old_scan_ < old_end_) {  // free at open: one refcount block's range per call
    const uint64_t to = std::min(old_end_, ((old_scan_ >> rb_bits_) + 1) << rb_bits_);
    s = scan_free(old_scan_, to, cluster, &old_scan_);
  }
  return s;
}

Status Qcow2::alloc(uint64_t n, uint64_t* off, bool* zeroed) {
  if (zeroed) *zeroed = true;
  if (n == 1 && (free_hint_ < (file_end_ >> cluster_bits_) || old_scan_ < old_end_)) {
    uint64_t c = 0;
    Status s = find_free(&c);
    if (!s.ok()) return s;
    if (c) {
      s = refcount_add(c, 1);
      if (!s.ok()) return s;
      if (zeroed) *zeroed = false;  // punched when freed, but the punch may have failed
      *off = c << cluster_bits_;
      return Status::Ok();
    }
  }
  uint64_t o = file_end_;
  if (o + n * cs_ > kMaxFileOffset) return Status::Error(ENOSPC, "qcow2: image file at its maximum size");
  file_end_ += n * cs_;
  Status s = file_->resize(Io{}, file_end_);
  if (!s.ok()) {
    file_end_ = o;
    return s;
  }
  for (uint64_t i = 0; i < n; ++i) {
    s = refcount_add((o >> cluster_bits_) + i, 1);
    if (!s.ok()) return s;
  }
  *off = o;
  free_hint_ = std::max(free_hint_, file_end_ >> cluster_bits_) ;
  return Status::Ok();
}

void Qcow2::drop_ref(uint64_t off, uint64_t len) {
  uint64_t first = off >> cluster_bits_, last = (off + len - 1) >> cluster_bits_;
  for (uint64_t c = first; c <= last; ++c) pending_drop_.emplace_back(c, epoch_);
}

void Qcow2::drop_entry_refs(const Entry& e) {
  if (e.compressed()) {
    uint64_t coff = e.raw & coffset_mask_;
    uint64_t nsec = ((e.raw >> csize_shift_) & csize_mask_) + 1;
    drop_ref(coff & ~511ull, nsec * 512);
  } else if (e.raw & kOffsetMask) {
    drop_ref(e.raw & kOffsetMask, cs_);
  }
}

bool Qcow2::overlaps_metadata(uint64_t off, uint64_t len) const {
  if (off < cs_) return true;
  if (ranges_overlap(off, len, l1_off_, uint64_t{l1_clusters_} * cs_)) return true;
  if (ranges_overlap(off, len, rt_off_, uint64_t{rt_clusters_} * cs_)) return true;
  if (ranges_overlap(off, len, snap_off_, snap_len_)) return true;
  for (uint64_t c = off & ~(cs_ - 1); c < off + len; c += cs_)
    if (l2_cache_.count(c) || rb_cache_.count(c)) return true;
  return false;
}

Status Qcow2::writable_l2(uint64_t cluster, Table** t, uint32_t* idx) {
  uint64_t l1i = cluster >> l2_bits_;
  *idx = static_cast<uint32_t>(cluster & ((1u << l2_bits_) - 1));
  if (l1i >= l1_.size()) return mark_corrupt("qcow2: write beyond the L1 table");
  uint64_t l1e = l1_[l1i];
  uint64_t old = l1e & kOffsetMask;
  if (old && (l1e & kCopied)) return load_l2(old, t);
  if (old) {
    uint64_t rc = 0;
    Status s = refcount(old >> cluster_bits_, &rc);
    if (!s.ok()) return s;
    if (rc == 1) {  // private despite the flag: just set it
      l1_[l1i] = old | kCopied;
      l1_dirty_ = true;
      return load_l2(old, t);
    }
  }
  // A new table: empty, or a copy of the one shared with a snapshot.
  std::vector<uint8_t> content(cs_, 0);
  if (old) {
    Table* ot = nullptr;
    Status s = load_l2(old, &ot);
    if (!s.ok()) return s;
    content = ot->data;
  }
  uint64_t off = 0;
  Status s = alloc(1, &off);
  if (!s.ok()) return s;
  Table nt;
  nt.data = std::move(content);
  nt.dirty = true;
  nt.used = ++lru_;
  *t = &(l2_cache_[off] = std::move(nt));
  l1_[l1i] = off | kCopied;
  l1_dirty_ = true;
  if (old) drop_ref(old, cs_);
  return Status::Ok();
}

Status Qcow2::write_tables(std::unordered_map<uint64_t, Table>& cache) {
  for (auto& [off, t] : cache) {
    if (!t.dirty) continue;
    Status s = file_->write(Io{}, t.data.data(), cs_, off);
    if (!s.ok()) return s;
    t.dirty = false;
  }
  return Status::Ok();
}

Status Qcow2::flush_locked() {
  if (read_only_) return Status::Ok();
  if (corrupt_.load()) return Status::Error(EIO, "qcow2: image corrupt, metadata not written");
  Io io;
  bool rb_dirty = false, l2_dirty = false;
  for (auto& kv : rb_cache_) rb_dirty |= kv.second.dirty;
  for (auto& kv : l2_cache_) l2_dirty |= kv.second.dirty;
  // 1. data and new references.
  if (rb_dirty) {
    Status s = write_tables(rb_cache_);
    if (!s.ok()) return s;
  }
  Status s = file_->sync(io, true);
  if (!s.ok()) return s;
  if (rt_dirty_) {
    std::vector<uint8_t> raw(uint64_t{rt_clusters_} * cs_);
    for (size_t i = 0; i < rt_.size(); ++i) put_be64(&raw[i * 8], rt_[i]);
    s = file_->write(io, raw.data(), raw.size(), rt_off_);
    if (!s.ok()) return s;
    s = file_->sync(io, true);
    if (!s.ok()) return s;
    if (rt_moved_) {
      uint8_t h[12];
      put_be64(h, rt_off_);
      put_be32(h + 8, rt_clusters_);
      s = file_->write(io, h, sizeof h, 48);
      if (!s.ok()) return s;
      s = file_->sync(io, true);
      if (!s.ok()) return s;
      rt_moved_ = false;
    }
    rt_dirty_ = false;
  }
  // 2. L2 tables.
  if (l2_dirty) {
    s = write_tables(l2_cache_);
    if (!s.ok()) return s;
    s = file_->sync(io, true);
    if (!s.ok()) return s;
  }
  // 3. L1 table and the header's size and L1 fields (one sector).
  if (l1_dirty_ || header_dirty_) {
    if (l1_dirty_) {
      std::vector<uint8_t> raw(l1_.size() * 8);
      for (size_t i = 0; i < l1_.size(); ++i) put_be64(&raw[i * 8], l1_[i]);
      if (!raw.empty()) s = file_->write(io, raw.data(), raw.size(), l1_off_);
      if (!s.ok()) return s;
      if (header_dirty_) {
        s = file_->sync(io, true);
        if (!s.ok()) return s;
      }
    }
    if (header_dirty_) {
      uint8_t h[24];
      put_be64(h, size_);
      put_be32(h + 8, 0);
      put_be32(h + 12, static_cast<uint32_t>(l1_.size()));
      put_be64(h + 16, l1_off_);
      s = file_->write(io, h, sizeof h, 24);
      if (!s.ok()) return s;
    }
    s = file_->sync(io, true);
    if (!s.ok()) return s;
    l1_dirty_ = header_dirty_ = false;
  }
  // 4. references dropped.
  // Only drops that no pinned I/O can still be using (see the header).
  advance_epoch();
  std::vector<uint64_t> drops;
  {
    size_t keep = 0;
    for (auto& d : pending_drop_) {
      if (d.second + 2 <= epoch_) drops.push_back(d.first);
      else pending_drop_[keep++] = d;
    }
    pending_drop_.resize(keep);
  }
  if (!drops.empty()) {
    std::vector<uint64_t> freed;
    for (uint64_t c : drops) {
      s = refcount_add(c, -1);
      if (!s.ok()) return s;
      uint64_t rc = 0;
      s = refcount(c, &rc);
      if (!s.ok()) return s;
      if (rc == 0) freed.push_back(c);
    }
    s = write_tables(rb_cache_);
    if (!s.ok()) return s;
    s = file_->sync(io, true);
    if (!s.ok()) return s;
    for (uint64_t c : freed) {
      // Never punch a table still cached (it would be an image corruption to do so).
      if (l2_cache_.count(c << cluster_bits_) || rb_cache_.count(c << cluster_bits_)) {
        l2_cache_.erase(c << cluster_bits_);
        rb_cache_.erase(c << cluster_bits_);
      }
      (void)file_->fallocate(io, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, c << cluster_bits_, cs_);
      if (c < old_scan_ || c >= old_end_) free_hint_ = std::min(free_hint_, c);  // else old_scan_ finds it
    }
  }
  return Status::Ok();
}

void Qcow2::advance_epoch() {
  // The counter of the previous epoch drained: nothing pinned before the current epoch is left.
  for (int k = 0; k < 2; ++k) {
    if (inflight_[(epoch_ + 1) & 1].load(std::memory_order_acquire) != 0) break;
    ++epoch_;
  }
}

void Qcow2::trim_caches() {
  // A full look every 64 operations, or at once when a cache is over its size.
  const size_t max_tables = std::max<size_t>(16, kCacheBytes / cs_);
  if ((++trim_tick_ & 63) != 0 && l2_cache_.size() <= max_tables && rb_cache_.size() <= max_tables) return;
  for (auto* cache : {&l2_cache_, &rb_cache_}) {
    size_t dirty = 0;
    for (auto& kv : *cache) dirty += kv.second.dirty;
    if (dirty > kMaxDirtyTables) (void)flush_locked();
    while (cache->size() > max_tables) {
      auto victim = cache->end();
      for (auto it = cache->begin(); it != cache->end(); ++it)
        if (!it->second.dirty && (victim == cache->end() || it->second.used < victim->second.used)) victim = it;
      if (victim == cache->end()) break;
      cache->erase(victim);
    }
  }
}

Status Qcow2::flush() {
  std::lock_guard<std::shared_mutex> g(mu_);
  return flush_locked();
}

// ---- repair of a dirty image -------------------------------------------------------------------

// Rebuilds every reference count from what points at clusters (see the header comment for the
// order of writes). mu_ held; nothing else has changed the image yet (first_write).
Status Qcow2::repair_locked(std::string* why) {
  auto fail = [&](const std::string& m) {
    *why = m;
    return Status::Error(EINVAL, "qcow2: repair failed");
  };
  const uint64_t nclusters = file_end_ >> cluster_bits_;
  constexpr uint64_t kMaxRepairClusters = 1ull << 26;  // 128 MiB of counts at most
  if (nclusters > kMaxRepairClusters) return fail("the image file has too many clusters to recount here");
  const uint32_t bits = 1u << rc_order_;
  const uint64_t maxv = bits >= 16 ? 0xffff : (1ull << bits) - 1;  // counts are kept in 16 bits
  std::vector<uint16_t> rc(nclusters, 0);
  std::string bad;
  // One reference to each cluster of [off, off+len).
  auto ref = [&](uint64_t off, uint64_t len, const char* what) {
    if (!bad.empty()) return false;
    if (len == 0 || off >= file_end_ || len > file_end_ - off) {
      bad = std::string(what) + " lies past the end of the file";
      return false;
    }
    for (uint64_t c = off >> cluster_bits_; c <= (off + len - 1) >> cluster_bits_; ++c) {
      if (rc[c] >= maxv) {
        bad = std::string("a cluster has more references than refcount_bits can count (") + what + ")";
        return false;
      }
      ++rc[c];
    }
    return true;
  };
  std::vector<uint8_t> l2(cs_);
  // Snapshots may share L2 tables, each is walked once per L1 that names it: bound the work
  // (a hostile image could name the same tables from thousands of snapshots).
  uint64_t walks_left = 4 * nclusters + 4096;
  // One L1 table: its L2 tables and the clusters they point at.
  auto walk_l1 = [&](const std::vector<uint64_t>& l1) -> Status {
    for (uint64_t l1e : l1) {
      const uint64_t l2off = l1e & kOffsetMask;
      if (!l2off) continue;
      if (walks_left-- == 0) {
        bad = "the tables name more L2 tables than the file can hold";
        return Status::Ok();
      }
      if (l2off % cs_ || l2off < cs_) {
        bad = "an L1 entry points at an unaligned cluster or into the header";
        return Status::Ok();
      }
      if (!ref(l2off, cs_, "an L2 table")) return Status::Ok();
      Status s = read_zero_padded(*file_, l2.data(), cs_, l2off);
      if (!s.ok()) return s;
      for (uint64_t i = 0; i < (cs_ / entry_bytes_); ++i) {
        const uint64_t e = be64(&l2[i * entry_bytes_]);
        if (e >> 62 & 1) {  // compressed: the sectors it spans
          const uint64_t coff = e & coffset_mask_;
          const uint64_t nsec = ((e >> csize_shift_) & csize_mask_) + 1;
          if (!ref(coff & ~511ull, nsec * 512, "a compressed cluster")) return Status::Ok();
        } else if (const uint64_t h = e & kOffsetMask) {
          if (h % cs_ || h < cs_) {
            bad = "an L2 entry points at an unaligned cluster or into the header";
            return Status::Ok();
          }
          if (!ref(h, cs_, "a data cluster")) return Status::Ok();
        }
      }
    }
    return Status::Ok();
  };
  auto read_l1 = [&](uint64_t off, uint64_t n, std::vector<uint64_t>* out) -> Status {
    std::vector<uint8_t> raw(n * 8);
    Status s = read_zero_padded(*file_, raw.data(), raw.size(), off);
    if (!s.ok()) return s;
    out->resize(n);
    for (uint64_t i = 0; i < n; ++i) (*out)[i] = be64(&raw[i * 8]);
    return Status::Ok();
  };

  ref(0, cs_, "the header");
  if (!l1_.empty()) ref(l1_off_, uint64_t{l1_clusters_} * cs_, "the L1 table");
  Status s = walk_l1(l1_);
  if (!s.ok()) return s;
  // Internal snapshots: the table, each snapshot's L1 table and everything under it.
  if (nb_snap_ && bad.empty()) {
    uint64_t p = snap_off_;
    for (uint32_t k = 0; k < nb_snap_ && bad.empty(); ++k) {
      uint8_t h[40];
      if (p + 40 > file_end_) return fail("the snapshot table runs past the end of the file");
      s = read_zero_padded(*file_, h, sizeof h, p);
      if (!s.ok()) return s;
      const uint64_t l1off = be64(h);
      const uint32_t l1n = be32(h + 8);
      const uint64_t entry = 40ull + be32(h + 36) + (uint32_t{h[12]} << 8 | h[13]) + (uint32_t{h[14]} << 8 | h[15]);
      if (be32(h + 36) > 65536) return fail("a snapshot's extra data is absurd");
      p += (entry + 7) & ~7ull;
      if (uint64_t{l1n} * 8 > kMaxL1Bytes) return fail("a snapshot's L1 table is absurd");
      if (!l1n) continue;
      if (l1off % cs_ || l1off < cs_) return fail("a snapshot's L1 table offset is invalid");
      if (!ref(l1off, uint64_t{l1n} * 8, "a snapshot's L1 table")) break;
      std::vector<uint64_t> sl1;
      s = read_l1(l1off, l1n, &sl1);
      if (!s.ok()) return s;
      s = walk_l1(sl1);
      if (!s.ok()) return s;
    }
    if (bad.empty()) ref(snap_off_, p - snap_off_, "the snapshot table");
  }
  if (!bad.empty()) return fail(bad);

  // COPIED flags of the active tables follow the counts (QEMU's check demands it; a flag on a
  // shared cluster would let a write change a snapshot).
  bool l1_changed = false;
  std::vector<uint64_t> l1 = l1_;
  for (auto& l1e : l1) {
    const uint64_t l2off = l1e & kOffsetMask;
    if (!l2off) continue;
    const uint64_t want = rc[l2off >> cluster_bits_] == 1 ? kCopied : 0;
    if ((l1e & kCopied) != want) {
      l1e = (l1e & ~kCopied) | want;
      l1_changed = true;
    }
    s = read_zero_padded(*file_, l2.data(), cs_, l2off);
    if (!s.ok()) return s;
    bool changed = false;
    for (uint64_t i = 0; i < (cs_ / entry_bytes_); ++i) {
      uint64_t e = be64(&l2[i * entry_bytes_]);
      if (e >> 62 & 1) continue;
      const uint64_t h = e & kOffsetMask;
      const uint64_t w = h && rc[h >> cluster_bits_] == 1 ? kCopied : 0;
      if ((e & kCopied) == w) continue;
      put_be64(&l2[i * entry_bytes_], (e & ~kCopied) | w);
      changed = true;
    }
    if (changed) {
      l2_cache_.erase(l2off);
      s = file_->write(Io{}, l2.data(), cs_, l2off);
      if (!s.ok()) return s;
    }
  }
  if (l1_changed) {
    std::vector<uint8_t> raw(l1.size() * 8);
    for (size_t i = 0; i < l1.size(); ++i) put_be64(&raw[i * 8], l1[i]);
    s = file_->write(Io{}, raw.data(), raw.size(), l1_off_);
    if (!s.ok()) return s;
  }

  // A new refcount table and blocks past the end, counting everything including themselves.
  const uint64_t per = 1ull << rb_bits_;
  uint64_t blocks = 0, tclusters = 1;
  for (int k = 0; k < 64; ++k) {
    uint64_t nb = (nclusters + tclusters + blocks + per - 1) / per;
    uint64_t nt = (nb * 8 + cs_ - 1) / cs_;
    if (nb == blocks && nt == tclusters) break;
    blocks = nb;
    tclusters = std::max<uint64_t>(nt, 1);
  }
  if (tclusters * cs_ > kMaxRefTableBytes) return fail("the refcount table would be too large");
  const uint64_t total = nclusters + tclusters + blocks;
  if ((total << cluster_bits_) > kMaxFileOffset) return fail("the image file would be too large");
  rc.resize(total, 1);  // the new table and blocks: one reference each
  const uint64_t t_off = nclusters << cluster_bits_;
  std::vector<uint8_t> blk(cs_);
  std::vector<uint64_t> table(tclusters * cs_ / 8, 0);
  for (uint64_t b = 0; b < blocks; ++b) {
    std::fill(blk.begin(), blk.end(), 0);
    for (uint64_t i = 0; i < per && b * per + i < total; ++i) {
      const uint64_t v = rc[b * per + i];
      if (bits < 8) {
        blk[i * bits / 8] |= static_cast<uint8_t>(v << (bits * (i % (8 / bits))));
      } else {
        for (uint32_t k = 0; k < bits / 8; ++k) blk[i * (bits / 8) + k] = static_cast<uint8_t>(v >> (8 * (bits / 8 - 1 - k)));
      }
    }
    const uint64_t boff = (nclusters + tclusters + b) << cluster_bits_;
    table[b] = boff;
    s = file_->write(Io{}, blk.data(), cs_, boff);
    if (!s.ok()) return s;
  }
  {
    std::vector<uint8_t> raw(tclusters * cs_);
    for (size_t i = 0; i < table.size(); ++i) put_be64(&raw[i * 8], table[i]);
    s = file_->write(Io{}, raw.data(), raw.size(), t_off);
    if (!s.ok()) return s;
  }
  s = file_->sync(Io{}, true);
  if (!s.ok()) return s;
  // One sector: the refcount table's place and size, and the dirty bit cleared.
  uint8_t h[32];
  put_be64(h, t_off);
  put_be32(h + 8, static_cast<uint32_t>(tclusters));
  put_be32(h + 12, nb_snap_);
  put_be64(h + 16, snap_off_);
  put_be64(h + 24, incompat_ & ~kIncDirty);
  s = file_->write(Io{}, h, sizeof h, 48);
  if (!s.ok()) return s;
  s = file_->sync(Io{}, true);
  if (!s.ok()) return s;
  incompat_ &= ~kIncDirty;
  l1_ = std::move(l1);
  rt_ = std::move(table);
  rt_off_ = t_off;
  rt_clusters_ = static_cast<uint32_t>(tclusters);
  rt_dirty_ = rt_moved_ = false;
  rb_cache_.clear();
  file_end_ = total << cluster_bits_;
  free_hint_ = 0;  // the counts were all rewritten: look everywhere again
  old_scan_ = old_end_ = 0;
  return Status::Ok();
}

// ---- data -------------------------------------------------------------------------------------

Status Qcow2::read_backing(char* buf, size_t len, uint64_t off) {
  if (!backing_ || off >= backing_size_) {
    std::memset(buf, 0, len);
    return Status::Ok();
  }
  size_t n = static_cast<size_t>(std::min<uint64_t>(len, backing_size_ - off));
  size_t got = 0;
  Status s = backing_->read(Io{}, buf, n, off, &got);
  if (!s.ok()) return s;
  if (got < len) std::memset(buf + got, 0, len - got);
  return Status::Ok();
}

Status Qcow2::read_compressed(const Entry& e, char* out) {
  uint64_t coff = e.raw & coffset_mask_;
  uint64_t nsec = ((e.raw >> csize_shift_) & csize_mask_) + 1;
  uint64_t clen = nsec * 512 - (coff & 511);
  if (coff < cs_ || coff + clen > kMaxFileOffset) return mark_corrupt("qcow2: compressed cluster offset invalid");
  if (clen > 2 * cs_ + 512) return mark_corrupt("qcow2: compressed cluster too large");
  std::vector<char>& in = scratch(0, clen);
  Status s = read_zero_padded(*file_, in.data(), clen, coff);
  if (!s.ok()) return s;
  if (compression_ == 1) {
#ifdef IOFILTERFS_HAVE_ZSTD
    // One zstd frame, followed by padding to the sector: decompress until the cluster is full.
    thread_local ZSTD_DCtx* dctx = ZSTD_createDCtx();
    if (!dctx) return Status::Error(ENOMEM, "qcow2: no zstd context");
    ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only);
    ZSTD_inBuffer zin{in.data(), clen, 0};
    ZSTD_outBuffer zout{out, cs_, 0};
    while (zout.pos < zout.size) {
      size_t r = ZSTD_decompressStream(dctx, &zout, &zin);
      if (ZSTD_isError(r)) return mark_corrupt("qcow2: zstd cluster does not decompress (image corrupt)");
      if (r == 0 && zout.pos < zout.size) return mark_corrupt("qcow2: zstd cluster too short (image corrupt)");
      if (zin.pos == zin.size && zout.pos < zout.size && r != 0) return mark_corrupt("qcow2: zstd cluster truncated");
    }
    return Status::Ok();
#else
    return Status::Error(ENOTSUP, "qcow2: zstd-compressed clusters need a build with libzstd");
#endif
  }
  z_stream z{};
  if (inflateInit2(&z, -12) != Z_OK) return Status::Error(ENOMEM, "qcow2: inflateInit failed");
  z.next_in = reinterpret_cast<Bytef*>(in.data());
  z.avail_in = static_cast<uInt>(clen);
  z.next_out = reinterpret_cast<Bytef*>(out);
  z.avail_out = static_cast<uInt>(cs_);
  int r = inflate(&z, Z_FINISH);
  bool ok = (r == Z_STREAM_END || (r == Z_BUF_ERROR && z.avail_out == 0)) && z.avail_out == 0;
  inflateEnd(&z);
  if (!ok) return Status::Error(EIO, "qcow2: compressed cluster does not decompress (image corrupt)");
  return Status::Ok();
}

Status Qcow2::read_cluster(uint64_t cluster, const Entry& e, char* buf, uint32_t in_off, uint32_t len) {
  const uint64_t guest = (cluster << cluster_bits_) + in_off;
  if (e.compressed()) {
    std::vector<char>& c = scratch(1, cs_);
    Status s = read_compressed(e, c.data());
    if (!s.ok()) return s;
    std::memcpy(buf, c.data() + in_off, len);
    return Status::Ok();
  }
  const uint64_t host = e.raw & kOffsetMask;
  if (host && (host < cs_ || (e.raw & 0x1ff & ~kZero)))
    return mark_corrupt("qcow2: L2 entry points into the header or is unaligned (image corrupt)");
  if (!ext_l2_) {
    if (e.raw & kZero) {
      if (version_ < 3) return mark_corrupt("qcow2: zero cluster in a version 2 image");
      std::memset(buf, 0, len);
      return Status::Ok();
    }
    if (!host) return read_backing(buf, len, guest);
    return read_zero_padded(*file_, buf, len, host + in_off);
  }
  // Extended L2: run by run of subclusters in the same state.
  uint32_t pos = 0;
  while (pos < len) {
    uint32_t sc = (in_off + pos) / sc_size_;
    uint32_t state = ((e.bitmap >> sc) & 1) | (((e.bitmap >> (32 + sc)) & 1) << 1);
    uint32_t end_sc = sc + 1;
    while (end_sc < 32 && (((e.bitmap >> end_sc) & 1) | (((e.bitmap >> (32 + end_sc)) & 1) << 1)) == state) ++end_sc;
    uint32_t run = std::min<uint32_t>(end_sc * sc_size_, in_off + len) - (in_off + pos);
    Status s;
    if (state == 3) return mark_corrupt("qcow2: subcluster both allocated and zero (image corrupt)");
    if (state == 1) {
      if (!host) return mark_corrupt("qcow2: allocated subcluster in an unallocated cluster (image corrupt)");
      s = read_zero_padded(*file_, buf + pos, run, host + in_off + pos);
    } else if (state == 2) {
      std::memset(buf + pos, 0, run);
      s = Status::Ok();
    } else {
      s = read_backing(buf + pos, run, guest + pos);
    }
    if (!s.ok()) return s;
    pos += run;
  }
  return Status::Ok();
}

bool Qcow2::peek_entry(uint64_t cluster, Entry* e) const {
  *e = Entry{};
  const uint64_t l1i = cluster >> l2_bits_;
  if (l1i >= l1_.size()) return true;
  const uint64_t l2off = l1_[l1i] & kOffsetMask;
  if (!l2off) return true;
  auto it = l2_cache_.find(l2off);
  if (it == l2_cache_.end()) return false;
  it->second.used.touch(lru_);
  *e = entry_at(&it->second, static_cast<uint32_t>(cluster & ((1u << l2_bits_) - 1)));
  return true;
}

uint64_t Qcow2::in_place_run(uint64_t pos, uint64_t want, bool for_write, uint64_t* host) const {
  if (ext_l2_ || corrupt_.load(std::memory_order_relaxed)) return 0;
  auto plain = [&](const Entry& e) {
    return !e.compressed() && !(e.raw & 0x1ff) && (e.raw & kOffsetMask) >= cs_ && (!for_write || (e.raw & kCopied));
  };
  const uint64_t cluster = pos >> cluster_bits_;
  const uint64_t in_off = pos & (cs_ - 1);
  Entry e;
  if (!peek_entry(cluster, &e) || !plain(e)) return 0;
  const uint64_t h = e.raw & kOffsetMask;
  uint64_t total = std::min<uint64_t>(cs_ - in_off, want);
  for (uint64_t k = 1; total < want; ++k) {
    Entry ne;
    if (!peek_entry(cluster + k, &ne) || !plain(ne) || (ne.raw & kOffsetMask) != h + (k << cluster_bits_)) break;
    total += std::min<uint64_t>(cs_, want - total);
  }
  // An entry pointing into metadata is a corrupt image: the exclusive path says so.
  if (for_write && overlaps_metadata(h + in_off, total)) return 0;
  *host = h + in_off;
  return total;
}

Status Qcow2::read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) {
  *got = 0;
  char* out = static_cast<char*>(buf);
  {
    std::shared_lock<std::shared_mutex> g(mu_);
    if (off >= size_) return Status::Ok();
    len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  }
  size_t done = 0;
  while (done < len) {
    const uint64_t pos = off + done;
    // Fast path: plain clusters contiguous in the file, tables cached, one read.
    {
      std::shared_lock<std::shared_mutex> g(mu_);
      uint64_t host = 0;
      uint64_t total = in_place_run(pos, len - done, false, &host);
      if (total) {
        Pin pin = pin_locked();
        g.unlock();
        Status s = read_zero_padded(*file_, out + done, total, host, io);
        if (!s.ok()) return s;
        done += total;
        continue;
      }
    }
    const uint64_t cluster = pos >> cluster_bits_;
    const uint32_t in_off = static_cast<uint32_t>(pos & (cs_ - 1));
    const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(cs_ - in_off, len - done));
    Entry e;
    Pin pin;
    {
      std::lock_guard<std::shared_mutex> g(mu_);
      trim_caches();
      Status s = get_entry(cluster, &e);
      if (!s.ok()) return s;
      pin = pin_locked();
    }
    Status s = read_cluster(cluster, e, out + done, in_off, n);
    if (!s.ok()) return s;
    done += n;
  }
  *got = len;
  return Status::Ok();
}

// Writes [in_off, in_off+len) of guest cluster `cluster` (mu_ held for the allocating cases).
Status Qcow2::write_cluster(uint64_t cluster, const char* buf, uint32_t in_off, uint32_t len, const Io& io) {
  std::unique_lock<std::shared_mutex> g(mu_);
  trim_caches();
  if (corrupt_.load()) return Status::Error(EIO, "qcow2: image corrupt, writes refused");
  Entry e;
  Status s = get_entry(cluster, &e);
  if (!s.ok()) return s;
  uint64_t host = e.raw & kOffsetMask;
  const bool plain = host && !e.compressed();
  bool priv = false;
  if (plain) {
    if (e.raw & kCopied) {
      priv = true;
    } else {
      uint64_t rc = 0;
      s = refcount(host >> cluster_bits_, &rc);
      if (!s.ok()) return s;
      priv = rc == 1;
    }
    if (host < cs_ || (e.raw & 0x1ff & ~kZero)) return mark_corrupt("qcow2: L2 entry points into the header (image corrupt)");
  }
  // A: in place, everything it covers already allocated.
  bool covered = plain && priv;
  if (covered && !ext_l2_) covered = !(e.raw & kZero);
  if (covered && ext_l2_) {
    uint32_t a = in_off / sc_size_, b = (in_off + len - 1) / sc_size_;
    for (uint32_t k = a; k <= b; ++k) covered &= (e.bitmap >> k) & 1;
  }
  if (covered && (e.raw & kCopied)) {
    if (overlaps_metadata(host + in_off, len)) return mark_corrupt("qcow2: data cluster overlaps metadata (image corrupt)");
    Pin pin = pin_locked();
    g.unlock();
    return file_->write(io, buf, len, host + in_off);
  }
  // B and C: the whole cluster is composed and written, then the entry changes.
  Table* t = nullptr;
  uint32_t idx = 0;
  s = writable_l2(cluster, &t, &idx);
  if (!s.ok()) return s;
  e = entry_at(t, idx);  // the table may be a fresh copy; the entry is the same
  std::vector<char>& c = scratch(2, cs_);
  const bool full = in_off == 0 && len == cs_;
  uint64_t target = 0;
  bool fresh = false, zeroed = false;
  if (plain && priv) {
    target = host;
  } else {
    s = alloc(1, &target, &zeroed);
    if (!s.ok()) return s;
    fresh = true;
  }
  if (overlaps_metadata(target, cs_)) return mark_corrupt("qcow2: data cluster overlaps metadata (image corrupt)");
  if (full) {
    s = file_->write(Io{}, buf, cs_, target);
  } else {
    // Copy-on-write: what the cluster reads as now, with the new bytes over it. A fresh
    // cluster whose old content is all zeros needs only the new bytes (the file is sparse).
    bool zeros_only = !backing_ && !e.compressed() && !host;
    if (!ext_l2_ && (e.raw & kZero) && !host) zeros_only = true;
    if (zeros_only && fresh && zeroed) {
      s = file_->write(Io{}, buf, len, target + in_off);
    } else {
      s = read_cluster(cluster, e, c.data(), 0, static_cast<uint32_t>(cs_));
      if (!s.ok()) return s;
      std::memcpy(c.data() + in_off, buf, len);
      s = file_->write(Io{}, c.data(), cs_, target);
    }
  }
  if (!s.ok()) return s;
  Entry ne;
  ne.raw = target | kCopied;
  ne.bitmap = ext_l2_ ? 0xffffffffull : 0;
  set_entry(t, idx, ne);
  if (fresh) drop_entry_refs(e);
  return Status::Ok();
}

Status Qcow2::first_write() {
  std::lock_guard<std::shared_mutex> g(mu_);
  if (!first_write_pending_.load()) return Status::Ok();
  if (corrupt_.load()) return Status::Error(EIO, "qcow2: image corrupt, writes refused");
  if (autoclear_set_) {
    uint8_t z[8] = {};
    Status s = file_->write(Io{}, z, 8, 88);
    if (s.ok()) s = file_->sync(Io{}, true);
    if (!s.ok()) return s;
    autoclear_set_ = false;
  }
  if (repair_pending_) {
    std::string why;
    Status s = repair_locked(&why);
    if (!s.ok()) {
      // Nothing the image relies on changed (it is still dirty); it stays usable for reads.
      read_only_ = true;
      info_.read_only_reason = "the image is dirty and could not be repaired (" + why + "); run qemu-img check -r all";
      return Status::Error(s.err == EIO ? EIO : EROFS, "qcow2: dirty image could not be repaired");
    }
    repair_pending_ = false;
  }
  first_write_pending_.store(false);
  return Status::Ok();
}

Status Qcow2::write(const Io& io, const void* buf, size_t len, uint64_t off) {
  if (read_only_) return Status::Error(EROFS, "qcow2: image is read-only");
  if (first_write_pending_.load()) {
    Status s = first_write();
    if (!s.ok()) return s;
  }
  const char* in = static_cast<const char*>(buf);
  size_t done = 0;
  while (done < len) {
    const uint64_t pos = off + done;
    {
      // Fast path: a run of private, allocated clusters contiguous in the file, one write.
      std::shared_lock<std::shared_mutex> g(mu_);
      if (done == 0 && (off > size_ || len > size_ - off))
        return Status::Error(ENOSPC, "qcow2: write past the virtual disk's end");
      uint64_t host = 0;
      uint64_t total = in_place_run(pos, len - done, true, &host);
      if (total) {
        Pin pin = pin_locked();
        g.unlock();
        Status s = file_->write(io, in + done, total, host);
        if (!s.ok()) return s;
        done += total;
        continue;
      }
    }
    const uint32_t in_off = static_cast<uint32_t>(pos & (cs_ - 1));
    const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(cs_ - in_off, len - done));
    Status s = write_cluster(pos >> cluster_bits_, in + done, in_off, n, io);
    if (!s.ok()) return s;
    done += n;
  }
  return Status::Ok();
}

Status Qcow2::sync(const Io&, bool) {
  if (read_only_) return Status::Ok();
  return flush();
}

// Makes a whole guest cluster read as zeros without data: a zero cluster (v3), or unallocated
// (v2 without a backing file). Returns ENOTSUP when only writing zeros can do it.
Status Qcow2::zero_cluster(uint64_t cluster, bool) {
  std::lock_guard<std::shared_mutex> g(mu_);
  trim_caches();
  if (corrupt_.load()) return Status::Error(EIO, "qcow2: image corrupt, writes refused");
  if (version_ < 3 && backing_) return Status::Error(ENOTSUP, "");
  Entry e;
  Status s = get_entry(cluster, &e);
  if (!s.ok()) return s;
  Entry ne;
  if (version_ >= 3) {
    if (ext_l2_) ne.bitmap = 0xffffffffull << 32;
    else ne.raw = kZero;
  }
  if (e.raw == ne.raw && e.bitmap == ne.bitmap) return Status::Ok();
  if (!e.raw && !e.bitmap && !backing_ && version_ < 3) return Status::Ok();
  Table* t = nullptr;
  uint32_t idx = 0;
  s = writable_l2(cluster, &t, &idx);
  if (!s.ok()) return s;
  e = entry_at(t, idx);
  set_entry(t, idx, ne);
  drop_entry_refs(e);
  return Status::Ok();
}

Status Qcow2::fallocate(const Io& io, int mode, uint64_t off, uint64_t len) {
  const bool punch = mode & FALLOC_FL_PUNCH_HOLE;
  const bool zero = mode & FALLOC_FL_ZERO_RANGE;
  uint64_t size;
  {
    std::lock_guard<std::shared_mutex> g(mu_);
    size = size_;
  }
  if (!punch && !zero) {
    if (mode & ~FALLOC_FL_KEEP_SIZE) return Status::Error(EOPNOTSUPP, "qcow2: fallocate mode not supported");
    if (off + len > size && !(mode & FALLOC_FL_KEEP_SIZE)) return resize(io, off + len);
    return Status::Ok();  // reading unallocated space already works; nothing to reserve
  }
  if (read_only_) return Status::Error(EROFS, "qcow2: image is read-only");
  if (first_write_pending_.load()) {
    Status s = first_write();
    if (!s.ok()) return s;
  }
  if (off >= size) return Status::Ok();
  len = std::min<uint64_t>(len, size - off);
  std::vector<char> zeros;
  uint64_t pos = off, end = off + len;
  while (pos < end) {
    uint64_t cluster = pos >> cluster_bits_;
    uint64_t in_off = pos & (cs_ - 1);
    uint64_t n = std::min<uint64_t>(cs_ - in_off, end - pos);
    Status s = Status::Error(ENOTSUP);
    if (n == cs_ || (in_off == 0 && pos + n == size)) s = zero_cluster(cluster, punch);
    if (s.err == ENOTSUP) {
      if (zeros.empty()) zeros.assign(cs_, 0);
      s = write_cluster(cluster, zeros.data(), static_cast<uint32_t>(in_off), static_cast<uint32_t>(n), io);
    }
    if (!s.ok()) return s;
    pos += n;
  }
  return Status::Ok();
}

Status Qcow2::resize(const Io&, uint64_t new_size) {
  if (read_only_) return Status::Error(EROFS, "qcow2: image is read-only");
  if (first_write_pending_.load()) {
    Status s = first_write();
    if (!s.ok()) return s;
  }
  std::lock_guard<std::shared_mutex> g(mu_);
  if (corrupt_.load()) return Status::Error(EIO, "qcow2: image corrupt, writes refused");
  if (new_size == size_) return Status::Ok();
  if (new_size < size_) return Status::Error(EOPNOTSUPP, "qcow2: shrinking a virtual disk is not supported");
  if (new_size % 512) return Status::Error(EINVAL, "qcow2: the virtual size must be a multiple of 512");
  if (new_size > kMaxVirtualSize) return Status::Error(EFBIG, "qcow2: virtual size too large");
  const uint64_t l2_cover = cs_ << l2_bits_;
  const uint64_t need = (new_size + l2_cover - 1) / l2_cover;
  if (need * 8 > kMaxL1Bytes) return Status::Error(EFBIG, "qcow2: virtual size needs too large an L1 table");
  if (need > l1_.size()) {
    // Everything older reaches the file first, so the new table is the only change pending.
    Status s = flush_locked();
    if (!s.ok()) return s;
    uint64_t clusters = (need * 8 + cs_ - 1) / cs_;
    if (clusters <= l1_clusters_ && l1_off_) {
      l1_.resize(need, 0);  // the reserved clusters already hold it
    } else {
      uint64_t off = 0;
      s = alloc(clusters, &off);
      if (!s.ok()) return s;
      if (l1_off_ && l1_clusters_) drop_ref(l1_off_, uint64_t{l1_clusters_} * cs_);
      l1_.resize(need, 0);
      l1_off_ = off;
      l1_clusters_ = static_cast<uint32_t>(clusters);
    }
    l1_dirty_ = true;
  }
  size_ = new_size;
  header_dirty_ = true;
  info_.virtual_size = new_size;
  return flush_locked();
}

Status Qcow2::seek(const Io&, uint64_t off, int whence, uint64_t* result) {
  std::lock_guard<std::shared_mutex> g(mu_);
  if (off >= size_) return Status::Error(ENXIO, "qcow2: seek past the end");
  const bool want_data = whence == SEEK_DATA;
  uint64_t pos = off;
  while (pos < size_) {
    uint64_t cluster = pos >> cluster_bits_;
    uint64_t l1i = cluster >> l2_bits_;
    if (l1i >= l1_.size() || !(l1_[l1i] & kOffsetMask)) {  // a whole L2 range without a table
      if ((backing_ != nullptr) == want_data) {
        *result = pos;
        return Status::Ok();
      }
      pos = (l1i + 1) << (l2_bits_ + cluster_bits_);
      continue;
    }
    Entry e;
    Status s = get_entry(cluster, &e);
    if (!s.ok()) return s;
    // Whether each subcluster (or the whole cluster) holds data.
    uint64_t step = ext_l2_ && !e.compressed() ? sc_size_ : cs_;
    uint64_t unit_start = pos & ~(step - 1);
    bool data;
    if (e.compressed()) {
      data = true;
    } else if (!ext_l2_) {
      data = (e.raw & kZero) ? false : ((e.raw & kOffsetMask) ? true : backing_ != nullptr);
    } else {
      uint32_t sc = static_cast<uint32_t>((pos & (cs_ - 1)) / sc_size_);
      bool alloc_bit = (e.bitmap >> sc) & 1, zero_bit = (e.bitmap >> (32 + sc)) & 1;
      data = alloc_bit || (!zero_bit && backing_ != nullptr);
    }
    if (data == want_data) {
      *result = pos;
      return Status::Ok();
    }
    pos = unit_start + step;
  }
  if (want_data) return Status::Error(ENXIO, "qcow2: no data after offset");
  *result = size_;
  return Status::Ok();
}

Status Qcow2::size(uint64_t* out) {
  std::shared_lock<std::shared_mutex> g(mu_);  // a reader: resize holds it exclusively
  *out = size_;
  return Status::Ok();
}

}  // namespace iofilterfs::format
