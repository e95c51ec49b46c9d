// CallerCreds: run one request with the caller's filesystem identity.
//
// The daemon runs as root but must act as the user who made the request, so that files it
// creates belong to that user and group (setgid directories included) and the backing
// filesystem applies its own permission rules. Linux keeps fsuid/fsgid and the supplementary
// groups per thread, so the guard switches only the worker thread serving this request, with
// raw syscalls (glibc's setgroups() would change every thread). Changing fsuid away from 0
// also drops the thread's filesystem capabilities; switching back restores them.
#pragma once

#include <fuse_lowlevel.h>
#include <sys/fsuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace iofilterfs {

class CallerCreds {
 public:
  explicit CallerCreds(fuse_req_t req) {
    const fuse_ctx* ctx = fuse_req_ctx(req);
    if (::geteuid() != 0 || ctx->uid == 0) return;  // nothing to switch to, or already root
    gid_t groups[64];
    int n = fuse_req_getgroups(req, 64, groups);
    if (n < 0 || n > 64) n = 0;
    ::syscall(SYS_setgroups, n, groups);
    ::setfsgid(ctx->gid);
    ::setfsuid(ctx->uid);
    switched_ = true;
  }
  ~CallerCreds() {
    if (!switched_) return;
    ::setfsuid(0);
    ::setfsgid(0);
    ::syscall(SYS_setgroups, 0, nullptr);
  }
  CallerCreds(const CallerCreds&) = delete;
  CallerCreds& operator=(const CallerCreds&) = delete;

 private:
  bool switched_ = false;
};

}  // namespace iofilterfs
