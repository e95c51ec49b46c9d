// The replicate filter's dirty bitmap: one bit per region of the disk (64 KiB by default) that
// says "the replica may differ here" — DRBD's changed-block tracking.
//
// In memory the bits are atomic words in lazily allocated chunks (a 10 GiB disk touches a few
// KiB; the address space covers 2^34 regions), so writers set bits without a lock. A bit is set,
// and made durable, *before* the write it covers goes anywhere, and cleared only after the
// replica has acknowledged that region (the filter's cleaner re-checks after clearing, see
// replicate_filter.h). So after any crash, the bits on disk cover every region the replica may
// lack: a restart resends those regions and nothing else — never a silent full copy, never a gap.
//
// The file holds only the non-zero words, so saving costs what is dirty, not the disk's size:
//
//   0  "IOFRBMAP"   8  u32 version (1)   12 u32 region shift   16 u64 target id
//   24 u64 n        32 u32 crc32c of the header (crc field zero) and the entries   36 u32 0
//   40 n entries of { u64 word index, u64 word }                  (little-endian, as the host)
//
// A file is written whole to NAME.tmp, fdatasync'ed, renamed over NAME, and the directory
// synced: a torn save leaves the previous file. The target id names the replica the bits are
// relative to; a different target means nothing is known about it (a full initial sync).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace iofilterfs::replicate {

class AtomicBits {
 public:
  static constexpr uint64_t kChunkWords = 4096;
  static constexpr uint64_t kChunks = 65536;
  static constexpr uint64_t kCapacity = kChunks * kChunkWords * 64;  // bits
  static constexpr uint64_t npos = ~uint64_t(0);

  AtomicBits();
  ~AtomicBits();
  AtomicBits(const AtomicBits&) = delete;
  AtomicBits& operator=(const AtomicBits&) = delete;

  // True when the bit was clear before. Bits at or past kCapacity are never set (false).
  bool set(uint64_t i);
  // True when the bit was set before.
  bool clear(uint64_t i);
  bool test(uint64_t i) const;
  // The first set bit at or after `from`, or npos.
  uint64_t next(uint64_t from) const;
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }
  void clear_all();
  // The non-zero words, in index order (a moment's picture: concurrent changes may or may not
  // be in it).
  void words(std::vector<std::pair<uint64_t, uint64_t>>* out) const;
  // Replaces every bit with `words` (index, bits); not concurrent with other calls.
  void assign(const std::vector<std::pair<uint64_t, uint64_t>>& words);

 private:
  std::atomic<uint64_t>* chunk(uint64_t c, bool create) const;
  std::unique_ptr<std::atomic<std::atomic<uint64_t>*>[]> chunks_;
  std::atomic<uint64_t> count_{0};
};

struct BitmapImage {
  uint32_t region_shift = 16;
  uint64_t target_id = 0;
  std::vector<std::pair<uint64_t, uint64_t>> words;  // (word index, non-zero bits), ascending
};
// The file's bytes for `img`.
std::string encode_bitmap(const BitmapImage& img);
// Parses a file; "" or why it cannot be used (short, bad magic, version, checksum, order).
std::string decode_bitmap(std::string_view bytes, BitmapImage* out);

// A stable 64-bit id of a target spec (FNV-1a), for BitmapImage::target_id.
uint64_t target_id_of(std::string_view spec);

// The bits and their file. Threads: set/clear/test from any thread; save() serialises itself
// and coalesces: a caller whose change is already in a save that finished returns at once.
class PersistentBitmap {
 public:
  PersistentBitmap(std::string path, uint32_t region_shift, uint64_t target_id);

  // Reads the file. *found: it existed and was usable for this target and region size.
  // A missing file is not an error; a corrupt one or one for another target/size is reported
  // in *note and treated as absent (the caller then assumes every region differs).
  std::string load(bool* found, std::string* note);
  // Makes every change made before the call durable.
  std::string save();
  // Removes the file (the filter is being retired from the image for good).
  const std::string& path() const { return path_; }

  AtomicBits& bits() { return bits_; }
  const AtomicBits& bits() const { return bits_; }
  uint32_t region_shift() const { return shift_; }
  uint64_t saves() const { return saves_.load(std::memory_order_relaxed); }

 private:
  std::string path_;
  uint32_t shift_;
  uint64_t target_id_;
  AtomicBits bits_;
  std::atomic<uint64_t> want_{0};  // bumped by each save() caller before it waits
  std::mutex save_mu_;
  uint64_t done_ = 0;                                   // under save_mu_: the last ticket saved
  std::vector<std::pair<uint64_t, uint64_t>> scratch_;  // under save_mu_
  std::string buf_;                                     // under save_mu_
  std::atomic<uint64_t> saves_{0};
};

}  // namespace iofilterfs::replicate
