#include "cache/store.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>


namespace iofilterfs::cache {
namespace {

const Status kCipher = Status::Error(EIO, "cache: OpenSSL failed on a cache block");

// A per-thread buffer for encrypting cache pages (never the buffers the filters below use).
uint8_t* crypt_buffer(size_t len) {
  struct Buf {
    uint8_t* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf b;
  if (b.n < len) {
    std::free(b.p);
    b.p = static_cast<uint8_t*>(std::aligned_alloc(4096, (len + 4095) & ~size_t(4095)));
    b.n = b.p ? len : 0;
  }
  return b.p;
}

Status pread_all(int fd, void* buf, size_t len, uint64_t off) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::FromErrno("cache: the cache device failed a read");
    if (n == 0) {  // past the end of a sparse file: zeros
      std::memset(p, 0, len);
      return Status::Ok();
    }
    p += n;
    len -= static_cast<size_t>(n);
    off += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status pwrite_all(int fd, const void* buf, size_t len, uint64_t off) {
  auto* p = static_cast<const uint8_t*>(buf);
  while (len > 0) {
    ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::FromErrno("cache: the cache device failed a write");
    p += n;
    len -= static_cast<size_t>(n);
    off += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

std::string boot_id() {
  char b[64] = {};
  int fd = ::open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "";
  ssize_t n = ::read(fd, b, sizeof b - 1);
  ::close(fd);
  std::string s(b, n > 0 ? static_cast<size_t>(n) : 0);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s.substr(0, 40);
}

std::string errtext(int e) { return std::strerror(e); }

}  // namespace

// ---- MemStore -----------------------------------------------------------------------------

std::unique_ptr<MemStore> MemStore::create(uint32_t slots, uint32_t block, std::string* err) {
  const size_t bytes = size_t(slots) * block;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    *err = "cannot reserve " + std::to_string(bytes) + " bytes of memory: " + errtext(errno);
    return nullptr;
  }
  std::unique_ptr<MemStore> m(new MemStore());
  m->base_ = static_cast<uint8_t*>(p);
  m->bytes_ = bytes;
  m->block_ = block;
  return m;
}

MemStore::~MemStore() {
  if (base_) ::munmap(base_, bytes_);
}

Status MemStore::read(uint32_t slot, uint64_t, uint32_t off, void* buf, size_t len) {
  std::memcpy(buf, base_ + size_t(slot) * block_ + off, len);
  return Status::Ok();
}

Status MemStore::write(uint32_t slot, uint64_t, uint32_t off, const void* buf, size_t len) {
  std::memcpy(base_ + size_t(slot) * block_ + off, buf, len);
  return Status::Ok();
}

// ---- FileStore ----------------------------------------------------------------------------

FileStore::~FileStore() {
  if (fd_ >= 0) ::close(fd_);
}

std::array<uint8_t, 32> FileStore::key_check(const AtRest* key) {
  std::array<uint8_t, 32> out{};
  if (!key) return out;
  alignas(16) uint8_t zero[512] = {}, enc[512];
  // The last sector no disk reaches: the check value says nothing of any data block.
  if (!key->seal(UINT64_MAX / 512 * 512 - 512, zero, enc, 512).ok()) return out;
  std::memcpy(out.data(), enc, 32);
  return out;
}

Status FileStore::reformat(uint32_t slots, uint32_t block, std::string* err) {
  Header h;
  h.block_size = block;
  h.slots = slots;
  h.data_offset = Header::data_offset_for(slots);
  h.encrypted = key_ != nullptr;
  h.key_check = key_check(key_.get());
  h.image = image_;
  h.boot_id = boot_id();
  std::vector<uint8_t> hdr(kHeaderSize);
  encode_header(h, hdr.data());
  // Empty first (every old record and block goes), then the table's space is reserved so that
  // record writes never meet a full file system; the data area stays sparse.
  if (::ftruncate(fd_, 0) != 0 || ::ftruncate(fd_, static_cast<off_t>(h.file_size())) != 0) {
    *err = path_ + ": cannot size the cache file: " + errtext(errno);
    return Status::Error(errno ? errno : EIO);
  }
  if (::fallocate(fd_, FALLOC_FL_KEEP_SIZE, 0, static_cast<off_t>(h.data_offset)) != 0 && errno != EOPNOTSUPP) {
    *err = path_ + ": cannot allocate the cache file's record table: " + errtext(errno);
    return Status::Error(errno);
  }
  Status s = pwrite_all(fd_, hdr.data(), hdr.size(), 0);
  if (s.ok() && ::fdatasync(fd_) != 0) s = Status::FromErrno("cache: fdatasync of the cache file failed");
  if (!s.ok()) {
    *err = path_ + ": cannot write the cache file's header: " + errtext(s.err);
    return s;
  }
  h_ = h;
  return Status::Ok();
}

Status FileStore::open(const std::string& dir, const std::string& image, uint32_t slots, uint32_t block,
                       std::shared_ptr<const AtRest> key, std::unique_ptr<FileStore>* out, Replay* replay,
                       std::string* err) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    *err = "cache device directory " + dir + ": " + errtext(errno);
    return Status::Error(errno);
  }
  if (!S_ISDIR(st.st_mode)) {
    *err = "cache device " + dir + " is not a directory";
    return Status::Error(ENOTDIR);
  }
  std::unique_ptr<FileStore> f(new FileStore());
  f->path_ = dir + "/" + cache_file_name(image);
  f->image_ = image;
  f->key_ = std::move(key);
  f->fd_ = ::open(f->path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (f->fd_ < 0) {
    *err = f->path_ + ": " + errtext(errno);
    return Status::Error(errno);
  }
  *replay = Replay{};
  const uint64_t fsize = ::fstat(f->fd_, &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  std::vector<uint8_t> hdr(kHeaderSize, 0);
  bool blank = fsize < kHeaderSize;
  if (!blank) {
    Status s = pread_all(f->fd_, hdr.data(), kHeaderSize, 0);
    if (!s.ok()) {
      *err = f->path_ + ": the header cannot be read (" + errtext(s.err) +
             "); it may describe dirty data: refusing to open (iofilterctl cache discard --force drops it)";
      replay->refuse = true;
      return s;
    }
    blank = std::all_of(hdr.begin(), hdr.end(), [](uint8_t b) { return b == 0; });  // a creation cut short
  }
  if (blank) {
    Status s = f->reformat(slots, block, err);
    if (!s.ok()) return s;
    replay->created = true;
    *out = std::move(f);
    return Status::Ok();
  }
  Header h;
  std::string why = decode_header(hdr.data(), &h);
  if (!why.empty()) {
    *err = f->path_ + ": " + why + "; it may describe dirty data: refusing to open (iofilterctl cache discard "
                                   "--force drops it)";
    replay->refuse = true;
    return Status::Error(EIO);
  }
  if (h.image != image) {
    *err = f->path_ + " is the cache file of '" + h.image + "', not of '" + image + "'";
    replay->refuse = true;
    return Status::Error(EEXIST);
  }
  f->h_ = h;
  // The record table, slot by slot.
  std::vector<uint8_t> table(size_t(h.slots) * kRecordSize);
  Status s = pread_all(f->fd_, table.data(), table.size(), h.table_offset);
  if (!s.ok()) {
    *err = f->path_ + ": the record table cannot be read (" + errtext(s.err) +
           "): refusing to open (iofilterctl cache discard --force drops the cache)";
    replay->refuse = true;
    return s;
  }
  std::map<uint64_t, Record> best;  // block -> the record with the highest seq
  std::vector<uint32_t> losers;
  bool any_dirty = false;
  for (uint32_t i = 0; i < h.slots; ++i) {
    Record r;
    switch (decode_record(table.data() + size_t(i) * kRecordSize, &r)) {
      case RecordState::Empty: continue;
      case RecordState::Corrupt:
        *err = f->path_ + ": the record of cache slot " + std::to_string(i) +
               " is damaged and may describe dirty data: refusing to open rather than serve stale data "
               "(iofilterctl cache discard --force drops the cache)";
        replay->refuse = true;
        return Status::Error(EIO);
      case RecordState::Ok: break;
    }
    const uint32_t pages = h.block_size / kPage;
    r.valid.clear_range(pages, kMaxPagesPerBlock);  // bits past the block mean nothing
    r.dirty.clear_range(pages, kMaxPagesPerBlock);
    if (r.slot != i || r.block > (1ull << 56) / h.block_size) {
      *err = f->path_ + ": the record table is damaged (slot " + std::to_string(i) +
             "): refusing to open (iofilterctl cache discard --force drops the cache)";
      replay->refuse = true;
      return Status::Error(EIO);
    }
    replay->max_seq = std::max(replay->max_seq, r.seq);
    auto it = best.find(r.block);
    if (it == best.end()) {
      best.emplace(r.block, r);
    } else if (it->second.seq < r.seq) {
      losers.push_back(it->second.slot);
      it->second = r;
    } else {
      losers.push_back(r.slot);
    }
  }
  for (auto& [b, r] : best) any_dirty |= r.dirty.any();

  const bool same_key = h.encrypted == (f->key_ != nullptr) && (!h.encrypted || h.key_check == key_check(f->key_.get()));
  const bool same_geometry = h.block_size == block && h.slots == slots;
  if (!same_key && any_dirty) {
    if (h.encrypted) {
      // Encrypted dirty data that this open cannot decrypt (no key, or another one).
      *err = f->path_ + " holds dirty data encrypted with " +
             (f->key_ ? std::string("another key than this image's") : std::string("a key, but the policy no longer encrypts")) +
             ": refusing to open (restore the policy, or iofilterctl cache discard --force)";
      replay->refuse = true;
      return Status::Error(EACCES);
    }
  }
  if (!any_dirty && (!same_key || !same_geometry)) {
    s = f->reformat(slots, block, err);
    if (!s.ok()) return s;
    replay->created = true;
    *out = std::move(f);
    return Status::Ok();
  }
  if (!same_key || !same_geometry) {
    // Plaintext dirty data under a policy that now encrypts, or another geometry: read back
    // with the file's own geometry and key (none), destaged by the caller, then reformatted.
    if (!same_key) f->key_.reset();
    replay->incompatible = true;
  }
  const bool rebooted = h.boot_id != boot_id();
  std::vector<uint8_t> zero(kRecordSize, 0);
  std::vector<uint8_t> page(kPage);
  for (auto& [b, r] : best) {
    if (!r.dirty.any() && (rebooted || replay->incompatible)) {
      // Clean blocks written since the last flush may not have reached the device before a
      // power cut while their records did: after a reboot only dirty (flushed) ones count.
      losers.push_back(r.slot);
      ++replay->dropped_clean;
      continue;
    }
    // Every dirty page must be readable now, or the open is refused (bcache's rule).
    for (uint32_t p = 0; p < h.block_size / kPage; ++p) {
      if (!r.dirty.test(p)) continue;
      s = f->read(r.slot, r.block, p * kPage, page.data(), kPage);
      if (!s.ok()) {
        *err = f->path_ + ": dirty data of block " + std::to_string(r.block) + " cannot be read (" + errtext(s.err) +
               "): refusing to open rather than serve stale data (iofilterctl cache discard --force drops it)";
        replay->refuse = true;
        return Status::Error(EIO);
      }
    }
    replay->live.push_back(r);
  }
  for (uint32_t slot : losers) {
    s = pwrite_all(f->fd_, zero.data(), kRecordSize, h.table_offset + uint64_t(slot) * kRecordSize);
    if (!s.ok()) {
      *err = f->path_ + ": cannot clear a stale record: " + errtext(s.err);
      replay->refuse = !replay->live.empty();
      return s;
    }
  }
  if (!replay->incompatible && (rebooted || !losers.empty())) {
    f->h_.boot_id = boot_id();
    encode_header(f->h_, hdr.data());
    s = pwrite_all(f->fd_, hdr.data(), kHeaderSize, 0);
    if (s.ok() && ::fdatasync(f->fd_) != 0) s = Status::FromErrno("cache: fdatasync failed");
    if (!s.ok()) {
      *err = f->path_ + ": cannot update the header: " + errtext(s.err);
      replay->refuse = !replay->live.empty();
      return s;
    }
  }
  *out = std::move(f);
  return Status::Ok();
}

Status FileStore::read(uint32_t slot, uint64_t block, uint32_t off, void* buf, size_t len) {
  Status s = pread_all(fd_, buf, len, data_pos(slot, off));
  if (!s.ok()) return s;
  if (key_ && !key_->unseal(block * h_.block_size + off, buf, buf, len).ok()) return kCipher;
  return Status::Ok();
}

Status FileStore::write(uint32_t slot, uint64_t block, uint32_t off, const void* buf, size_t len) {
  const void* src = buf;
  if (key_) {
    uint8_t* out = crypt_buffer(len);
    if (!out) return Status::Error(ENOMEM, "cache: no buffer to encrypt a cache block");
    if (!key_->seal(block * h_.block_size + off, buf, out, len).ok()) return kCipher;
    src = out;
  }
  return pwrite_all(fd_, src, len, data_pos(slot, off));
}

Status FileStore::put_record(const Record& r) {
  uint8_t rec[kRecordSize];
  encode_record(r, rec);
  return pwrite_all(fd_, rec, kRecordSize, h_.table_offset + uint64_t(r.slot) * kRecordSize);
}

Status FileStore::sync() {
  if (::fdatasync(fd_) != 0) return Status::FromErrno("cache: fdatasync of the cache file failed");
  return Status::Ok();
}

Status FileStore::retire(std::string* how) {
  const std::string aside = path_ + ".failed";
  const std::string dir = path_.substr(0, path_.rfind('/'));
  auto sync_dir = [&] {
    int d = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d >= 0) {
      (void)::fsync(d);
      ::close(d);
    }
  };
  if (::rename(path_.c_str(), aside.c_str()) == 0 || errno == ENOENT) {
    sync_dir();
    *how = path_ + " set aside as " + aside;
    return Status::Ok();
  }
  const int rename_err = errno;
  if (::unlink(path_.c_str()) == 0 || errno == ENOENT) {
    sync_dir();
    *how = path_ + " removed (renaming it failed: " + errtext(rename_err) + ")";
    return Status::Ok();
  }
  // An empty file is a blank one to the next open (a new cache).
  if (::ftruncate(fd_, 0) == 0 && ::fsync(fd_) == 0) {
    *how = path_ + " emptied (renaming and removing it failed: " + errtext(rename_err) + ")";
    return Status::Ok();
  }
  return Status::FromErrno("cache: the cache file can be neither renamed, removed nor emptied");
}

std::string discard_cache_file(const std::string& dir, const std::string& image) {
  const std::string path = dir + "/" + cache_file_name(image);
  if (::rename(path.c_str(), (path + ".discarded").c_str()) != 0 && errno != ENOENT)
    return path + ": " + errtext(errno);
  return "";
}

}  // namespace iofilterfs::cache
