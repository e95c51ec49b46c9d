#include "format/vmdk.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "format/file.h"

namespace iofilterfs::format {
namespace {

constexpr uint32_t kMagic = 0x564d444b;  // "KDMV" little-endian
constexpr uint64_t kGdAtEnd = ~0ull;
constexpr uint32_t kFlagRgd = 1u << 1, kFlagZeroGrain = 1u << 2, kFlagCompressed = 1u << 16,
                   kFlagMarkers = 1u << 17;
constexpr uint64_t kMaxSize = 1ull << 56;
constexpr uint64_t kMaxGdEntries = 16u << 20;
constexpr uint64_t kMaxDescriptor = 1u << 20;
constexpr int kMaxExtents = 4096;

uint32_t le32(const uint8_t* p) { return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24); }
uint64_t le64(const uint8_t* p) { return uint64_t{le32(p)} | (uint64_t{le32(p + 4)} << 32); }
void put_le32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

std::string dirname_of(const std::string& p) {
  size_t s = p.rfind('/');
  if (s == std::string::npos) return ".";
  return s == 0 ? "/" : p.substr(0, s);
}

std::string real_path(const std::string& p) {
  char* r = ::realpath(p.c_str(), nullptr);
  if (!r) return {};
  std::string out(r);
  std::free(r);
  return out;
}

}  // namespace

#define FAIL(...)                                          \
  do {                                                     \
    *err = std::string("vmdk: ") + (__VA_ARGS__);          \
    return Status::Error(EINVAL, "vmdk: invalid image");   \
  } while (0)

Status Vmdk::mark_corrupt(const char* what) {
  corrupt_.store(true);
  return Status::Error(EIO, what);
}

Status Vmdk::open(Layer* file, const VmdkOptions& opt, std::unique_ptr<Vmdk>* out, std::string* err) {
  std::unique_ptr<Vmdk> v(new Vmdk());
  v->file_ = file;
  v->opt_ = opt;
  v->read_only_ = opt.read_only;
  if (opt.read_only) v->ro_reason_ = "opened read-only";
  uint8_t m[4] = {};
  Status s = read_zero_padded(*file, m, 4, 0);
  if (!s.ok()) {
    *err = "vmdk: cannot read the file";
    return s;
  }
  if (le32(m) == kMagic) {
    Extent e;
    e.kind = Extent::Sparse_;
    e.file = file;
    std::string text;
    s = v->open_sparse(&e, &text, err);
    if (!s.ok()) return s;
    v->extents_.push_back(std::move(e));
    // The embedded descriptor names the kind and rules out delta disks; its extent line is
    // this very file.
    s = v->parse_descriptor(text, true, err);
    if (!s.ok()) return s;
    v->extents_[0].start = 0;
    v->size_ = v->extents_[0].length;
  } else {
    uint64_t fsize = 0;
    s = file->size(&fsize);
    if (!s.ok()) return s;
    if (fsize > kMaxDescriptor) FAIL("not a sparse extent, and too large for a descriptor");
    std::string text(fsize, '\0');
    s = read_zero_padded(*file, text.data(), fsize, 0);
    if (!s.ok()) return s;
    text.resize(strnlen(text.data(), text.size()));  // QEMU pads descriptors it rewrites with NULs
    if (text.rfind("# Disk DescriptorFile", 0) != 0) FAIL("neither a sparse extent nor a descriptor");
    s = v->parse_descriptor(text, false, err);
    if (!s.ok()) return s;
  }
  for (auto& e : v->extents_)
    if (!e.writable && !v->read_only_) {
      v->read_only_ = true;
      v->ro_reason_ = e.sparse && e.sparse->compressed ? "streamOptimized images are read-only"
                                                        : "an extent is read-only";
    }
  *out = std::move(v);
  return Status::Ok();
}

Status Vmdk::open_sparse(Extent* e, std::string* text, std::string* err) {
  Layer& f = *e->file;
  uint64_t fsize = 0;
  Status s = f.size(&fsize);
  if (!s.ok()) return s;
  if (fsize < 512) FAIL("sparse extent shorter than its header");
  uint8_t h[512];
  s = read_zero_padded(f, h, 512, 0);
  if (!s.ok()) return s;
  uint32_t version = le32(h + 4), flags = le32(h + 8);
  if (version < 1 || version > 3) FAIL("unsupported sparse extent version " + std::to_string(version));
  uint64_t desc_off = le64(h + 28), desc_size = le64(h + 36);
  uint64_t gd_off = le64(h + 56);
  uint16_t compress = static_cast<uint16_t>(h[77] | (h[78] << 8));
  if (gd_off == kGdAtEnd) {  // streamOptimized: the real header is in the footer
    if (fsize < 1536) FAIL("footer missing");
    uint8_t footer[1536];
    s = read_zero_padded(f, footer, sizeof footer, fsize - 1536);
    if (!s.ok()) return s;
    if (le32(footer + 12) != 3 || le32(footer + 512) != kMagic) FAIL("footer missing or damaged");
    std::memcpy(h, footer + 512, 512);
    flags = le32(h + 8);
    gd_off = le64(h + 56);
    compress = static_cast<uint16_t>(h[77] | (h[78] << 8));
  }
  auto sp = std::make_unique<Sparse>();
  const uint64_t capacity = le64(h + 12);
  sp->grain_sectors = le64(h + 20);
  sp->gtes = le32(h + 44);
  sp->zero_grains = flags & kFlagZeroGrain;
  sp->compressed = flags & kFlagCompressed;
  if (capacity == 0 || capacity > kMaxSize / 512) FAIL("capacity " + std::to_string(capacity) + " is absurd");
  if (sp->grain_sectors == 0 || sp->grain_sectors > (1u << 16) || (sp->grain_sectors & (sp->grain_sectors - 1)))
    FAIL("grain size " + std::to_string(sp->grain_sectors) + " sectors is invalid");
  if (sp->gtes == 0 || sp->gtes > 512) FAIL("grain table size " + std::to_string(sp->gtes) + " is invalid");
  if (sp->compressed && compress != 1) FAIL("unknown grain compression " + std::to_string(compress));
  if (sp->compressed && !(flags & kFlagMarkers)) FAIL("compressed grains without markers are not supported");
  const uint64_t grains = (capacity + sp->grain_sectors - 1) / sp->grain_sectors;
  const uint64_t gd_entries = (grains + sp->gtes - 1) / sp->gtes;
  if (gd_entries > kMaxGdEntries) FAIL("grain directory too large");
  const bool use_rgd = (flags & kFlagRgd) && le64(h + 48) != 0;
  const uint64_t gd_sector = use_rgd ? le64(h + 48) : gd_off;  // QEMU reads the redundant one first
  auto load_dir = [&](uint64_t sector, std::vector<uint32_t>* dir, uint64_t* at) -> Status {
    if (sector == 0 || sector > fsize / 512 || sector * 512 + gd_entries * 4 > fsize)
      return Status::Error(EINVAL, "vmdk: grain directory lies outside the file");
    std::vector<uint8_t> raw(gd_entries * 4);
    Status st = read_zero_padded(f, raw.data(), raw.size(), sector * 512);
    if (!st.ok()) return st;
    dir->resize(gd_entries);
    for (uint64_t i = 0; i < gd_entries; ++i) (*dir)[i] = le32(&raw[i * 4]);
    *at = sector * 512;
    return Status::Ok();
  };
  s = load_dir(gd_sector, &sp->gd, &sp->gd_off);
  if (!s.ok()) FAIL("grain directory lies outside the file");
  if (use_rgd) {
    s = load_dir(gd_off, &sp->rgd, &sp->rgd_off);
    if (!s.ok()) FAIL("redundant grain directory lies outside the file");
    std::swap(sp->gd, sp->rgd);  // gd: the primary (gd_off); rgd: the redundant copy
    std::swap(sp->gd_off, sp->rgd_off);
  }
  // Metadata ranges, for the overlap checks on write.
  const uint64_t gt_bytes = uint64_t{sp->gtes} * 4;
  sp->meta.emplace_back(0, 512);
  sp->meta.emplace_back(sp->gd_off, gd_entries * 4);
  if (!sp->rgd.empty()) sp->meta.emplace_back(sp->rgd_off, gd_entries * 4);
  for (auto* dir : {&sp->gd, &sp->rgd})
    for (uint32_t gt : *dir)
      if (gt) sp->meta.emplace_back(uint64_t{gt} * 512, gt_bytes);
  if (desc_off && desc_size) sp->meta.emplace_back(desc_off * 512, desc_size * 512);
  std::sort(sp->meta.begin(), sp->meta.end());
  sp->file_end = (fsize + 511) & ~511ull;
  e->length = capacity * 512;
  e->writable = !sp->compressed;
  // The embedded descriptor.
  if (desc_off && desc_size) {
    if (desc_size > kMaxDescriptor / 512 || desc_off * 512 + desc_size * 512 > fsize)
      FAIL("embedded descriptor lies outside the file");
    text->assign(desc_size * 512, '\0');
    s = read_zero_padded(f, text->data(), text->size(), desc_off * 512);
    if (!s.ok()) return s;
    text->resize(strnlen(text->data(), text->size()));
    if (e->file == file_) {
      desc_at_ = desc_off * 512;
      desc_area_ = desc_size * 512;
    }
  }
  e->sparse = std::move(sp);
  return Status::Ok();
}

Status Vmdk::parse_descriptor(const std::string& text, bool embedded, std::string* err) {
  std::istringstream in(text);
  std::string line;
  uint64_t pos = 0;
  int n = 0;
  desc_lines_.clear();
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') {
      line.pop_back();
      desc_crlf_ = true;
    }
    desc_lines_.push_back(line);
    const int line_no = static_cast<int>(desc_lines_.size()) - 1;
    if (line.rfind("createType", 0) == 0) {
      size_t q1 = line.find('"'), q2 = line.rfind('"');
      if (q1 != std::string::npos && q2 > q1) create_type_ = line.substr(q1 + 1, q2 - q1 - 1);
      continue;
    }
    if (line.rfind("parentCID", 0) == 0) {
      size_t eq = line.find('=');
      std::string v = eq == std::string::npos ? "" : line.substr(eq + 1);
      v.erase(0, v.find_first_not_of(" \t"));
      if (v.rfind("ffffffff", 0) != 0) FAIL("delta disks (with a parent) are not supported");
      continue;
    }
    std::istringstream ls(line);
    std::string access, type;
    uint64_t sectors = 0;
    if (!(ls >> access >> sectors >> type)) continue;
    if (access != "RW" && access != "RDONLY" && access != "NOACCESS") continue;
    if (++n > kMaxExtents) FAIL("too many extents");
    if (sectors > kMaxSize / 512 || pos + sectors * 512 > kMaxSize) FAIL("extent sizes are absurd");
    if (embedded) {
      if (n > 1) FAIL("a sparse file's embedded descriptor lists more than one extent");
      // The header's capacity is the size, as in QEMU; the line may lag it after a crash
      // during growth (the header is written last), and the next growth rewrites it.
      extents_[0].desc_line = line_no;
      continue;
    }
    Extent e;
    e.start = pos;
    e.length = sectors * 512;
    e.writable = access == "RW";
    e.desc_line = line_no;
    if (type == "ZERO") {
      e.kind = Extent::Zero;
      e.writable = false;
    } else {
      size_t q1 = line.find('"'), q2 = q1 == std::string::npos ? q1 : line.find('"', q1 + 1);
      if (q2 == std::string::npos) FAIL("extent line without a file name: " + line);
      std::string name = line.substr(q1 + 1, q2 - q1 - 1);
      uint64_t offset = 0;
      {
        std::istringstream rest(line.substr(q2 + 1));
        rest >> offset;
      }
      if (name.empty() || name.find('\0') != std::string::npos) FAIL("bad extent file name");
      std::string path = name[0] == '/' ? name : dirname_of(opt_.path) + "/" + name;
      std::string real = real_path(path);
      if (real.empty()) FAIL("extent " + name + " cannot be found");
      if (!opt_.backing_root.empty()) {
        std::string root = real_path(opt_.backing_root);
        if (root.empty() || real.compare(0, root.size(), root) != 0 ||
            (real.size() > root.size() && real[root.size()] != '/'))
          FAIL("extent " + name + " lies outside the datastore");
      }
      std::string ferr;
      auto f = FdFile::open(real, !read_only_ && e.writable, &ferr);
      if (!f) FAIL(ferr);
      e.file = f.get();
      e.owned = std::move(f);
      e.name = name;
      if (type == "FLAT" || type == "VMFS") {
        e.kind = Extent::Flat;
        if (offset > kMaxSize / 512) FAIL("extent offset is absurd");
        e.file_off = offset * 512;
      } else if (type == "SPARSE") {
        uint8_t m[4] = {};
        Status s = read_zero_padded(*e.file, m, 4, 0);
        if (!s.ok() || le32(m) != kMagic) FAIL("extent " + name + " is not a hosted sparse extent");
        std::string ignored;
        e.kind = Extent::Sparse_;
        s = open_sparse(&e, &ignored, err);
        if (!s.ok()) return s;
        // Its size is its header's capacity, as QEMU has it (the descriptor's count may lag it
        // after a crash during growth: the header is written first).
        e.writable = e.writable && !e.sparse->compressed;
        if (pos + e.length > kMaxSize) FAIL("extent sizes are absurd");
        pos += e.length;
        extents_.push_back(std::move(e));
        continue;
      } else {
        FAIL("extent type " + type + " is not supported");
      }
    }
    extents_.push_back(std::move(e));
    pos += sectors * 512;
  }
  if (!embedded) {
    if (extents_.empty()) FAIL("the descriptor lists no extents");
    size_ = pos;
  }
  return Status::Ok();
}

#undef FAIL

Vmdk::~Vmdk() {
  if (!read_only_ && !corrupt_.load()) (void)flush();
}

bool Vmdk::in_meta(const Sparse& sp, uint64_t off, uint64_t len) const {
  // Grain tables and the header are at most 4 KiB: look near `off`; the large ranges (the
  // directories, the descriptor) are few: look at each.
  uint64_t lo = off > 4096 ? off - 4096 : 0;
  auto it = std::lower_bound(sp.meta.begin(), sp.meta.end(), std::make_pair(lo, uint64_t{0}));
  for (; it != sp.meta.end() && it->first < off + len; ++it)
    if (it->first + it->second > off) return true;
  for (auto& r : sp.meta)
    if (r.second > 4096 && off < r.first + r.second && r.first < off + len) return true;
  return false;
}

Status Vmdk::load_gt(Extent& e, uint64_t gdi, std::vector<uint32_t>** gt) {
  Sparse& sp = *e.sparse;
  auto it = sp.gts.find(gdi);
  if (it != sp.gts.end()) {
    *gt = &it->second;
    return Status::Ok();
  }
  uint64_t sector = sp.gd[gdi];
  uint64_t fsize = sp.file_end;
  if (sector == 0 || sector * 512 + uint64_t{sp.gtes} * 4 > fsize)
    return mark_corrupt("vmdk: grain table lies outside the file (image corrupt)");
  std::vector<uint8_t> raw(uint64_t{sp.gtes} * 4);
  Status s = read_zero_padded(*e.file, raw.data(), raw.size(), sector * 512);
  if (!s.ok()) return s;
  std::vector<uint32_t> t(sp.gtes);
  for (uint32_t i = 0; i < sp.gtes; ++i) t[i] = le32(&raw[uint64_t{i} * 4]);
  if (sp.gts.size() > 4096) {  // keep memory bounded: drop clean tables
    for (auto i = sp.gts.begin(); i != sp.gts.end();)
      i = sp.gt_dirty.count(i->first) ? std::next(i) : sp.gts.erase(i);
  }
  *gt = &(sp.gts[gdi] = std::move(t));
  return Status::Ok();
}

Status Vmdk::read_extent(Extent& e, char* buf, size_t len, uint64_t off) {
  if (e.kind == Extent::Zero) {
    std::memset(buf, 0, len);
    return Status::Ok();
  }
  if (e.kind == Extent::Flat) return read_zero_padded(*e.file, buf, len, e.file_off + off);
  Sparse& sp = *e.sparse;
  const uint64_t gbytes = sp.grain_sectors * 512;
  size_t done = 0;
  while (done < len) {
    uint64_t pos = off + done;
    uint64_t grain = pos / gbytes, in = pos % gbytes;
    size_t n = static_cast<size_t>(std::min<uint64_t>(gbytes - in, len - done));
    uint64_t gdi = grain / sp.gtes;
    uint32_t gte = 0;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (gdi >= sp.gd.size()) return mark_corrupt("vmdk: read past the grain directory");
      if (sp.gd[gdi]) {
        std::vector<uint32_t>* gt = nullptr;
        Status s = load_gt(e, gdi, &gt);
        if (!s.ok()) return s;
        gte = (*gt)[grain % sp.gtes];
      }
    }
    if (gte == 0 || (gte == 1 && sp.zero_grains)) {
      std::memset(buf + done, 0, n);
    } else if (sp.compressed) {
      uint8_t mk[12];
      Status s = read_zero_padded(*e.file, mk, 12, uint64_t{gte} * 512);
      if (!s.ok()) return s;
      uint32_t csize = le32(mk + 8);
      if (csize == 0 || csize > 2 * gbytes + 4096) return mark_corrupt("vmdk: compressed grain size is absurd");
      std::vector<char> cin(csize), cout(gbytes);
      s = read_zero_padded(*e.file, cin.data(), csize, uint64_t{gte} * 512 + 12);
      if (!s.ok()) return s;
      uLongf outlen = static_cast<uLongf>(gbytes);
      int r = uncompress(reinterpret_cast<Bytef*>(cout.data()), &outlen, reinterpret_cast<const Bytef*>(cin.data()),
                         csize);
      if (r != Z_OK) return mark_corrupt("vmdk: compressed grain does not decompress (image corrupt)");
      if (outlen < gbytes) std::memset(cout.data() + outlen, 0, gbytes - outlen);
      std::memcpy(buf + done, cout.data() + in, n);
    } else {
      Status s = read_zero_padded(*e.file, buf + done, n, uint64_t{gte} * 512 + in);
      if (!s.ok()) return s;
    }
    done += n;
  }
  return Status::Ok();
}

Status Vmdk::write_extent(Extent& e, const char* buf, size_t len, uint64_t off) {
  if (!e.writable) return Status::Error(EROFS, "vmdk: extent is read-only");
  if (e.kind == Extent::Flat) return e.file->write(Io{}, buf, len, e.file_off + off);
  Sparse& sp = *e.sparse;
  const uint64_t gbytes = sp.grain_sectors * 512;
  size_t done = 0;
  std::vector<char> grain_buf;
  while (done < len) {
    uint64_t pos = off + done;
    uint64_t grain = pos / gbytes, in = pos % gbytes;
    size_t n = static_cast<size_t>(std::min<uint64_t>(gbytes - in, len - done));
    uint64_t gdi = grain / sp.gtes;
    std::unique_lock<std::mutex> g(mu_);
    if (corrupt_.load()) return Status::Error(EIO, "vmdk: image corrupt, writes refused");
    if (gdi >= sp.gd.size()) return mark_corrupt("vmdk: write past the grain directory");
    if (!sp.gd[gdi]) {  // a new grain table (and its redundant copy) at the end of the file
      uint64_t gt_bytes = (uint64_t{sp.gtes} * 4 + 511) & ~511ull;
      std::vector<char> zeros(gt_bytes, 0);
      for (auto* dir : {&sp.gd, &sp.rgd}) {
        if (dir->empty()) continue;
        uint64_t at = sp.file_end;
        Status s = e.file->write(Io{}, zeros.data(), gt_bytes, at);
        if (!s.ok()) return s;
        sp.file_end += gt_bytes;
        (*dir)[gdi] = static_cast<uint32_t>(at / 512);
        sp.meta.emplace_back(at, gt_bytes);
      }
      std::sort(sp.meta.begin(), sp.meta.end());
      sp.gts[gdi] = std::vector<uint32_t>(sp.gtes, 0);
      sp.gt_dirty[gdi] = true;
      sp.gd_dirty = true;
    }
    std::vector<uint32_t>* gt = nullptr;
    Status s = load_gt(e, gdi, &gt);
    if (!s.ok()) return s;
    uint32_t& gte = (*gt)[grain % sp.gtes];
    if (gte > 1 || (gte == 1 && !sp.zero_grains)) {
      uint64_t at = uint64_t{gte} * 512 + in;
      if (in_meta(sp, at, n)) return mark_corrupt("vmdk: grain overlaps metadata (image corrupt)");
      g.unlock();
      s = e.file->write(Io{}, buf + done, n, at);
      if (!s.ok()) return s;
    } else {
      // A new grain: zeros with the new bytes over them, appended.
      uint64_t at = sp.file_end;
      if (at / 512 > 0xffffffffull) return Status::Error(EFBIG, "vmdk: extent file full (32-bit sector offsets)");
      grain_buf.assign(gbytes, 0);
      std::memcpy(grain_buf.data() + in, buf + done, n);
      s = e.file->write(Io{}, grain_buf.data(), gbytes, at);
      if (!s.ok()) return s;
      sp.file_end += gbytes;
      gte = static_cast<uint32_t>(at / 512);
      sp.gt_dirty[gdi] = true;
    }
    done += n;
  }
  return Status::Ok();
}

Status Vmdk::flush_locked() {
  if (read_only_) return Status::Ok();
  if (corrupt_.load()) return Status::Error(EIO, "vmdk: image corrupt, metadata not written");
  for (auto& e : extents_) {
    if (e.kind == Extent::Zero) continue;
    Status s = e.file->sync(Io{}, true);  // data first
    if (!s.ok()) return s;
    if (!e.sparse) continue;
    Sparse& sp = *e.sparse;
    if (sp.gt_dirty.empty() && !sp.gd_dirty) continue;
    for (auto& [gdi, dirty] : sp.gt_dirty) {
      auto& t = sp.gts[gdi];
      std::vector<uint8_t> raw(t.size() * 4);
      for (size_t i = 0; i < t.size(); ++i) put_le32(&raw[i * 4], t[i]);
      for (auto* dir : {&sp.gd, &sp.rgd}) {
        if (dir->empty() || !(*dir)[gdi]) continue;
        s = e.file->write(Io{}, raw.data(), raw.size(), uint64_t{(*dir)[gdi]} * 512);
        if (!s.ok()) return s;
      }
    }
    if (sp.gd_dirty) {
      s = e.file->sync(Io{}, true);  // tables before the directory points at them
      if (!s.ok()) return s;
      for (auto [dir, at] : {std::make_pair(&sp.gd, sp.gd_off), std::make_pair(&sp.rgd, sp.rgd_off)}) {
        if (dir->empty()) continue;
        std::vector<uint8_t> raw(dir->size() * 4);
        for (size_t i = 0; i < dir->size(); ++i) put_le32(&raw[i * 4], (*dir)[i]);
        s = e.file->write(Io{}, raw.data(), raw.size(), at);
        if (!s.ok()) return s;
      }
    }
    s = e.file->sync(Io{}, true);
    if (!s.ok()) return s;
    sp.gt_dirty.clear();
    sp.gd_dirty = false;
  }
  return Status::Ok();
}

Status Vmdk::flush() {
  std::shared_lock<std::shared_mutex> layout(layout_mu_);
  std::lock_guard<std::mutex> g(mu_);
  return flush_locked();
}

// Calls fn(extent, offset in the buffer, length, offset in the extent) for each extent piece of
// [off, off + len) in guest order; stops at the first error. Returns the bytes covered.
template <typename Fn>
Status Vmdk::each_piece(uint64_t off, size_t len, size_t* done, Fn fn) {
  *done = 0;
  for (auto& e : extents_) {
    if (*done == len) break;
    uint64_t pos = off + *done;
    if (pos >= e.start + e.length || pos < e.start) continue;
    size_t n = static_cast<size_t>(std::min<uint64_t>(len - *done, e.start + e.length - pos));
    Status s = fn(e, *done, n, pos - e.start);
    if (!s.ok()) return s;
    *done += n;
  }
  return Status::Ok();
}

Status Vmdk::read(const Io&, void* buf, size_t len, uint64_t off, size_t* got) {
  std::shared_lock<std::shared_mutex> layout(layout_mu_);
  *got = 0;
  if (off >= size_) return Status::Ok();
  len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  char* out = static_cast<char*>(buf);
  size_t done = 0;
  Status s = each_piece(off, len, &done, [&](Extent& e, size_t at, size_t n, uint64_t ext_off) {
    return read_extent(e, out + at, n, ext_off);
  });
  if (s.ok()) *got = done;
  return s;
}

Status Vmdk::write(const Io&, const void* buf, size_t len, uint64_t off) {
  std::shared_lock<std::shared_mutex> layout(layout_mu_);
  if (read_only_) return Status::Error(EROFS, "vmdk: image is read-only");
  if (off > size_ || len > size_ - off) return Status::Error(ENOSPC, "vmdk: write past the virtual disk's end");
  const char* in = static_cast<const char*>(buf);
  size_t done = 0;
  return each_piece(off, len, &done, [&](Extent& e, size_t at, size_t n, uint64_t ext_off) {
    return write_extent(e, in + at, n, ext_off);
  });
}

Status Vmdk::sync(const Io&, bool) { return flush(); }

Status Vmdk::fallocate(const Io& io, int mode, uint64_t off, uint64_t len) {
  if (mode & ~0x1) {
    // Punch/zero: write zeros (sparse extents keep their grains; correct, if not compact).
    if (read_only_) return Status::Error(EROFS, "vmdk: image is read-only");
    uint64_t end = 0;
    (void)size(&end);
    if (off >= end) return Status::Ok();
    len = std::min<uint64_t>(len, end - off);
    std::vector<char> zeros(std::min<uint64_t>(len, 1 << 20), 0);
    for (uint64_t p = off; p < off + len;) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(zeros.size(), off + len - p));
      Status s = write(io, zeros.data(), n, p);
      if (!s.ok()) return s;
      p += n;
    }
    return Status::Ok();
  }
  return Status::Ok();
}

// --- Growth (see the header comment for the order of the steps) ---

namespace {

constexpr uint64_t kTwoGbExtent = 2ull << 30;  // qemu-img's extent size for the twoGbMaxExtent kinds
constexpr uint32_t kFlagNlDetect = 1u << 0;

void put_le64(uint8_t* p, uint64_t v) {
  put_le32(p, static_cast<uint32_t>(v));
  put_le32(p + 4, static_cast<uint32_t>(v >> 32));
}

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

std::string basename_of(const std::string& p) {
  size_t s = p.rfind('/');
  return s == std::string::npos ? p : p.substr(s + 1);
}

Status errno_status(int e, const char* what) { return Status::Error(e ? e : EIO, what); }

}  // namespace

Status Vmdk::resize(const Io&, uint64_t size) {
  std::unique_lock<std::shared_mutex> layout(layout_mu_);
  std::lock_guard<std::mutex> g(mu_);
  if (size == size_) return Status::Ok();
  if (read_only_) return Status::Error(EROFS, "vmdk: image is read-only");
  if (corrupt_.load()) return Status::Error(EIO, "vmdk: image corrupt, writes refused");
  if (size < size_) return Status::Error(EOPNOTSUPP, "vmdk: shrinking a VMDK virtual disk is not supported");
  if (size % 512) return Status::Error(EINVAL, "vmdk: the virtual size must be a multiple of 512");
  if (size > kMaxSize) return Status::Error(EFBIG, "vmdk: virtual size too large");
  Extent& last = extents_.back();
  if (!last.writable || (last.kind != Extent::Flat && last.kind != Extent::Sparse_))
    return Status::Error(EOPNOTSUPP, "vmdk: the last extent is not writable, so the disk cannot grow");
  // Everything written so far reaches the file first: the metadata that moves is then current.
  Status s = flush_locked();
  if (!s.ok()) return s;

  const bool embedded = last.file == file_;
  const bool split = create_type_.rfind("twoGbMaxExtent", 0) == 0;
  const uint64_t cap = split ? kTwoGbExtent : kMaxSize;
  uint64_t need = size - size_;
  const uint64_t last_new = last.length + std::min(need, cap > last.length ? cap - last.length : 0);
  need -= last_new - last.length;
  if (need && !split) return Status::Error(EFBIG, "vmdk: virtual size too large for its extent");
  if (extents_.size() + (need + cap - 1) / cap > static_cast<uint64_t>(kMaxExtents))
    return Status::Error(EFBIG, "vmdk: virtual size needs too many extents");

  if (embedded) {  // monolithicSparse: one file, the descriptor inside it
    const uint64_t old_len = last.length;
    last.length = last_new;  // for render_descriptor (restored on failure)
    std::string text = render_descriptor(last_new);
    last.length = old_len;
    s = grow_sparse(last, last_new, desc_area_ ? &text : nullptr);  // a file may have no descriptor
    if (!s.ok()) return s;
    size_ = last.length;
    return Status::Ok();
  }

  // A descriptor file: grow the last extent, make the new ones, then the new descriptor.
  const uint64_t old_last = last.length;
  if (last.kind == Extent::Flat) {
    uint64_t fsize = 0;
    s = last.file->size(&fsize);
    if (!s.ok()) return s;
    if (fsize < last.file_off + last_new) {
      s = last.file->resize(Io{}, last.file_off + last_new);
      if (!s.ok()) return s;
    }
    s = last.file->sync(Io{}, false);
    if (!s.ok()) return s;
    last.length = last_new;
  } else if (last_new > last.length) {
    s = grow_sparse(last, last_new, nullptr);  // its header is the commit for this extent
    if (!s.ok()) return s;
  }
  const size_t old_count = extents_.size();
  const Extent::Kind kind = last.kind;
  uint64_t pos = last.start + last.length;
  while (need) {
    Extent e;
    const uint64_t bytes = std::min(need, cap);
    s = add_extent(kind, bytes, &e);
    if (!s.ok()) break;
    e.start = pos;
    pos += bytes;
    need -= bytes;
    extents_.push_back(std::move(e));
  }
  if (s.ok()) s = rewrite_descriptor_file(render_descriptor(pos));
  if (!s.ok()) {
    // Not committed: the descriptor still lists the old extents (the new files stay, unused).
    extents_.resize(old_count);
    if (extents_.back().kind == Extent::Flat) extents_.back().length = old_last;
    size_ = extents_.back().start + extents_.back().length;
    return s;
  }
  size_ = pos;
  return Status::Ok();
}

std::string Vmdk::render_descriptor(uint64_t new_size) const {
  std::vector<std::string> lines = desc_lines_;
  int last_line = -1;
  for (const Extent& e : extents_) {
    if (e.desc_line < 0 || e.desc_line >= static_cast<int>(lines.size())) continue;
    // "ACCESS SECTORS TYPE ..." with SECTORS replaced.
    std::string& l = lines[e.desc_line];
    size_t a = l.find_first_not_of(" \t");
    size_t b = l.find_first_of(" \t", a);
    size_t c = l.find_first_not_of(" \t", b);
    size_t d = l.find_first_of(" \t", c);
    if (a == std::string::npos || d == std::string::npos) continue;
    l = l.substr(0, c) + std::to_string(e.length / 512) + l.substr(d);
    last_line = std::max(last_line, e.desc_line);
  }
  std::vector<std::string> added;
  for (const Extent& e : extents_)
    if (e.desc_line < 0)
      added.push_back("RW " + std::to_string(e.length / 512) +
                      (e.kind == Extent::Flat ? " FLAT \"" + e.name + "\" 0" : " SPARSE \"" + e.name + "\""));
  lines.insert(lines.begin() + (last_line + 1), added.begin(), added.end());
  uint64_t heads = 16;
  for (auto& l : lines)
    if (l.rfind("ddb.geometry.heads", 0) == 0) {
      size_t q = l.find('"');
      if (q != std::string::npos) heads = std::max<uint64_t>(1, std::strtoull(l.c_str() + q + 1, nullptr, 10));
    }
  for (auto& l : lines)
    if (l.rfind("ddb.geometry.cylinders", 0) == 0)
      l = "ddb.geometry.cylinders = \"" + std::to_string(new_size / (heads * 63 * 512)) + "\"";
  std::string out;
  for (auto& l : lines) out += l + (desc_crlf_ ? "\r\n" : "\n");
  return out;
}

Status Vmdk::grow_sparse(Extent& e, uint64_t new_bytes, const std::string* embedded_desc) {
  Sparse& sp = *e.sparse;
  const uint64_t cap = new_bytes / 512;
  const uint64_t grains = (cap + sp.grain_sectors - 1) / sp.grain_sectors;
  const uint64_t entries = (grains + sp.gtes - 1) / sp.gtes;
  const uint64_t old_entries = sp.gd.size();
  if (entries > kMaxGdEntries) return Status::Error(EFBIG, "vmdk: grain directory would be too large");
  if (embedded_desc && embedded_desc->size() + 1 > desc_area_)
    return Status::Error(ENOSPC, "vmdk: the new descriptor does not fit in the space reserved for it");
  const uint64_t gt_bytes = round_up(uint64_t{sp.gtes} * 4, 512);
  std::vector<std::vector<uint32_t>*> dirs{&sp.gd};
  if (!sp.rgd.empty()) dirs.push_back(&sp.rgd);
  uint64_t end = sp.file_end;
  // 1. Grain tables for the new entries (zeros), unreferenced until the directories are written.
  std::vector<std::vector<uint32_t>> dir_new;
  for (auto* dir : dirs) {
    std::vector<uint32_t> d = *dir;
    for (uint64_t i = old_entries; i < entries; ++i) {
      d.push_back(static_cast<uint32_t>(end / 512));
      end += gt_bytes;
    }
    dir_new.push_back(std::move(d));
  }
  // 2. The directories: in place if the new entries fit in the last sector, else moved to the end.
  std::vector<uint64_t> dir_off{sp.gd_off, sp.rgd_off};
  bool moved = false;
  for (size_t k = 0; k < dirs.size(); ++k)
    if (round_up(dir_off[k] + old_entries * 4, 512) < dir_off[k] + entries * 4) moved = true;
  if (moved)
    for (size_t k = 0; k < dirs.size(); ++k) {
      dir_off[k] = end;
      end += round_up(entries * 4, 512);
    }
  if (end / 512 > 0xffffffffull) return Status::Error(EFBIG, "vmdk: extent file full (32-bit sector offsets)");
  Layer& f = *e.file;
  uint64_t fsize = 0;
  Status s = f.size(&fsize);
  if (!s.ok()) return s;
  if (end > fsize) {  // the new tables are zeros: extending the file makes them
    s = f.resize(Io{}, end);
    if (!s.ok()) return s;
  }
  for (size_t k = 0; k < dirs.size(); ++k) {
    const uint64_t from = moved ? 0 : old_entries;
    std::vector<uint8_t> raw((entries - from) * 4);
    for (uint64_t i = from; i < entries; ++i) put_le32(&raw[(i - from) * 4], dir_new[k][i]);
    s = raw.empty() ? Status::Ok() : f.write(Io{}, raw.data(), raw.size(), dir_off[k] + from * 4);
    if (!s.ok()) return s;
  }
  s = f.sync(Io{}, true);
  if (!s.ok()) return s;
  // 3. The embedded descriptor, then the header: capacity and directory offsets in one sector.
  if (embedded_desc) {
    std::vector<char> area(desc_area_, 0);  // the text, zeros after it
    std::memcpy(area.data(), embedded_desc->data(), embedded_desc->size());
    s = f.write(Io{}, area.data(), area.size(), desc_at_);
    if (!s.ok()) return s;
    s = f.sync(Io{}, true);
    if (!s.ok()) return s;
  }
  uint8_t h[512];
  s = read_zero_padded(f, h, 512, 0);
  if (!s.ok()) return s;
  if (le32(h) != kMagic || le64(h + 56) != sp.gd_off / 512)
    return mark_corrupt("vmdk: the sparse header changed under the daemon (image corrupt)");
  put_le64(h + 12, cap);
  put_le64(h + 56, dir_off[0] / 512);
  if (dirs.size() > 1) put_le64(h + 48, dir_off[1] / 512);
  s = f.write(Io{}, h, 512, 0);
  if (!s.ok()) return s;
  s = f.sync(Io{}, true);
  if (!s.ok()) return s;
  // Committed: the memory follows.
  for (uint64_t i = old_entries; i < entries; ++i)
    for (size_t k = 0; k < dirs.size(); ++k) sp.meta.emplace_back(uint64_t{dir_new[k][i]} * 512, gt_bytes);
  for (size_t k = 0; k < dirs.size(); ++k) {
    *dirs[k] = std::move(dir_new[k]);
    sp.meta.emplace_back(dir_off[k], entries * 4);
  }
  sp.gd_off = dir_off[0];
  if (dirs.size() > 1) sp.rgd_off = dir_off[1];
  std::sort(sp.meta.begin(), sp.meta.end());
  sp.file_end = end;
  e.length = new_bytes;
  return Status::Ok();
}

Status Vmdk::add_extent(Extent::Kind kind, uint64_t bytes, Extent* out) {
  // A name as qemu-img gives them (NAME-f001.vmdk, NAME-s001.vmdk), the first one free.
  const std::string dir = dirname_of(opt_.path);
  std::string stem = basename_of(opt_.path);
  if (stem.size() > 5 && stem.compare(stem.size() - 5, 5, ".vmdk") == 0) stem.resize(stem.size() - 5);
  int fd = -1;
  std::string name;
  for (size_t i = extents_.size() + 1; fd < 0 && i < extents_.size() + 1000; ++i) {
    char num[24];
    std::snprintf(num, sizeof num, "%03zu", i);
    name = stem + (kind == Extent::Flat ? "-f" : "-s") + num + ".vmdk";
    fd = ::open((dir + "/" + name).c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EEXIST) return errno_status(errno, "vmdk: cannot create a new extent file");
  }
  if (fd < 0) return Status::Error(EEXIST, "vmdk: no free name for a new extent file");
  auto file = std::make_unique<FdFile>(fd);
  Status s;
  if (kind == Extent::Flat) {
    s = file->resize(Io{}, bytes);
  } else {
    // Laid out as qemu-img lays one out: header, (empty) descriptor area, the redundant
    // directory and its tables, the directory and its tables, grains from a grain boundary.
    const Sparse& like = *extents_.back().sparse;
    const uint64_t cap = bytes / 512;
    const uint64_t entries = ((cap + like.grain_sectors - 1) / like.grain_sectors + like.gtes - 1) / like.gtes;
    const uint64_t gd_sectors = round_up(entries * 4, 512) / 512;
    const uint64_t gt_sectors = round_up(uint64_t{like.gtes} * 4, 512) / 512;
    const uint64_t rgd = 21, gd = rgd + gd_sectors + entries * gt_sectors;
    const uint64_t grain_off = round_up(gd + gd_sectors + entries * gt_sectors, like.grain_sectors);
    uint8_t h[512] = {};
    put_le32(h, kMagic);
    put_le32(h + 4, 1);
    put_le32(h + 8, kFlagNlDetect | kFlagRgd | (like.zero_grains ? kFlagZeroGrain : 0));
    put_le64(h + 12, cap);
    put_le64(h + 20, like.grain_sectors);
    put_le64(h + 28, 1);
    put_le64(h + 36, 20);
    put_le32(h + 44, like.gtes);
    put_le64(h + 48, rgd);
    put_le64(h + 56, gd);
    put_le64(h + 64, grain_off);
    h[73] = '\n';
    h[74] = ' ';
    h[75] = '\r';
    h[76] = '\n';
    s = file->resize(Io{}, grain_off * 512);
    for (uint64_t base : {rgd, gd}) {
      if (!s.ok()) break;
      std::vector<uint8_t> raw(entries * 4);
      for (uint64_t i = 0; i < entries; ++i) put_le32(&raw[i * 4], static_cast<uint32_t>(base + gd_sectors + i * gt_sectors));
      s = file->write(Io{}, raw.data(), raw.size(), base * 512);
    }
    if (s.ok()) s = file->write(Io{}, h, 512, 0);
  }
  if (s.ok()) s = file->sync(Io{}, true);
  if (!s.ok()) {
    ::unlink((dir + "/" + name).c_str());
    return s;
  }
  out->kind = kind;
  out->length = bytes;
  out->name = name;
  out->file = file.get();
  out->owned = std::move(file);
  if (kind == Extent::Sparse_) {
    std::string ignored, err;
    s = open_sparse(out, &ignored, &err);  // reads back what was written: the same checks as any
    if (!s.ok()) return Status::Error(EIO, "vmdk: a new sparse extent does not read back");
    out->length = bytes;
  }
  return Status::Ok();
}

Status Vmdk::rewrite_descriptor_file(const std::string& text) {
  // In place, in one write, through the daemon's own descriptor of the file: a new file renamed
  // over it would leave the daemon's inode (and so the view's writes) on the unlinked old file.
  // NULs pad a shorter text to the old length (QEMU reads the descriptor as a C string, and so
  // does open()). A descriptor under 4 KiB is one page, which file systems write whole.
  uint64_t old = 0;
  Status s = file_->size(&old);
  if (!s.ok()) return s;
  std::string buf = text;
  if (buf.size() < old) buf.resize(old, '\0');
  s = file_->write(Io{}, buf.data(), buf.size(), 0);
  if (!s.ok()) return s;
  s = file_->sync(Io{}, true);
  if (!s.ok()) return s;
  // The new lines are the descriptor now.
  std::istringstream in(text);
  std::string line;
  desc_lines_.clear();
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    desc_lines_.push_back(line);
  }
  int k = 0;
  for (size_t i = 0; i < desc_lines_.size() && k < static_cast<int>(extents_.size()); ++i) {
    std::istringstream ls(desc_lines_[i]);
    std::string access;
    uint64_t sectors = 0;
    std::string type;
    if ((ls >> access >> sectors >> type) && (access == "RW" || access == "RDONLY" || access == "NOACCESS"))
      extents_[k++].desc_line = static_cast<int>(i);
  }
  return Status::Ok();
}

Status Vmdk::seek(const Io&, uint64_t off, int whence, uint64_t* result) {
  std::shared_lock<std::shared_mutex> layout(layout_mu_);
  if (off >= size_) return Status::Error(ENXIO, "vmdk: seek past the end");
  const bool want_data = whence == SEEK_DATA;
  std::lock_guard<std::mutex> g(mu_);
  uint64_t pos = off;
  for (auto& e : extents_) {
    const uint64_t end = e.start + e.length;
    if (pos >= end) continue;
    pos = std::max(pos, e.start);
    while (pos < end) {
      bool data = true;  // flat extents: all data (their files may be sparse, but say so is enough)
      uint64_t unit_end = end;
      if (e.kind == Extent::Zero) {
        data = false;
      } else if (e.kind == Extent::Sparse_) {
        // Sparse: a grain is data unless unallocated or a zeroed grain; a GD entry of 0 is a
        // whole grain table's range of holes.
        Sparse& sp = *e.sparse;
        const uint64_t gbytes = sp.grain_sectors * 512;
        const uint64_t grain = (pos - e.start) / gbytes;
        const uint64_t gdi = grain / sp.gtes;
        if (gdi < sp.gd.size() && !sp.gd[gdi]) {
          data = false;
          unit_end = e.start + (gdi + 1) * sp.gtes * gbytes;
        } else if (gdi < sp.gd.size()) {
          std::vector<uint32_t>* gt = nullptr;
          Status s = load_gt(e, gdi, &gt);
          if (!s.ok()) return s;
          const uint32_t gte = (*gt)[grain % sp.gtes];
          data = !(gte == 0 || (gte == 1 && sp.zero_grains));
          unit_end = e.start + (grain + 1) * gbytes;
        }
        unit_end = std::min(unit_end, end);
      }
      if (data == want_data) {
        *result = pos;
        return Status::Ok();
      }
      pos = unit_end;
    }
  }
  if (want_data) return Status::Error(ENXIO, "vmdk: no data after offset");
  *result = size_;
  return Status::Ok();
}

Status Vmdk::size(uint64_t* out) {
  std::shared_lock<std::shared_mutex> layout(layout_mu_);
  *out = size_;
  return Status::Ok();
}

}  // namespace iofilterfs::format
