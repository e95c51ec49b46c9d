// FUSE low-level operations: a passthrough of the backing tree, with image data routed through
// each image's Disk.
//
// Every reply is sent from the operation that received the request, except a read or write of
// an image that a filter defers (filter.h, "Deferring"): the handler returns without replying,
// and the reply is sent from the thread that completes it (libfuse's replies may come from any
// thread). Errors become replies in one place (reply_err). Operations that create, remove, rename, change or open run with the
// caller's filesystem identity (CallerCreds), so ownership and permissions are the backing
// filesystem's own.
#include "fuse_ops.h"

#include <dirent.h>
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>

#include "buffers.h"
#include "control.h"
#include "creds.h"
#include "datastore.h"

namespace iofilterfs {
namespace {

Datastore& ds_of(fuse_req_t req) { return *static_cast<Datastore*>(fuse_req_userdata(req)); }

std::string proc_path(int fd) { return "/proc/self/fd/" + std::to_string(fd); }

// The single place a failed Status becomes a FUSE reply.
void reply_err(fuse_req_t req, Status s, const char* op) {
  if (s.what) spdlog::debug("{}: {} ({})", op, s.what, std::strerror(s.err));
  fuse_reply_err(req, s.err > 0 ? s.err : EIO);  // (a Deferred status where none may be is EIO)
}

// An open file. Images go through `disk`; everything else through `fd`.
struct FileHandle {
  int fd = -1;
  std::shared_ptr<Disk> disk;
  Inode* inode = nullptr;
  bool direct = false;

  Status read(void* buf, size_t len, uint64_t off, size_t* got) const {
    if (disk) return disk->read(Io{direct}, buf, len, off, got);
    ssize_t n = ::pread(fd, buf, len, static_cast<off_t>(off));
    if (n < 0) return Status::FromErrno("pread");
    *got = static_cast<size_t>(n);
    return Status::Ok();
  }
  Status write(const void* buf, size_t len, uint64_t off) const {
    if (disk) return disk->write(Io{direct}, buf, len, off);
    size_t done = 0;
    while (done < len) {
      ssize_t n = ::pwrite(fd, static_cast<const char*>(buf) + done, len - done, static_cast<off_t>(off + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno("pwrite");
      }
      done += static_cast<size_t>(n);
    }
    return Status::Ok();
  }
};

FileHandle* fh_of(fuse_file_info* fi) { return reinterpret_cast<FileHandle*>(static_cast<uintptr_t>(fi->fh)); }

struct DirHandle {
  DIR* dp = nullptr;
  off_t offset = 0;
  dirent* entry = nullptr;
  ~DirHandle() {
    if (dp) closedir(dp);
  }
};

DirHandle* dh_of(fuse_file_info* fi) { return reinterpret_cast<DirHandle*>(static_cast<uintptr_t>(fi->fh)); }

// Handles the kernel has not released. At unmount it sends no more releases, so op_destroy
// frees what is left — and with them the last references to their disks. Touched on open and
// release only, never per I/O.
struct OpenHandles {
  std::mutex mu;
  std::unordered_set<FileHandle*> files;
  std::unordered_set<DirHandle*> dirs;
};
OpenHandles g_open;

template <typename H>
void remember(std::unordered_set<H*>& set, H* h) {
  std::lock_guard<std::mutex> g(g_open.mu);
  set.insert(h);
}
template <typename H>
void forget_handle(std::unordered_set<H*>& set, H* h) {
  std::lock_guard<std::mutex> g(g_open.mu);
  set.erase(h);
}

// ---- init ----------------------------------------------------------------------------------

void op_init(void* userdata, fuse_conn_info* conn) {
  auto& ds = *static_cast<Datastore*>(userdata);
  auto want = [&](unsigned cap) {
    if (conn->capable & cap) conn->want |= cap;
  };
  want(FUSE_CAP_ASYNC_DIO);      // libaio direct requests stay in flight concurrently
  want(FUSE_CAP_ASYNC_READ);
  want(FUSE_CAP_PARALLEL_DIROPS);
  want(FUSE_CAP_SPLICE_WRITE);   // non-image reads splice from the backing file
  want(FUSE_CAP_SPLICE_MOVE);
  want(FUSE_CAP_EXPORT_SUPPORT);
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;  // the chain sees every write when it happens
  conn->max_write = 1024 * 1024;
  conn->max_read = 1024 * 1024;
  // The kernel sends at most max_background asynchronous requests (libaio direct I/O, reads
  // ahead) of the whole mount at a time and queues the rest in one FIFO for every file. A
  // throttle keeps the requests it holds in flight here (deferred, costing no thread), so with
  // a low limit this must be far above any one guest's queue depth, or a throttled disk's
  // held requests would fill it and its neighbours' requests would wait behind them in the
  // kernel. 4096: 32 guests at queue depth 128. The kernel caps it at
  // /proc/sys/fs/fuse/max_user_bgreq unless the daemon runs as root.
  conn->max_background = 4096;
  conn->congestion_threshold = 3072;
  spdlog::info("mounted {} at {} ({} threads{})", ds.options().backing, ds.options().mountpoint,
               ds.options().threads, ds.options().read_only ? ", read-only" : "");
}

void op_destroy(void* userdata) {
  static_cast<Datastore*>(userdata)->shutdown();  // every disk's filters drain and close
  std::lock_guard<std::mutex> g(g_open.mu);
  for (FileHandle* h : g_open.files) {
    if (!h->disk) ::close(h->fd);
    delete h;
  }
  for (DirHandle* d : g_open.dirs) delete d;
  g_open.files.clear();
  g_open.dirs.clear();
}

// ---- names ---------------------------------------------------------------------------------

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Datastore& ds = ds_of(req);
  fuse_entry_param e;
  int err = ds.lookup(ds.inode(parent), name, &e);
  if (err == ENOENT) {
    // A negative entry the kernel may cache briefly.
    std::memset(&e, 0, sizeof e);
    e.entry_timeout = 1.0;
    fuse_reply_entry(req, &e);
  } else if (err) {
    fuse_reply_err(req, err);
  } else {
    fuse_reply_entry(req, &e);
  }
}

void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  Datastore& ds = ds_of(req);
  ds.forget(ds.inode(ino), nlookup);
  fuse_reply_none(req);
}

void op_forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  Datastore& ds = ds_of(req);
  for (size_t i = 0; i < count; ++i) ds.forget(ds.inode(forgets[i].ino), forgets[i].nlookup);
  fuse_reply_none(req);
}

// Finishes an operation that created `name` in `parent`: look it up and reply with the entry.
void reply_created(fuse_req_t req, Inode& parent, const char* name) {
  fuse_entry_param e;
  int err = ds_of(req).lookup(parent, name, &e);
  if (err) fuse_reply_err(req, err);
  else fuse_reply_entry(req, &e);
}

void op_mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) {
  Inode& p = ds_of(req).inode(parent);
  {
    CallerCreds creds(req);
    if (::mknodat(p.fd, name, mode, rdev) != 0) return (void)fuse_reply_err(req, errno);
  }
  reply_created(req, p, name);
}

void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  Inode& p = ds_of(req).inode(parent);
  {
    CallerCreds creds(req);
    if (::mkdirat(p.fd, name, mode) != 0) return (void)fuse_reply_err(req, errno);
  }
  reply_created(req, p, name);
}

void op_symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name) {
  Inode& p = ds_of(req).inode(parent);
  {
    CallerCreds creds(req);
    if (::symlinkat(link, p.fd, name) != 0) return (void)fuse_reply_err(req, errno);
  }
  reply_created(req, p, name);
}

void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, const char* name) {
  Datastore& ds = ds_of(req);
  Inode& i = ds.inode(ino);
  Inode& p = ds.inode(parent);
  {
    CallerCreds creds(req);
    if (::linkat(AT_FDCWD, proc_path(i.fd).c_str(), p.fd, name, AT_SYMLINK_FOLLOW) != 0)
      return (void)fuse_reply_err(req, errno);
  }
  reply_created(req, p, name);
}

void op_unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Inode& p = ds_of(req).inode(parent);
  CallerCreds creds(req);
  fuse_reply_err(req, ::unlinkat(p.fd, name, 0) == 0 ? 0 : errno);
}

void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  Inode& p = ds_of(req).inode(parent);
  CallerCreds creds(req);
  fuse_reply_err(req, ::unlinkat(p.fd, name, AT_REMOVEDIR) == 0 ? 0 : errno);
}

void op_rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent, const char* newname,
               unsigned int flags) {
  Datastore& ds = ds_of(req);
  Inode& p = ds.inode(parent);
  Inode& np = ds.inode(newparent);
  CallerCreds creds(req);
  fuse_reply_err(req, ::renameat2(p.fd, name, np.fd, newname, flags) == 0 ? 0 : errno);
}

void op_readlink(fuse_req_t req, fuse_ino_t ino) {
  Inode& i = ds_of(req).inode(ino);
  char buf[PATH_MAX + 1];
  ssize_t n = ::readlinkat(i.fd, "", buf, PATH_MAX);
  if (n < 0) return (void)fuse_reply_err(req, errno);
  buf[n] = '\0';
  fuse_reply_readlink(req, buf);
}

// ---- attributes ----------------------------------------------------------------------------

void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  struct stat st;
  int err = ds_of(req).stat(ds_of(req).inode(ino), &st);
  if (err) return (void)fuse_reply_err(req, err);
  fuse_reply_attr(req, &st, 1.0);
}

// Truncates or grows an image through its chain, joining the open Disk or opening it briefly.
Status resize_image(Datastore& ds, Inode& i, FileHandle* fh, uint64_t size) {
  if (fh && fh->disk) return fh->disk->resize(Io{fh->direct}, size);
  std::shared_ptr<Disk> d;
  std::string err;
  Status s = ds.attach_disk(i, true, false, &d, &err);
  if (!s.ok()) {
    spdlog::warn("{}: truncate refused: {}", ds.relpath(i), err);
    return s;
  }
  s = d->resize(Io{}, size);
  ds.detach_disk(i);
  return s;
}

void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int valid, fuse_file_info* fi) {
  Datastore& ds = ds_of(req);
  Inode& i = ds.inode(ino);
  FileHandle* fh = fi ? fh_of(fi) : nullptr;
  const std::string path = proc_path(i.fd);
  {
    CallerCreds creds(req);
    if (valid & FUSE_SET_ATTR_MODE) {
      if (::chmod(path.c_str(), attr->st_mode) != 0) return (void)fuse_reply_err(req, errno);
    }
    if (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
      uid_t uid = (valid & FUSE_SET_ATTR_UID) ? attr->st_uid : static_cast<uid_t>(-1);
      gid_t gid = (valid & FUSE_SET_ATTR_GID) ? attr->st_gid : static_cast<gid_t>(-1);
      if (::fchownat(i.fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) return (void)fuse_reply_err(req, errno);
    }
    if (valid & FUSE_SET_ATTR_SIZE) {
      if (i.type != S_IFREG) return (void)fuse_reply_err(req, EINVAL);
      if (ds.is_image(i)) {
        // The caller must be able to write the file; then the chain resizes it.
        if (!fh) {
          int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
          if (fd < 0) return (void)fuse_reply_err(req, errno);
          ::close(fd);
        }
        Status s = resize_image(ds, i, fh, static_cast<uint64_t>(attr->st_size));
        if (!s.ok()) return reply_err(req, s, "truncate");
      } else {
        int r = fh ? ::ftruncate(fh->fd, attr->st_size) : ::truncate(path.c_str(), attr->st_size);
        if (r != 0) return (void)fuse_reply_err(req, errno);
      }
    }
    if (valid & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) {
      struct timespec tv[2];
      tv[0].tv_sec = tv[1].tv_sec = 0;
      tv[0].tv_nsec = tv[1].tv_nsec = UTIME_OMIT;
      if (valid & FUSE_SET_ATTR_ATIME_NOW) tv[0].tv_nsec = UTIME_NOW;
      else if (valid & FUSE_SET_ATTR_ATIME) tv[0] = attr->st_atim;
      if (valid & FUSE_SET_ATTR_MTIME_NOW) tv[1].tv_nsec = UTIME_NOW;
      else if (valid & FUSE_SET_ATTR_MTIME) tv[1] = attr->st_mtim;
      int r = i.type == S_IFLNK ? ::utimensat(i.fd, "", tv, AT_EMPTY_PATH) : ::utimensat(AT_FDCWD, path.c_str(), tv, 0);
      if (r != 0) return (void)fuse_reply_err(req, errno);
    }
  }
  op_getattr(req, ino, fi);
}

// ---- open, read, write ---------------------------------------------------------------------

// Ends a handle: its image's disk loses a user (the last one closes it), or its descriptor
// closes. Shared by release and by opens whose caller was interrupted.
void close_handle(Datastore& ds, Inode& i, FileHandle* h) {
  forget_handle(g_open.files, h);
  if (h->disk) {
    h->disk.reset();
    ds.detach_disk(i);
  } else {
    ::close(h->fd);
  }
  delete h;
}

// Sets up a handle for `fd`, opened with the caller's identity. For an image the caller's
// descriptor only proved the access; the data path is the shared Disk.
void finish_open(fuse_req_t req, Inode& i, int fd, fuse_file_info* fi, const fuse_entry_param* e) {
  Datastore& ds = ds_of(req);
  auto fh = std::make_unique<FileHandle>();
  fh->inode = &i;
  fh->direct = (fi->flags & O_DIRECT) != 0;
  const bool writable = (fi->flags & O_ACCMODE) != O_RDONLY;
  if (ds.is_image(i)) {
    ::close(fd);
    std::string err;
    Status s = ds.attach_disk(i, writable, fh->direct, &fh->disk, &err);
    if (!s.ok()) {
      spdlog::warn("{}: open refused: {}", ds.relpath(i), err);
      if (e) ds.forget(i, 1);
      return reply_err(req, s, "open");
    }
    if ((fi->flags & O_TRUNC) && writable) {
      s = fh->disk->resize(Io{fh->direct}, 0);
      if (!s.ok()) {
        ds.detach_disk(i);
        if (e) ds.forget(i, 1);
        return reply_err(req, s, "open O_TRUNC");
      }
    }
  } else {
    fh->fd = fd;
    if (e && (fi->flags & O_TRUNC) && writable && ::ftruncate(fd, 0) != 0) {
      int err = errno;
      ::close(fd);
      ds.forget(i, 1);
      return (void)fuse_reply_err(req, err);
    }
  }
  // Direct opens bypass the kernel's page cache; Backing aligns what reaches O_DIRECT.
  fi->direct_io = fh->direct ? 1 : 0;
  fi->keep_cache = 0;
  remember(g_open.files, fh.get());
  fi->fh = reinterpret_cast<uintptr_t>(fh.release());
  // An opener interrupted meanwhile never gets the handle: undo it as a release would.
  if (e) {
    if (fuse_reply_create(req, e, fi) == -ENOENT) {
      close_handle(ds, i, fh_of(fi));
      ds.forget(i, 1);
    }
  } else if (fuse_reply_open(req, fi) == -ENOENT) {
    close_handle(ds, i, fh_of(fi));
  }
}

// Flags for the caller's own descriptor. O_DIRECT is served by the kernel (direct_io) and by
// Backing; the passthrough descriptor stays buffered so no unaligned buffer ever meets it.
int backing_open_flags(int flags) { return (flags & ~(O_DIRECT | O_CREAT | O_EXCL | O_NOCTTY)) | O_CLOEXEC; }

void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Datastore& ds = ds_of(req);
  Inode& i = ds.inode(ino);
  int fd;
  {
    CallerCreds creds(req);
    int flags = backing_open_flags(fi->flags);
    if (ds.is_image(i)) flags &= ~(O_TRUNC | O_APPEND);  // the image's Disk truncates through its chain
    fd = ::open(proc_path(i.fd).c_str(), flags);
    if (fd < 0) return (void)fuse_reply_err(req, errno);
  }
  finish_open(req, i, fd, fi, nullptr);
}

void op_create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi) {
  Datastore& ds = ds_of(req);
  Inode& p = ds.inode(parent);
  int fd;
  {
    CallerCreds creds(req);
    // O_TRUNC of an existing file is done by finish_open, through the chain for an image.
    fd = ::openat(p.fd, name, (backing_open_flags(fi->flags) & ~O_TRUNC) | O_CREAT | (fi->flags & O_EXCL), mode);
    if (fd < 0) return (void)fuse_reply_err(req, errno);
  }
  fuse_entry_param e;
  int err = ds.lookup(p, name, &e);
  if (err) {
    ::close(fd);
    return (void)fuse_reply_err(req, err);
  }
  finish_open(req, ds.inode(e.ino), fd, fi, &e);
}

void op_release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Datastore& ds = ds_of(req);
  close_handle(ds, ds.inode(ino), fh_of(fi));
  fuse_reply_err(req, 0);
}

void op_flush(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  FileHandle* fh = fh_of(fi);
  // close(2) on a plain file: let the backing filesystem see a close (NFS flushes here).
  if (!fh->disk) {
    int d = ::dup(fh->fd);
    if (d < 0 || ::close(d) != 0) return (void)fuse_reply_err(req, errno);
  }
  fuse_reply_err(req, 0);
}

void op_fsync(fuse_req_t req, fuse_ino_t, int datasync, fuse_file_info* fi) {
  FileHandle* fh = fh_of(fi);
  if (fh->disk) {
    Status s = fh->disk->sync(Io{fh->direct}, datasync != 0);
    if (!s.ok()) return reply_err(req, s, "fsync");
    return (void)fuse_reply_err(req, 0);
  }
  fuse_reply_err(req, (datasync ? ::fdatasync(fh->fd) : ::fsync(fh->fd)) == 0 ? 0 : errno);
}

// The replies of deferred reads and writes (Disk's Completion), on the completing thread.
void read_done(void* ctx, Status s, const void* data, size_t len) {
  auto req = static_cast<fuse_req_t>(ctx);
  if (!s.ok()) return reply_err(req, s, "read");
  fuse_reply_buf(req, static_cast<const char*>(data), len);
}

void write_done(void* ctx, Status s, const void*, size_t len) {
  auto req = static_cast<fuse_req_t>(ctx);
  if (!s.ok()) return reply_err(req, s, "write");
  fuse_reply_write(req, len);
}

void op_read(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
  FileHandle* fh = fh_of(fi);
  if (!fh->disk) {
    fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
    buf.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
    buf.buf[0].fd = fh->fd;
    buf.buf[0].pos = off;
    fuse_reply_data(req, &buf, FUSE_BUF_SPLICE_MOVE);
    return;
  }
  void* mem = thread_buffer(BufferSlot::Reply, size);
  if (!mem) return (void)fuse_reply_err(req, ENOMEM);
  size_t got = 0;
  const Completion done{read_done, req};
  Status s = fh->disk->read(Io{fh->direct}, mem, size, static_cast<uint64_t>(off), &got, &done);
  if (s.deferred()) return;  // read_done replies
  if (!s.ok()) return reply_err(req, s, "read");
  fuse_reply_buf(req, static_cast<const char*>(mem), got);
}

void op_write_buf(fuse_req_t req, fuse_ino_t, fuse_bufvec* in, off_t off, fuse_file_info* fi) {
  FileHandle* fh = fh_of(fi);
  const size_t size = fuse_buf_size(in);
  if (!fh->disk) {
    fuse_bufvec out = FUSE_BUFVEC_INIT(size);
    out.buf[0].flags = static_cast<fuse_buf_flags>(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
    out.buf[0].fd = fh->fd;
    out.buf[0].pos = off;
    ssize_t n = fuse_buf_copy(&out, in, fuse_buf_copy_flags(0));
    if (n < 0) return (void)fuse_reply_err(req, static_cast<int>(-n));
    fuse_reply_write(req, static_cast<size_t>(n));
    return;
  }
  // Without splice-read the data sits in libfuse's per-thread buffer: write it from there.
  const void* data;
  if (in->count == 1 && !(in->buf[0].flags & FUSE_BUF_IS_FD)) {
    data = in->buf[0].mem;
  } else {
    void* mem = thread_buffer(BufferSlot::Copy, size);
    if (!mem) return (void)fuse_reply_err(req, ENOMEM);
    fuse_bufvec dst = FUSE_BUFVEC_INIT(size);
    dst.buf[0].mem = mem;
    ssize_t n = fuse_buf_copy(&dst, in, fuse_buf_copy_flags(0));
    if (n < 0 || static_cast<size_t>(n) != size) return (void)fuse_reply_err(req, n < 0 ? static_cast<int>(-n) : EIO);
    data = mem;
  }
  const Completion done{write_done, req};
  Status s = fh->disk->write(Io{fh->direct}, data, size, static_cast<uint64_t>(off), &done);
  if (s.deferred()) return;  // write_done replies (the disk copied the data)
  if (!s.ok()) return reply_err(req, s, "write");
  fuse_reply_write(req, size);
}

void op_fallocate(fuse_req_t req, fuse_ino_t, int mode, off_t off, off_t len, fuse_file_info* fi) {
  FileHandle* fh = fh_of(fi);
  if (fh->disk) {
    Status s = fh->disk->fallocate(Io{fh->direct}, mode, static_cast<uint64_t>(off), static_cast<uint64_t>(len));
    if (!s.ok()) return reply_err(req, s, "fallocate");
    return (void)fuse_reply_err(req, 0);
  }
  fuse_reply_err(req, ::fallocate(fh->fd, mode, off, len) == 0 ? 0 : errno);
}

void op_lseek(fuse_req_t req, fuse_ino_t, off_t off, int whence, fuse_file_info* fi) {
  FileHandle* fh = fh_of(fi);
  if (fh->disk) {
    uint64_t r = 0;
    Status s = fh->disk->seek(Io{fh->direct}, static_cast<uint64_t>(off), whence, &r);
    if (!s.ok()) return reply_err(req, s, "lseek");
    return (void)fuse_reply_lseek(req, static_cast<off_t>(r));
  }
  off_t r = ::lseek(fh->fd, off, whence);
  if (r < 0) return (void)fuse_reply_err(req, errno);
  fuse_reply_lseek(req, r);
}

void op_copy_file_range(fuse_req_t req, fuse_ino_t, off_t off_in, fuse_file_info* fi_in, fuse_ino_t, off_t off_out,
                        fuse_file_info* fi_out, size_t len, int flags) {
  FileHandle* in = fh_of(fi_in);
  FileHandle* out = fh_of(fi_out);
  if (!in->disk && !out->disk) {
    loff_t oi = off_in, oo = off_out;
    ssize_t n = ::copy_file_range(in->fd, &oi, out->fd, &oo, len, static_cast<unsigned>(flags));
    if (n < 0) return (void)fuse_reply_err(req, errno);
    return (void)fuse_reply_write(req, static_cast<size_t>(n));
  }
  // An image on either side: copy through the chains, so each filter sees the data.
  constexpr size_t kChunk = 1024 * 1024;
  void* mem = thread_buffer(BufferSlot::Copy, std::min(len, kChunk));
  if (!mem) return (void)fuse_reply_err(req, ENOMEM);
  size_t done = 0;
  while (done < len) {
    size_t want = std::min(len - done, kChunk), got = 0;
    Status s = in->read(mem, want, static_cast<uint64_t>(off_in) + done, &got);
    if (s.ok() && got) s = out->write(mem, got, static_cast<uint64_t>(off_out) + done);
    if (!s.ok()) {
      if (done) break;  // report what was copied; the caller retries the rest
      return reply_err(req, s, "copy_file_range");
    }
    if (got == 0) break;
    done += got;
  }
  fuse_reply_write(req, done);
}

// ---- directories ---------------------------------------------------------------------------

void op_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Inode& i = ds_of(req).inode(ino);
  int fd;
  {
    CallerCreds creds(req);
    fd = ::openat(i.fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return (void)fuse_reply_err(req, errno);
  }
  auto dh = std::make_unique<DirHandle>();
  dh->dp = ::fdopendir(fd);
  if (!dh->dp) {
    int err = errno;
    ::close(fd);
    return (void)fuse_reply_err(req, err);
  }
  remember(g_open.dirs, dh.get());
  fi->fh = reinterpret_cast<uintptr_t>(dh.release());
  fuse_reply_open(req, fi);
}

void do_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t offset, fuse_file_info* fi, bool plus) {
  Datastore& ds = ds_of(req);
  DirHandle* d = dh_of(fi);
  Inode& dir = ds.inode(ino);
  auto buf = std::make_unique<char[]>(size);
  size_t used = 0;
  int err = 0;
  if (offset != d->offset) {
    ::seekdir(d->dp, offset);
    d->entry = nullptr;
    d->offset = offset;
  }
  while (true) {
    if (!d->entry) {
      errno = 0;
      d->entry = ::readdir(d->dp);
      if (!d->entry) {
        err = errno;
        break;
      }
    }
    const off_t next = d->entry->d_off;
    // An image in the raw view is listed (and looked up) as NAME.raw.
    const std::string shown = ds.display_name(dir, d->entry->d_name);
    const char* name = shown.c_str();
    size_t n;
    if (plus) {
      fuse_entry_param e;
      if (std::strcmp(name, ".") == 0 || std::strcmp(name, "..") == 0) {
        std::memset(&e, 0, sizeof e);
        e.attr.st_ino = d->entry->d_ino;
        e.attr.st_mode = static_cast<mode_t>(d->entry->d_type << 12);
        n = fuse_add_direntry_plus(req, buf.get() + used, size - used, name, &e, next);
        if (n > size - used) break;
      } else {
        int lerr = ds.lookup(dir, name, &e);
        if (lerr) {
          if (lerr == ENOENT) {  // vanished meanwhile: skip it
            d->entry = nullptr;
            d->offset = next;
            continue;
          }
          err = lerr;
          break;
        }
        n = fuse_add_direntry_plus(req, buf.get() + used, size - used, name, &e, next);
        if (n > size - used) {
          ds.forget(ds.inode(e.ino), 1);  // did not fit: give the reference back
          break;
        }
      }
    } else {
      struct stat st {};
      st.st_ino = d->entry->d_ino;
      st.st_mode = static_cast<mode_t>(d->entry->d_type << 12);
      n = fuse_add_direntry(req, buf.get() + used, size - used, name, &st, next);
      if (n > size - used) break;
    }
    used += n;
    d->entry = nullptr;
    d->offset = next;
  }
  if (err && used == 0) return (void)fuse_reply_err(req, err);
  fuse_reply_buf(req, buf.get(), used);
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  do_readdir(req, ino, size, off, fi, false);
}
void op_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  do_readdir(req, ino, size, off, fi, true);
}

void op_releasedir(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  forget_handle(g_open.dirs, dh_of(fi));
  delete dh_of(fi);
  fuse_reply_err(req, 0);
}

void op_fsyncdir(fuse_req_t req, fuse_ino_t, int datasync, fuse_file_info* fi) {
  int fd = ::dirfd(dh_of(fi)->dp);
  fuse_reply_err(req, (datasync ? ::fdatasync(fd) : ::fsync(fd)) == 0 ? 0 : errno);
}

void op_statfs(fuse_req_t req, fuse_ino_t ino) {
  struct statvfs sv;
  if (::fstatvfs(ds_of(req).inode(ino).fd, &sv) != 0) return (void)fuse_reply_err(req, errno);
  fuse_reply_statfs(req, &sv);
}

// ---- extended attributes -------------------------------------------------------------------

// Replies to a getxattr/listxattr size probe or copies the value.
void reply_xattr_value(fuse_req_t req, const char* data, size_t len, size_t size) {
  if (size == 0) fuse_reply_xattr(req, len);
  else if (len > size) fuse_reply_err(req, ERANGE);
  else fuse_reply_buf(req, data, len);
}

// The daemon's own attributes on backing files (policy overrides) are not the clients' business.
bool is_hidden_name(std::string_view name) { return name.rfind("trusted.iofilterfs.", 0) == 0; }

void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  Datastore& ds = ds_of(req);
  Inode& i = ds.inode(ino);
  if (is_hidden_name(name)) return (void)fuse_reply_err(req, ENODATA);
  if (is_control_name(name)) {
    std::string v;
    Status s = control_get(ds, i, name, &v);
    if (!s.ok()) return (void)fuse_reply_err(req, s.err);
    return reply_xattr_value(req, v.data(), v.size(), size);
  }
  if (i.type == S_IFLNK) return (void)fuse_reply_err(req, ENOTSUP);
  CallerCreds creds(req);
  const std::string path = proc_path(i.fd);
  std::unique_ptr<char[]> buf(size ? new char[size] : nullptr);
  ssize_t n = ::getxattr(path.c_str(), name, buf.get(), size);
  if (n < 0) return (void)fuse_reply_err(req, errno);
  if (size == 0) fuse_reply_xattr(req, static_cast<size_t>(n));
  else fuse_reply_buf(req, buf.get(), static_cast<size_t>(n));
}

void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  Datastore& ds = ds_of(req);
  Inode& i = ds.inode(ino);
  std::string all;
  if (i.type != S_IFLNK) {
    CallerCreds creds(req);
    const std::string path = proc_path(i.fd);
    ssize_t n = ::listxattr(path.c_str(), nullptr, 0);
    if (n < 0 && errno != ENOTSUP) return (void)fuse_reply_err(req, errno);
    if (n > 0) {
      all.resize(static_cast<size_t>(n) + 256);
      n = ::listxattr(path.c_str(), all.data(), all.size());
      if (n < 0) return (void)fuse_reply_err(req, errno);
      all.resize(static_cast<size_t>(n));
      // Drop hidden names from the NUL-separated list.
      std::string kept;
      for (size_t p = 0; p < all.size();) {
        size_t e = all.find('\0', p);
        if (e == std::string::npos) e = all.size();
        std::string_view one(all.data() + p, e - p);
        if (!one.empty() && !is_hidden_name(one)) kept.append(one).push_back('\0');
        p = e + 1;
      }
      all.swap(kept);
    }
  }
  all += control_list(ds, i);
  reply_xattr_value(req, all.data(), all.size(), size);
}

void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size, int flags) {
  Datastore& ds = ds_of(req);
  Inode& i = ds.inode(ino);
  if (is_control_name(name)) {
    Status s = control_set(ds, i, name, std::string_view(value, size), fuse_req_ctx(req));
    return (void)fuse_reply_err(req, s.ok() ? 0 : s.err);
  }
  if (is_hidden_name(name)) return (void)fuse_reply_err(req, EPERM);
  if (i.type == S_IFLNK) return (void)fuse_reply_err(req, ENOTSUP);
  CallerCreds creds(req);
  fuse_reply_err(req, ::setxattr(proc_path(i.fd).c_str(), name, value, size, flags) == 0 ? 0 : errno);
}

void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
  Datastore& ds = ds_of(req);
  Inode& i = ds.inode(ino);
  if (is_control_name(name)) {
    // Removing the policy drops an image's assignment; other control names are not stored.
    Status s = control_remove(ds, i, name, fuse_req_ctx(req));
    return (void)fuse_reply_err(req, s.ok() ? 0 : s.err);
  }
  if (is_hidden_name(name)) return (void)fuse_reply_err(req, EPERM);
  if (i.type == S_IFLNK) return (void)fuse_reply_err(req, ENOTSUP);
  CallerCreds creds(req);
  fuse_reply_err(req, ::removexattr(proc_path(i.fd).c_str(), name) == 0 ? 0 : errno);
}

fuse_lowlevel_ops make_ops() {
  fuse_lowlevel_ops o{};
  o.init = op_init;
  o.destroy = op_destroy;
  o.lookup = op_lookup;
  o.forget = op_forget;
  o.forget_multi = op_forget_multi;
  o.getattr = op_getattr;
  o.setattr = op_setattr;
  o.readlink = op_readlink;
  o.mknod = op_mknod;
  o.mkdir = op_mkdir;
  o.symlink = op_symlink;
  o.link = op_link;
  o.unlink = op_unlink;
  o.rmdir = op_rmdir;
  o.rename = op_rename;
  o.open = op_open;
  o.create = op_create;
  o.release = op_release;
  o.flush = op_flush;
  o.fsync = op_fsync;
  o.read = op_read;
  o.write_buf = op_write_buf;
  o.fallocate = op_fallocate;
  o.lseek = op_lseek;
  o.copy_file_range = op_copy_file_range;
  o.opendir = op_opendir;
  o.readdir = op_readdir;
  o.readdirplus = op_readdirplus;
  o.releasedir = op_releasedir;
  o.fsyncdir = op_fsyncdir;
  o.statfs = op_statfs;
  o.getxattr = op_getxattr;
  o.listxattr = op_listxattr;
  o.setxattr = op_setxattr;
  o.removexattr = op_removexattr;
  return o;
}

}  // namespace

const fuse_lowlevel_ops& datastore_operations() {
  static const fuse_lowlevel_ops ops = make_ops();
  return ops;
}

}  // namespace iofilterfs
