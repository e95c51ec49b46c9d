#include "backing.h"

#include <fcntl.h>
#include <linux/stat.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "buffers.h"

namespace iofilterfs {
namespace {

std::string proc_path(int fd) { return "/proc/self/fd/" + std::to_string(fd); }

// pread/pwrite until done, EOF or error; EINTR retried.
ssize_t full_pread(int fd, void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, static_cast<char*>(buf) + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return static_cast<ssize_t>(done);
}

ssize_t full_pwrite(int fd, const void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd, static_cast<const char*>(buf) + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    if (n == 0) {
      errno = EIO;
      return -1;
    }
    done += static_cast<size_t>(n);
  }
  return static_cast<ssize_t>(done);
}

bool aligned(const void* p, uint32_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

}  // namespace

Backing::~Backing() {
  int d = dfd_.load();
  if (d >= 0) ::close(d);
  if (fd_ >= 0) ::close(fd_);  // also drops the OFD lock
}

Status Backing::open(int path_fd, bool read_only, std::unique_ptr<Backing>* out) {
  std::unique_ptr<Backing> b(new Backing());
  b->read_only_ = read_only;
  b->fd_ = ::open(proc_path(path_fd).c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (b->fd_ < 0) return Status::FromErrno("backing: open failed");
  struct statx stx {};
  if (statx(b->fd_, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) &&
      stx.stx_dio_offset_align != 0) {
    b->dio_off_align_ = stx.stx_dio_offset_align;
    b->dio_mem_align_ = std::max<uint32_t>(stx.stx_dio_mem_align, 512);
  }
  *out = std::move(b);
  return Status::Ok();
}

Status Backing::lock(LockMode mode) {
  if (mode == LockMode::None || mode <= lock_) return Status::Ok();
  struct flock fl {};
  fl.l_type = mode == LockMode::Exclusive ? F_WRLCK : F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = 0;
  fl.l_len = 0;  // the whole file, however large it grows
  if (fcntl(fd_, F_OFD_SETLK, &fl) != 0) {
    if (errno == EAGAIN || errno == EACCES) return Status::Error(EBUSY, "image is locked by another process");
    return Status::FromErrno("backing: lock failed");
  }
  lock_ = mode;
  return Status::Ok();
}

Status Backing::enable_direct(bool* fell_back) {
  *fell_back = false;
  if (dfd_.load() >= 0) return Status::Ok();
  int d = ::open(proc_path(fd_).c_str(), (read_only_ ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_DIRECT);
  if (d < 0) {
    if (errno == EINVAL) {  // the backing filesystem has no O_DIRECT: stay buffered
      *fell_back = true;
      return Status::Ok();
    }
    return Status::FromErrno("backing: open O_DIRECT failed");
  }
  dfd_.store(d);
  return Status::Ok();
}

int Backing::pick_fd(const Io& io, size_t len, uint64_t off) const {
  if (!io.direct) return fd_;
  int d = dfd_.load(std::memory_order_relaxed);
  if (d < 0) return fd_;
  if ((off & (dio_off_align_ - 1)) || (len & (dio_off_align_ - 1))) return fd_;
  return d;
}

Status Backing::read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) {
  int fd = pick_fd(io, len, off);
  ssize_t n;
  if (fd != fd_ && !aligned(buf, dio_mem_align_)) {
    void* bounce = thread_buffer(BufferSlot::Bounce, len);
    if (!bounce) return Status::Error(ENOMEM, "backing: no bounce buffer");
    n = full_pread(fd, bounce, len, off);
    if (n > 0) std::memcpy(buf, bounce, static_cast<size_t>(n));
  } else {
    n = full_pread(fd, buf, len, off);
  }
  if (n < 0) return Status::FromErrno("backing: read failed");
  *got = static_cast<size_t>(n);
  return Status::Ok();
}

Status Backing::write(const Io& io, const void* buf, size_t len, uint64_t off) {
  int fd = pick_fd(io, len, off);
  ssize_t n;
  if (fd != fd_ && !aligned(buf, dio_mem_align_)) {
    void* bounce = thread_buffer(BufferSlot::Bounce, len);
    if (!bounce) return Status::Error(ENOMEM, "backing: no bounce buffer");
    std::memcpy(bounce, buf, len);
    n = full_pwrite(fd, bounce, len, off);
  } else {
    n = full_pwrite(fd, buf, len, off);
  }
  if (n < 0) return Status::FromErrno("backing: write failed");
  return Status::Ok();
}

Status Backing::sync(const Io&, bool datasync) {
  // fsync is per inode: it covers what either descriptor wrote.
  int r = datasync ? ::fdatasync(fd_) : ::fsync(fd_);
  if (r != 0) return Status::FromErrno("backing: fsync failed");
  return Status::Ok();
}

Status Backing::fallocate(const Io&, int mode, uint64_t off, uint64_t len) {
  if (::fallocate(fd_, mode, static_cast<off_t>(off), static_cast<off_t>(len)) != 0)
    return Status::FromErrno("backing: fallocate failed");
  return Status::Ok();
}

Status Backing::resize(const Io&, uint64_t size) {
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) return Status::FromErrno("backing: truncate failed");
  return Status::Ok();
}

Status Backing::seek(const Io&, uint64_t off, int whence, uint64_t* result) {
  off_t r = ::lseek(fd_, static_cast<off_t>(off), whence);
  if (r < 0) return Status::FromErrno("backing: lseek failed");
  *result = static_cast<uint64_t>(r);
  return Status::Ok();
}

Status Backing::size(uint64_t* out) {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return Status::FromErrno("backing: fstat failed");
  *out = static_cast<uint64_t>(st.st_size);
  return Status::Ok();
}

}  // namespace iofilterfs
