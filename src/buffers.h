// Per-thread scratch buffers for the data path.
//
// Each FUSE worker thread owns a few page-aligned buffers that grow to the largest request it
// has seen and are freed when the thread exits. Requests therefore never allocate in the
// steady state, and any buffer handed to an O_DIRECT descriptor is aligned.
#pragma once

#include <cstddef>

namespace iofilterfs {

enum class BufferSlot : int {
  Reply = 0,   // fuse_ops: the data a read replies with
  Bounce = 1,  // backing: aligned copies for O_DIRECT
  Filter = 2,  // one scratch buffer a filter may use (encryption output, ...)
  Copy = 3,    // copy_file_range bounce
  kCount = 4,
};

inline constexpr size_t kBufferAlign = 4096;

// Returns this thread's buffer for `slot`, at least `size` bytes, aligned to kBufferAlign.
// nullptr only if the allocation failed (the caller replies ENOMEM).
void* thread_buffer(BufferSlot slot, size_t size);

}  // namespace iofilterfs
