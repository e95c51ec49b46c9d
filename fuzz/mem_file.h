// A file in memory, for the fuzz harnesses: the input bytes are the image; writes may grow it
// up to a fixed cap (so a hostile image cannot make the harness allocate without bound).
#pragma once

#include <linux/falloc.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "filter.h"

namespace iofilterfs::fuzz {

class MemFile final : public Layer {
 public:
  static constexpr size_t kCap = 64u << 20;
  MemFile(const uint8_t* data, size_t size) : bytes_(data, data + size) {}

  Status read(const Io&, void* buf, size_t len, uint64_t off, size_t* got) override {
    *got = 0;
    if (off >= bytes_.size()) return Status::Ok();
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, bytes_.size() - off));
    std::memcpy(buf, bytes_.data() + off, n);
    *got = n;
    return Status::Ok();
  }
  Status write(const Io&, const void* buf, size_t len, uint64_t off) override {
    if (off > kCap || len > kCap - off) return Status::Error(ENOSPC, "memfile: cap");
    if (off + len > bytes_.size()) bytes_.resize(off + len);
    std::memcpy(bytes_.data() + off, buf, len);
    return Status::Ok();
  }
  Status sync(const Io&, bool) override { return Status::Ok(); }
  Status fallocate(const Io&, int mode, uint64_t off, uint64_t len) override {
    if ((mode & FALLOC_FL_PUNCH_HOLE) && off < bytes_.size())
      std::fill(bytes_.begin() + off, bytes_.begin() + std::min<uint64_t>(bytes_.size(), off + len), 0);
    return Status::Ok();
  }
  Status resize(const Io&, uint64_t size) override {
    if (size > kCap) return Status::Error(ENOSPC, "memfile: cap");
    bytes_.resize(size);
    return Status::Ok();
  }
  Status seek(const Io&, uint64_t off, int, uint64_t* r) override {
    *r = off;
    return Status::Ok();
  }
  Status size(uint64_t* out) override {
    *out = bytes_.size();
    return Status::Ok();
  }

 private:
  std::vector<uint8_t> bytes_;
};

// Reads, writes and flushes a decoded image at offsets drawn from the input's own bytes.
template <class Image>
void exercise(Image& img, const uint8_t* data, size_t size) {
  uint64_t vsize = 0;
  if (!img.size(&vsize).ok() || vsize == 0) return;
  std::vector<char> buf(256 * 1024);
  uint64_t seed = 1469598103934665603ull;
  for (size_t i = 0; i < std::min<size_t>(size, 64); ++i) seed = (seed ^ data[i]) * 1099511628211ull;
  auto next = [&] {
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return seed;
  };
  size_t got = 0;
  (void)img.read(Io{}, buf.data(), std::min<uint64_t>(buf.size(), vsize), 0, &got);
  for (int i = 0; i < 16; ++i) {
    uint64_t off = next() % vsize;
    size_t len = 1 + next() % buf.size();
    (void)img.read(Io{}, buf.data(), len, off, &got);
  }
  for (int i = 0; i < 8; ++i) {
    uint64_t off = next() % vsize;
    size_t len = static_cast<size_t>(std::min<uint64_t>(1 + next() % 70000, vsize - off));
    std::memset(buf.data(), static_cast<int>(i), len);
    (void)img.write(Io{}, buf.data(), len, off);
  }
  uint64_t r = 0;
  (void)img.seek(Io{}, next() % vsize, SEEK_DATA, &r);
  (void)img.fallocate(Io{}, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, next() % vsize, 1 + next() % (1 << 20));
  (void)img.sync(Io{}, false);
  (void)img.read(Io{}, buf.data(), std::min<uint64_t>(buf.size(), vsize), 0, &got);
  // Growth by up to 4 MiB (bounded: the new tables live in memory here), then a write at the
  // new end and a read across the old one.
  const uint64_t grown = vsize + (1 + next() % 8192) * 512;
  if (img.resize(Io{}, grown).ok()) {
    std::memset(buf.data(), 0x5a, 4096);
    (void)img.write(Io{}, buf.data(), 4096, grown - 4096);
    (void)img.read(Io{}, buf.data(), static_cast<size_t>(std::min<uint64_t>(buf.size(), grown - vsize + 512)),
                   vsize > 512 ? vsize - 512 : 0, &got);
    (void)img.sync(Io{}, false);
  }
}

}  // namespace iofilterfs::fuzz
