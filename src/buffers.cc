#include "buffers.h"

#include <cstdlib>

namespace iofilterfs {
namespace {

struct ThreadBuffers {
  void* ptr[static_cast<int>(BufferSlot::kCount)] = {};
  size_t cap[static_cast<int>(BufferSlot::kCount)] = {};
  ~ThreadBuffers() {
    for (void* p : ptr) std::free(p);
  }
};

thread_local ThreadBuffers tls_buffers;

}  // namespace

void* thread_buffer(BufferSlot slot, size_t size) {
  const int i = static_cast<int>(slot);
  ThreadBuffers& b = tls_buffers;
  if (b.cap[i] >= size && b.ptr[i]) return b.ptr[i];
  // Grow to the next power of two of at least 128 KiB so a thread reallocates a few times at most.
  size_t cap = 128 * 1024;
  while (cap < size) cap <<= 1;
  void* p = nullptr;
  if (posix_memalign(&p, kBufferAlign, cap) != 0) return nullptr;
  std::free(b.ptr[i]);
  b.ptr[i] = p;
  b.cap[i] = cap;
  return p;
}

}  // namespace iofilterfs
