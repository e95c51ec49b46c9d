// The persistent cache file: its layout, and encoding of its header and slot records. Pure
// (bytes in, bytes out); cache_store.h does the file I/O.
//
// One cache file per disk, in the policy's `device:` directory, named after the image's path
// in the datastore ("vm1/disk.qcow2" -> "vm1%2Fdisk.qcow2.iofcache"). Layout:
//
//     0        header (4 KiB): magic "IOFCACH1", version, block and page size, slot count,
//              where the record table and the data area start, whether the data is
//              encrypted (and a key check value), the image's path, the boot id of the
//              last open; CRC32C over the rest
//     4096     record table: one 128-byte record per slot, rewritten in place whenever the
//              slot's block, valid pages or dirty pages change:
//                 seq (u64, increasing per write of any record), block (u64), size (u64: the
//                 disk's size as the cache saw it), slot (u32), flags (u32), valid page mask
//                 (256 bits), dirty page mask (256 bits), CRC32C of the record before it
//              An all-zero record is an empty slot.
//     data     slot i's block at data + i * block size; pages (4 KiB) of it are valid or not
//              per the record's mask, so a 4 KiB write needs no read of the rest of the block.
//
// A write-back write is acknowledged after its data and then its record are written to the
// file (page cache: a killed daemon loses neither); a guest flush fdatasyncs the file, so what
// was acknowledged before the flush survives a power cut too. Opening replays the records:
// each slot's record is checked (a record whose CRC fails may have held dirty data, so the
// open is refused), the highest seq wins when two slots name one block, and dirty pages are
// read back (and their readability proven) before the disk serves a request.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace iofilterfs::cache {

inline constexpr uint32_t kPage = 4096;
inline constexpr uint32_t kMaxPagesPerBlock = 256;  // 1 MiB blocks
inline constexpr size_t kHeaderSize = 4096;
inline constexpr size_t kRecordSize = 128;
inline constexpr uint32_t kFormatVersion = 1;

uint32_t crc32c(const void* data, size_t len, uint32_t crc = 0);

// A set of pages of one block.
struct PageMask {
  std::array<uint64_t, 4> w{};
  bool test(uint32_t p) const { return (w[p >> 6] >> (p & 63)) & 1; }
  void set(uint32_t p) { w[p >> 6] |= 1ull << (p & 63); }
  void set_range(uint32_t first, uint32_t end) {
    for (uint32_t p = first; p < end; ++p) set(p);
  }
  void clear_range(uint32_t first, uint32_t end) {
    for (uint32_t p = first; p < end; ++p) w[p >> 6] &= ~(1ull << (p & 63));
  }
  bool any() const { return (w[0] | w[1] | w[2] | w[3]) != 0; }
  // Whether every page of [first, end) is in the set.
  bool all_in(uint32_t first, uint32_t end) const {
    for (uint32_t p = first; p < end; ++p)
      if (!test(p)) return false;
    return true;
  }
  bool all(uint32_t pages) const {
    for (uint32_t p = 0; p < pages; ++p)
      if (!test(p)) return false;
    return true;
  }
  uint32_t count() const;
  bool operator==(const PageMask&) const = default;
};

struct Header {
  uint32_t version = kFormatVersion;
  uint32_t block_size = 0;
  uint32_t slots = 0;
  uint64_t table_offset = kHeaderSize;
  uint64_t data_offset = 0;
  bool encrypted = false;
  std::array<uint8_t, 32> key_check{};
  std::string image;    // the image's path in the datastore (at most 1024 bytes)
  std::string boot_id;  // the kernel's boot id when the file was last opened (at most 40)

  // Where the data area starts for this many slots (the table rounded up to 4 KiB).
  static uint64_t data_offset_for(uint32_t slots);
  uint64_t file_size() const { return data_offset + uint64_t(slots) * block_size; }
};

// Writes kHeaderSize bytes.
void encode_header(const Header& h, uint8_t* out);
// "" or why the bytes are no usable header.
std::string decode_header(const uint8_t* in, Header* h);

struct Record {
  uint64_t seq = 0;
  uint64_t block = 0;
  uint64_t size = 0;
  uint32_t slot = 0;
  uint32_t flags = 0;
  PageMask valid, dirty;
};

// Writes kRecordSize bytes.
void encode_record(const Record& r, uint8_t* out);
enum class RecordState { Empty, Ok, Corrupt };
RecordState decode_record(const uint8_t* in, Record* r);

// The file name of an image's cache file: '/' and '%' escaped as %2F and %25.
std::string cache_file_name(const std::string& image);

}  // namespace iofilterfs::cache
