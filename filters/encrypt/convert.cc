#include "encrypt/convert.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include "encrypt/luks1.h"
#include "encrypt/xts.h"

namespace iofilterfs::encrypt {
namespace {

constexpr size_t kChunk = 1024 * 1024;
constexpr uint64_t kSector = XtsKey::kSector;

std::string sys(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

bool full_pwrite(int fd, const uint8_t* p, size_t n, uint64_t off) {
  while (n) {
    ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(off));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
    off += static_cast<uint64_t>(w);
  }
  return true;
}

// Reads up to n bytes; fewer only at the end of the file.
ssize_t full_pread(int fd, uint8_t* p, size_t n, uint64_t off) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd, p + got, n - got, static_cast<off_t>(off + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  return static_cast<ssize_t>(got);
}

bool all_zero(const uint8_t* p, size_t n) { return n == 0 || (p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0); }

}  // namespace

std::string encrypt_image(int src_fd, int dst_fd, const EncryptParams& p, const SecureBytes& pass, bool sparse,
                          ConvertStats* stats, const std::function<void(uint64_t, uint64_t)>& progress) {
  struct stat ss {}, ds {};
  if (::fstat(src_fd, &ss) != 0) return sys("source");
  if (::fstat(dst_fd, &ds) != 0) return sys("destination");
  if (!S_ISREG(ss.st_mode)) return "the source is not a regular file";
  if (!S_ISREG(ds.st_mode)) return "the destination is not a regular file";
  if (ds.st_size != 0) return "the destination is not empty";
  if (ss.st_dev == ds.st_dev && ss.st_ino == ds.st_ino) return "the source and the destination are the same file";
  const uint64_t size = static_cast<uint64_t>(ss.st_size);
  {
    uint8_t head[luks1::kPhdrSize];
    ssize_t n = full_pread(src_fd, head, sizeof head, 0);
    if (n < 0) return sys("source");
    if (luks1::has_magic(head, static_cast<size_t>(n))) return "the source is already a LUKS container";
  }

  luks1::FormatParams fp;
  fp.key_bytes = p.key_bits / 8;
  fp.hash = p.hash;
  fp.iter_time_us = p.iter_time_us;
  luks1::Header h;
  std::vector<uint8_t> area;
  SecureBytes master;
  std::string err = luks1::format(fp, pass, &h, &area, &master);
  if (!err.empty()) return "cannot create a LUKS header: " + err;
  std::shared_ptr<XtsKey> key = XtsKey::create(master);
  if (!key) return "OpenSSL refused the master key";
  if (!full_pwrite(dst_fd, area.data(), area.size(), 0)) return sys("destination");

  ConvertStats st;
  st.payload_offset = h.payload_bytes_offset();
  st.payload_bytes = (size + kSector - 1) / kSector * kSector;
  std::unique_ptr<uint8_t[]> in(new uint8_t[kChunk]), out(new uint8_t[kChunk]);
  for (uint64_t off = 0; off < size; off += kChunk) {
    ssize_t n = full_pread(src_fd, in.get(), kChunk, off);
    if (n < 0) return sys("source");
    if (n == 0) return "the source shrank while it was read";
    size_t len = static_cast<size_t>(n);
    const size_t padded = (len + kSector - 1) / kSector * kSector;
    std::memset(in.get() + len, 0, padded - len);
    if (sparse && all_zero(in.get(), padded)) {
      st.skipped_bytes += padded;
    } else {
      if (!key->encrypt(in.get(), out.get(), padded / kSector, off / kSector)) return "OpenSSL failed";
      if (!full_pwrite(dst_fd, out.get(), padded, st.payload_offset + off)) return sys("destination");
      st.encrypted_bytes += padded;
    }
    if (progress) progress(std::min<uint64_t>(off + len, size), size);
  }
  key->revoke();
  if (::ftruncate(dst_fd, static_cast<off_t>(st.payload_offset + st.payload_bytes)) != 0) return sys("destination");
  if (::fsync(dst_fd) != 0) return sys("destination");
  if (stats) *stats = st;
  return {};
}

}  // namespace iofilterfs::encrypt
