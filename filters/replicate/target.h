// Where the replica goes: one small interface over a directory (a local disk or a mounted
// NFS/CephFS share) and an NBD server (through libnbd, so nbdkit, qemu-nbd and nbd-server all
// work). Errors are returned as text (only on the error path); "" is success.
//
// Threads: a connected target's pwrite/zero/flush may be called from several threads at once
// (the directory target uses pwrite(2); libnbd serialises calls on its handle). connect() and
// close() are called by one thread while no other call is running (the filter's target lock).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace iofilterfs::replicate {

class Target {
 public:
  virtual ~Target() = default;
  // Opens the replica of an image of `size` bytes, at `relpath` for a directory target.
  // A directory replica is created (with its directories) and sized to `size`; an NBD export
  // must be at least `size` bytes.
  virtual std::string connect(const std::string& relpath, uint64_t size) = 0;
  virtual void close() = 0;
  virtual std::string pwrite(const void* buf, size_t len, uint64_t off) = 0;
  // Makes [off, off+len) read as zeros.
  virtual std::string zero(uint64_t off, uint64_t len) = 0;
  // The image changed size from old_size to new_size.
  virtual std::string resize(uint64_t old_size, uint64_t new_size) = 0;
  // Everything written so far is durable on the target.
  virtual std::string flush() = 0;
  // For tests and checks: reads len bytes at off.
  virtual std::string pread(void* buf, size_t len, uint64_t off) = 0;
  // "dir:/srv/replica/vm1/disk.img" or the URI.
  virtual std::string where() const = 0;
  // Copies len bytes at src_off of the file `fd` to off, without passing them through user
  // memory (copy_file_range for a directory target). *copied false (and "") when the target
  // cannot, or the source ends before len bytes: the caller reads and writes them itself (the
  // bytes this call wrote are written again).
  virtual std::string copy_from(int, uint64_t, size_t, uint64_t, bool* copied) {
    *copied = false;
    return "";
  }
  // A container target (below): writes into the header area before the payload.
  virtual std::string pwrite_header(const void*, size_t, uint64_t) { return "the target has no header area"; }
};

// A target for `spec` (a directory or an NBD URI, as validated by params.h).
std::unique_ptr<Target> make_target(const std::string& spec, bool nbd);

// The replica of an encrypted image is the whole container: `header` bytes of the container's
// header, then the payload. The returned target takes payload offsets and sizes (as the filter
// sees them) and shifts them past the header on `inner`; pwrite_header() writes the header area.
std::unique_ptr<Target> make_container_target(std::unique_ptr<Target> inner, uint64_t header);

}  // namespace iofilterfs::replicate
