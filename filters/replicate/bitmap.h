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
// The file is a dense array of 4 KiB pages, so saving a newly set bit is one pwrite of its page
// and one fdatasync (no rename, no rewrite of the whole map):
//
//   page 0 (header)  0 "IOFRBMAP"  8 u32 version (2)  12 u32 region shift  16 u64 target id
//                    24 u32 crc32c of bytes 0..23                           rest zero
//   page 1+i         511 u64 words: the bits of regions i*32704 .. i*32704+32703
//                    4088 u32 page index i   4092 u32 crc32c of bytes 0..4091
//
// (little-endian, as the host). A page of all zeros was never written (the file is sparse).
// A page whose checksum fails (a write torn by power loss) is read as all ones: its regions are
// resent, which costs time but never leaves a gap. The target id names the replica the bits
// are relative to; a different target means nothing is known about it (a full initial sync).
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
  // The 64 bits of word w (bits w*64 .. w*64+63).
  uint64_t word(uint64_t w) const;
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

inline constexpr size_t kBitmapPage = 4096;
inline constexpr uint64_t kPageWords = 511;
inline constexpr uint64_t kPageBits = kPageWords * 64;  // 32704

struct BitmapHeader {
  uint32_t region_shift = 16;
  uint64_t target_id = 0;
};
void encode_bitmap_header(const BitmapHeader& h, uint8_t out[kBitmapPage]);
// "" or why the page is not a usable header.
std::string decode_bitmap_header(const uint8_t in[kBitmapPage], BitmapHeader* out);

enum class PageState { Ok, Empty, Bad };
// Page `index` holding `words` (kPageWords of them).
void encode_bitmap_page(uint64_t index, const uint64_t* words, uint8_t out[kBitmapPage]);
// Reads page `index`: Ok (words filled), Empty (never written: words zero) or Bad (torn or
// foreign: words all ones, the caller resends its regions).
PageState decode_bitmap_page(const uint8_t in[kBitmapPage], uint64_t index, uint64_t* words);

// A stable 64-bit id of a target spec (FNV-1a), for BitmapHeader::target_id.
uint64_t target_id_of(std::string_view spec);

// The bits and their file. Threads: set/clear/test from any thread; save() serialises itself
// and coalesces: one pwrite per changed page and one fdatasync serve every caller whose change
// was made before the save began.
class PersistentBitmap {
 public:
  PersistentBitmap(std::string path, uint32_t region_shift, uint64_t target_id);
  ~PersistentBitmap();

  // Opens (or creates) the file and reads it. *found: it existed and was written for this target
  // and region size. Otherwise (*note says why, when there was a file) it is started afresh.
  // *bad_pages: pages whose checksum failed (their regions are set).
  std::string load(bool* found, std::string* note, uint64_t* bad_pages);
  // Makes every change made before the call durable.
  std::string save();

  // True when the bit was clear before.
  bool set(uint64_t r);
  // True when the bit was set before.
  bool clear(uint64_t r);
  bool test(uint64_t r) const { return bits_.test(r); }
  uint64_t next(uint64_t from) const { return bits_.next(from); }
  uint64_t count() const { return bits_.count(); }

  const std::string& path() const { return path_; }
  uint32_t region_shift() const { return shift_; }
  uint64_t saves() const { return saves_.load(std::memory_order_relaxed); }
  uint64_t pages_written() const { return pages_written_.load(std::memory_order_relaxed); }

 private:
  void touch(uint64_t r);
  std::string path_;
  uint32_t shift_;
  uint64_t target_id_;
  int fd_ = -1;
  AtomicBits bits_;
  std::mutex dirty_mu_;                 // a leaf: guards dirty_pages_
  std::vector<uint64_t> dirty_pages_;   // pages changed since the last save (may repeat)
  std::atomic<uint64_t> want_{0};       // bumped by each change before its caller saves
  std::mutex save_mu_;
  uint64_t done_ = 0;                   // under save_mu_: changes up to this ticket are durable
  std::vector<uint64_t> saving_;        // under save_mu_
  std::atomic<uint64_t> saves_{0}, pages_written_{0};
};

}  // namespace iofilterfs::replicate
