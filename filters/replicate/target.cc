#include "replicate/target.h"

#include <fcntl.h>
#include <libnbd.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <vector>

namespace iofilterfs::replicate {
namespace {

constexpr uint64_t kChunk = 32u << 20;  // the largest request NBD servers are required to take
alignas(4096) const uint8_t kZeros[1u << 20] = {};

std::string sys_err(const char* what, const std::string& path) {
  return std::string(what) + " " + path + ": " + std::strerror(errno);
}

class DirTarget : public Target {
 public:
  explicit DirTarget(std::string dir) : dir_(std::move(dir)) {}
  ~DirTarget() override { close(); }

  std::string connect(const std::string& relpath, uint64_t size) override {
    close();
    path_ = dir_ + "/" + relpath;
    // Create the directories of the image's relative path under the target.
    for (size_t i = dir_.size() + 1; i < path_.size(); ++i) {
      if (path_[i] != '/') continue;
      const std::string d = path_.substr(0, i);
      if (::mkdir(d.c_str(), 0755) != 0 && errno != EEXIST) return sys_err("cannot create", d);
    }
    struct stat st;
    if (::stat(dir_.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return sys_err("no target directory", dir_);
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd_ < 0) return sys_err("cannot open the replica", path_);
    if (::fstat(fd_, &st) != 0) return sys_err("cannot stat", path_);
    if (static_cast<uint64_t>(st.st_size) != size && ::ftruncate(fd_, static_cast<off_t>(size)) != 0)
      return sys_err("cannot size", path_);
    return "";
  }
  void close() override {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  std::string pwrite(const void* buf, size_t len, uint64_t off) override {
    const auto* p = static_cast<const uint8_t*>(buf);
    while (len) {
      ssize_t n = ::pwrite(fd_, p, len, static_cast<off_t>(off));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return sys_err("cannot write", path_);
      p += n;
      off += static_cast<uint64_t>(n);
      len -= static_cast<size_t>(n);
    }
    return "";
  }
  std::string copy_from(int src, uint64_t src_off, size_t len, uint64_t off, bool* copied) override {
    *copied = false;
    if (no_copy_range_) return "";
    loff_t in = static_cast<loff_t>(src_off), out = static_cast<loff_t>(off);
    bool first = true;
    while (len) {
      ssize_t n = ::copy_file_range(src, &in, fd_, &out, len, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && first && (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP)) {
        no_copy_range_ = true;  // this kernel or file system pair cannot: read and write
        return "";
      }
      if (n < 0) return sys_err("cannot copy into", path_);
      if (n == 0) return "";  // the source ends early (an image shrinking): the caller reads, pads, writes
      first = false;
      len -= static_cast<size_t>(n);
    }
    *copied = true;
    return "";
  }
  std::string zero(uint64_t off, uint64_t len) override {
    if (len == 0) return "";
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                    static_cast<off_t>(len)) == 0)
      return "";
    if (errno != EOPNOTSUPP) return sys_err("cannot punch", path_);
    while (len) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(len, sizeof kZeros));
      std::string e = pwrite(kZeros, n, off);
      if (!e.empty()) return e;
      off += n;
      len -= n;
    }
    return "";
  }
  std::string resize(uint64_t, uint64_t new_size) override {
    if (::ftruncate(fd_, static_cast<off_t>(new_size)) != 0) return sys_err("cannot resize", path_);
    return "";
  }
  std::string flush() override {
    if (::fdatasync(fd_) != 0) return sys_err("cannot sync", path_);
    return "";
  }
  std::string pread(void* buf, size_t len, uint64_t off) override {
    ssize_t n = ::pread(fd_, buf, len, static_cast<off_t>(off));
    if (n < 0) return sys_err("cannot read", path_);
    if (static_cast<size_t>(n) < len) std::memset(static_cast<uint8_t*>(buf) + n, 0, len - static_cast<size_t>(n));
    return "";
  }
  std::string where() const override { return "dir:" + (path_.empty() ? dir_ : path_); }

 private:
  std::string dir_, path_;
  std::atomic<bool> no_copy_range_{false};
  int fd_ = -1;
};

class NbdTarget : public Target {
 public:
  explicit NbdTarget(std::string uri) : uri_(std::move(uri)) {}
  ~NbdTarget() override { close(); }

  std::string connect(const std::string&, uint64_t size) override {
    close();
    h_ = nbd_create();
    if (!h_) return std::string("libnbd: ") + nbd_get_error();
    // TLS material named in the URI (tls-psk-file=, tls-certificates=) is read by libnbd.
    (void)nbd_set_uri_allow_local_file(h_, true);
    if (nbd_connect_uri(h_, uri_.c_str()) == -1) return fail("cannot connect to");
    const int64_t esize = nbd_get_size(h_);
    if (esize < 0) return fail("cannot get the size of");
    export_size_ = static_cast<uint64_t>(esize);
    if (export_size_ < size) {
      std::string e = "the NBD export " + uri_ + " has " + std::to_string(export_size_) +
                      " bytes, fewer than the image's " + std::to_string(size);
      close();
      return e;
    }
    if (nbd_is_read_only(h_) == 1) {
      close();
      return "the NBD export " + uri_ + " is read-only";
    }
    can_flush_ = nbd_can_flush(h_) == 1;
    can_zero_ = nbd_can_zero(h_) == 1;
    return "";
  }
  void close() override {
    if (!h_) return;
    if (nbd_aio_is_ready(h_) == 1) (void)nbd_shutdown(h_, 0);
    nbd_close(h_);
    h_ = nullptr;
  }
  std::string pwrite(const void* buf, size_t len, uint64_t off) override {
    const auto* p = static_cast<const uint8_t*>(buf);
    while (len) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(len, kChunk));
      if (nbd_pwrite(h_, p, n, off, 0) == -1) return fail("cannot write to");
      p += n;
      off += n;
      len -= n;
    }
    return "";
  }
  std::string zero(uint64_t off, uint64_t len) override {
    if (off >= export_size_) return "";
    len = std::min(len, export_size_ - off);
    while (len) {
      const uint64_t n = std::min<uint64_t>(len, can_zero_ ? kChunk : sizeof kZeros);
      const int r = can_zero_ ? nbd_zero(h_, n, off, 0) : nbd_pwrite(h_, kZeros, n, off, 0);
      if (r == -1) return fail("cannot zero on");
      off += n;
      len -= n;
    }
    return "";
  }
  std::string resize(uint64_t old_size, uint64_t new_size) override {
    if (new_size > export_size_)
      return "the image grew to " + std::to_string(new_size) + " bytes, past the NBD export's " +
             std::to_string(export_size_);
    // An export cannot shrink: what the image dropped reads as zeros there, as it would after
    // the image grew again.
    if (new_size < old_size) return zero(new_size, old_size - new_size);
    return "";
  }
  std::string flush() override {
    if (can_flush_ && nbd_flush(h_, 0) == -1) return fail("cannot flush");
    return "";
  }
  std::string pread(void* buf, size_t len, uint64_t off) override {
    if (nbd_pread(h_, buf, len, off, 0) == -1) return fail("cannot read from");
    return "";
  }
  std::string where() const override { return uri_; }

 private:
  std::string fail(const char* what) {
    std::string e = std::string(what) + " " + uri_ + ": " + (nbd_get_error() ? nbd_get_error() : "unknown error");
    return e;
  }
  std::string uri_;
  struct nbd_handle* h_ = nullptr;
  uint64_t export_size_ = 0;
  bool can_flush_ = false, can_zero_ = false;
};

class ContainerTarget : public Target {
 public:
  ContainerTarget(std::unique_ptr<Target> inner, uint64_t header) : inner_(std::move(inner)), header_(header) {}
  std::string connect(const std::string& relpath, uint64_t size) override {
    return inner_->connect(relpath, header_ + size);
  }
  void close() override { inner_->close(); }
  std::string pwrite(const void* buf, size_t len, uint64_t off) override { return inner_->pwrite(buf, len, header_ + off); }
  std::string zero(uint64_t off, uint64_t len) override { return inner_->zero(header_ + off, len); }
  std::string resize(uint64_t old_size, uint64_t new_size) override {
    return inner_->resize(header_ + old_size, header_ + new_size);
  }
  std::string flush() override { return inner_->flush(); }
  std::string pread(void* buf, size_t len, uint64_t off) override { return inner_->pread(buf, len, header_ + off); }
  std::string where() const override { return inner_->where(); }
  std::string copy_from(int fd, uint64_t src_off, size_t len, uint64_t off, bool* copied) override {
    return inner_->copy_from(fd, src_off, len, header_ + off, copied);
  }
  std::string pwrite_header(const void* buf, size_t len, uint64_t off) override {
    if (off > header_ || len > header_ - off) return "a write past the container's header area";
    return inner_->pwrite(buf, len, off);
  }

 private:
  std::unique_ptr<Target> inner_;
  uint64_t header_;
};

}  // namespace

std::unique_ptr<Target> make_container_target(std::unique_ptr<Target> inner, uint64_t header) {
  return std::make_unique<ContainerTarget>(std::move(inner), header);
}

std::unique_ptr<Target> make_target(const std::string& spec, bool nbd) {
  if (nbd) return std::make_unique<NbdTarget>(spec);
  return std::make_unique<DirTarget>(spec);
}

}  // namespace iofilterfs::replicate
