// The "file" a format layer decodes: any Layer (the backing file, the fault layer above it, or an
// FdFile opened here for a backing-chain member). Format code uses only read/write/sync/resize/
// size/fallocate of it, so unit tests can hand it any file, crafted or made by qemu-img.
#pragma once

#include <memory>
#include <string>

#include "filter.h"

namespace iofilterfs::format {

// A plain descriptor as a Layer: the files of a backing chain, and files in the unit tests.
class FdFile final : public Layer {
 public:
  // Opens `path` (read-only unless writable); on failure returns null and sets *err.
  static std::unique_ptr<FdFile> open(const std::string& path, bool writable, std::string* err);
  // Takes ownership of `fd`.
  explicit FdFile(int fd) : fd_(fd) {}
  ~FdFile() override;

  int fd() const { return fd_; }

  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override;
  Status sync(const Io& io, bool datasync) override;
  Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len) override;
  Status resize(const Io& io, uint64_t size) override;
  Status seek(const Io& io, uint64_t off, int whence, uint64_t* result) override;
  Status size(uint64_t* out) override;

 private:
  int fd_ = -1;
};

// Reads exactly len bytes at off; bytes past the end of the file read as zeros.
// `io` carries the opener's O_DIRECT wish down to a Backing (aligned requests go direct).
Status read_zero_padded(Layer& f, void* buf, size_t len, uint64_t off, const Io& io = Io{});

}  // namespace iofilterfs::format
