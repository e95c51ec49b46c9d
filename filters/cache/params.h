// The cache filter's parameters. Validation is a pure function with precise messages.
//
//   mode: write-through      write-through (default): writes go to the cache and below, and
//                            complete when below has them; write-back: writes complete when
//                            the cache holds them and destage later; write-around: writes go
//                            below only and invalidate what the cache holds; reads are cached
//                            in every mode
//   memory: 256MiB           a RAM cache (not with device:)
//   device: /ssd/cache       a directory on fast local storage; each disk gets its own cache
//   size: 8GiB               file there of this size (device: and size: go together)
//   block: 64KiB             the cache's unit, a power of two from 4KiB to 1MiB; data inside a
//                            block is tracked per 4 KiB page
//   sequential-cutoff: 4MiB  a sequential stream bypasses the cache once it has moved this much
//                            (0: never)
//   high-watermark: 50       percent of the cache dirty at which destaging starts (write-back)
//   low-watermark: 25        ... and at which it stops
//   unsafe: false            must be true for write-back on memory: a crash loses what the
//                            cache holds (QEMU's cache=unsafe)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace YAML { class Node; }

namespace iofilterfs::cache {

enum class Mode { WriteThrough, WriteBack, WriteAround };
const char* to_string(Mode m);

struct CacheParams {
  Mode mode = Mode::WriteThrough;
  uint64_t memory = 0;   // bytes; 0 when the cache is on a device
  std::string device;    // a directory; empty for a memory cache
  uint64_t size = 0;     // bytes of the cache file per disk (device)
  uint32_t block = 64 * 1024;
  uint64_t sequential_cutoff = 4 * 1024 * 1024;
  unsigned high_watermark = 50;
  unsigned low_watermark = 25;
  bool unsafe = false;

  uint64_t capacity() const { return device.empty() ? memory : size; }
  uint32_t slots() const { return static_cast<uint32_t>(capacity() / block); }
  bool operator==(const CacheParams&) const = default;
};

inline constexpr uint64_t kMinBlocks = 16;              // the smallest cache, in blocks
inline constexpr uint64_t kMaxCapacity = 1ull << 40;    // 1 TiB

const std::vector<std::string>& cache_keys();

// FilterInfo::validate: "" or the message; *where (may be null) pointed at the offending node.
std::string validate_cache(const YAML::Node& params, YAML::Node* where);
std::string parse_cache(const YAML::Node& params, CacheParams* out, YAML::Node* where = nullptr);
// "mode=write-back device=/ssd size=8GiB block=64KiB ..."
std::string describe_cache(const CacheParams& p);

}  // namespace iofilterfs::cache
