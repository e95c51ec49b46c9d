// Status: the result of every data-path operation.
//
// The data path never throws and never allocates to report an error: a Status is an errno and
// a pointer to a static message. It is turned into a FUSE reply in exactly one place
// (fuse_ops.cc, reply_err), and logged there at debug level only.
#pragma once

#include <cerrno>

namespace iofilterfs {

struct [[nodiscard]] Status {
  int err = 0;                 // 0 on success, else a positive errno
  const char* what = nullptr;  // static text saying which layer failed and why; may be null

  static constexpr Status Ok() { return {}; }
  static constexpr Status Error(int e, const char* w = nullptr) { return {e, w}; }
  // Not a failure: a filter took the request to finish later (filter.h, Deferred). Only a
  // caller that offered to take a deferred answer (Io::defer) ever sees it.
  static constexpr Status Deferred() { return {kDeferredErr, nullptr}; }
  // Wraps a -1/errno system call result.
  static Status FromErrno(const char* w) { return {errno ? errno : EIO, w}; }

  constexpr bool ok() const { return err == 0; }
  constexpr bool deferred() const { return err == kDeferredErr; }

  static constexpr int kDeferredErr = -1;  // never an errno (those are positive)
};

}  // namespace iofilterfs
