// Backing: the bottom layer of every disk's stack — the image file in the backing directory.
//
// It owns two descriptors of the same file: `fd_`, buffered, always open; and `dfd_`, opened
// with O_DIRECT the first time a handle asks for direct I/O (QEMU's cache=none). A direct
// request whose offset and length meet the file's direct-I/O alignment goes to dfd_ through an
// aligned buffer (the caller's, or a per-thread bounce copy when FUSE hands us an unaligned
// one); every other request uses fd_. Linux keeps the two coherent: a direct write invalidates
// cached pages and a direct read first writes back dirty ones.
//
// The image lock: fd_ carries an OFD lock over the whole file — shared while only readers have
// the disk open, exclusive once a writer does. OFD locks are what QEMU checks (it locks bytes
// 100.. and 200.. of the file), so neither QEMU nor a second iofilterfs can open the image for
// writing while we hold it.
//
// Threads: read/write/sync/... are called concurrently; they only use the immutable
// descriptors and alignment values. enable_direct() and lock() run under the disk's lock.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "filter.h"

namespace iofilterfs {

class Backing final : public Layer {
 public:
  enum class LockMode { None, Shared, Exclusive };

  ~Backing() override;

  // Opens the file that `path_fd` (an O_PATH descriptor) names, read-write unless read_only.
  static Status open(int path_fd, bool read_only, std::unique_ptr<Backing>* out);

  // Takes or upgrades the image lock. EBUSY when another process holds a conflicting lock.
  Status lock(LockMode mode);
  LockMode lock_mode() const { return lock_; }

  // Opens the O_DIRECT descriptor (idempotent). If the backing filesystem refuses O_DIRECT,
  // direct requests stay buffered and *fell_back is set.
  Status enable_direct(bool* fell_back);

  int fd() const { return fd_; }
  uint32_t direct_offset_align() const { return dio_off_align_; }

  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override;
  Status sync(const Io& io, bool datasync) override;
  Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len) override;
  Status resize(const Io& io, uint64_t size) override;
  Status seek(const Io& io, uint64_t off, int whence, uint64_t* result) override;
  Status size(uint64_t* out) override;
  // The image file itself, at the same offsets (the buffered descriptor: the kernel keeps it
  // coherent with direct writes).
  int verbatim(uint64_t off, uint64_t /*len*/, uint64_t* file_off) override {
    *file_off = off;
    return fd_;
  }

 private:
  Backing() = default;
  // The descriptor and whether it needs aligned memory, for one request.
  int pick_fd(const Io& io, size_t len, uint64_t off) const;

  int fd_ = -1;
  std::atomic<int> dfd_{-1};
  bool read_only_ = false;
  uint32_t dio_off_align_ = 4096;
  uint32_t dio_mem_align_ = 4096;
  LockMode lock_ = LockMode::None;
};

}  // namespace iofilterfs
