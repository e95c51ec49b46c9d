// A reader-writer lock that prefers writers.
//
// Requests hold it shared while they are inside a disk's chain; re-plumbing holds it
// exclusively so no request is inside while filters are swapped. With a reader-preferring lock
// (glibc's default, and so std::shared_mutex) a disk under constant I/O would never let a
// re-plumb in; with writer preference, new requests wait behind a pending re-plumb and the
// requests already inside drain.
#pragma once

#include <pthread.h>

namespace iofilterfs {

class RwLock {
 public:
  RwLock() {
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&l_, &a);
    pthread_rwlockattr_destroy(&a);
  }
  ~RwLock() { pthread_rwlock_destroy(&l_); }
  RwLock(const RwLock&) = delete;
  RwLock& operator=(const RwLock&) = delete;

  void lock_shared() { pthread_rwlock_rdlock(&l_); }
  void unlock_shared() { pthread_rwlock_unlock(&l_); }
  void lock() { pthread_rwlock_wrlock(&l_); }
  void unlock() { pthread_rwlock_unlock(&l_); }

 private:
  pthread_rwlock_t l_;
};

}  // namespace iofilterfs
