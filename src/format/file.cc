#include "format/file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

namespace iofilterfs::format {

std::unique_ptr<FdFile> FdFile::open(const std::string& path, bool writable, std::string* err) {
  int fd = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) {
    *err = "cannot open " + path + ": " + std::strerror(errno);
    return nullptr;
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    *err = path + " is not a regular file";
    return nullptr;
  }
  return std::make_unique<FdFile>(fd);
}

FdFile::~FdFile() {
  if (fd_ >= 0) ::close(fd_);
}

Status FdFile::read(const Io&, void* buf, size_t len, uint64_t off, size_t* got) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd_, static_cast<char*>(buf) + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno("format: read failed");
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  *got = done;
  return Status::Ok();
}

Status FdFile::write(const Io&, const void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd_, static_cast<const char*>(buf) + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno("format: write failed");
    }
    if (n == 0) return Status::Error(EIO, "format: short write");
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status FdFile::sync(const Io&, bool datasync) {
  if ((datasync ? ::fdatasync(fd_) : ::fsync(fd_)) != 0) return Status::FromErrno("format: fsync failed");
  return Status::Ok();
}

Status FdFile::fallocate(const Io&, int mode, uint64_t off, uint64_t len) {
  if (::fallocate(fd_, mode, static_cast<off_t>(off), static_cast<off_t>(len)) != 0)
    return Status::FromErrno("format: fallocate failed");
  return Status::Ok();
}

Status FdFile::resize(const Io&, uint64_t size) {
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) return Status::FromErrno("format: truncate failed");
  return Status::Ok();
}

Status FdFile::seek(const Io&, uint64_t off, int whence, uint64_t* result) {
  off_t r = ::lseek(fd_, static_cast<off_t>(off), whence);
  if (r < 0) return Status::FromErrno("format: lseek failed");
  *result = static_cast<uint64_t>(r);
  return Status::Ok();
}

Status FdFile::size(uint64_t* out) {
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return Status::FromErrno("format: fstat failed");
  *out = static_cast<uint64_t>(st.st_size);
  return Status::Ok();
}

Status read_zero_padded(Layer& f, void* buf, size_t len, uint64_t off, const Io& io) {
  size_t got = 0;
  Status s = f.read(io, buf, len, off, &got);
  if (!s.ok()) return s;
  if (got < len) std::memset(static_cast<char*>(buf) + got, 0, len - got);
  return Status::Ok();
}

}  // namespace iofilterfs::format
