#include "cache/format.h"

#include <cstring>

namespace iofilterfs::cache {
namespace {

const char kMagic[8] = {'I', 'O', 'F', 'C', 'A', 'C', 'H', '1'};
constexpr size_t kMaxImage = 1024;

struct Crc32cTable {
  uint32_t t[256];
  Crc32cTable() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
  }
};
const Crc32cTable kCrc;

void put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t get32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = v << 8 | p[i];
  return v;
}
uint64_t get64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | p[i];
  return v;
}

}  // namespace

uint32_t crc32c(const void* data, size_t len, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < len; ++i) crc = kCrc.t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t PageMask::count() const {
  uint32_t n = 0;
  for (uint64_t x : w) n += static_cast<uint32_t>(__builtin_popcountll(x));
  return n;
}

uint64_t Header::data_offset_for(uint32_t slots) {
  const uint64_t end = kHeaderSize + uint64_t(slots) * kRecordSize;
  return (end + 4095) & ~uint64_t(4095);
}

// Header layout: magic 0..8, version 8, block 12, slots 16, flags 20, table 24, data 32,
// key check 40..72, image length 72, image 76..1100, boot id length 1100, boot id 1104..1144,
// CRC at 4092.
void encode_header(const Header& h, uint8_t* out) {
  std::memset(out, 0, kHeaderSize);
  std::memcpy(out, kMagic, 8);
  put32(out + 8, h.version);
  put32(out + 12, h.block_size);
  put32(out + 16, h.slots);
  put32(out + 20, h.encrypted ? 1 : 0);
  put64(out + 24, h.table_offset);
  put64(out + 32, h.data_offset);
  std::memcpy(out + 40, h.key_check.data(), 32);
  const size_t n = h.image.size() < kMaxImage ? h.image.size() : kMaxImage;
  put32(out + 72, static_cast<uint32_t>(n));
  std::memcpy(out + 76, h.image.data(), n);
  const size_t b = h.boot_id.size() < 40 ? h.boot_id.size() : 40;
  put32(out + 1100, static_cast<uint32_t>(b));
  std::memcpy(out + 1104, h.boot_id.data(), b);
  put32(out + kHeaderSize - 4, crc32c(out, kHeaderSize - 4));
}

std::string decode_header(const uint8_t* in, Header* h) {
  if (std::memcmp(in, kMagic, 8) != 0) return "not an iofilterfs cache file (no IOFCACH1 magic)";
  if (get32(in + kHeaderSize - 4) != crc32c(in, kHeaderSize - 4)) return "the cache file's header checksum is wrong";
  Header r;
  r.version = get32(in + 8);
  if (r.version != kFormatVersion) return "cache file format version " + std::to_string(r.version) + " is not 1";
  r.block_size = get32(in + 12);
  r.slots = get32(in + 16);
  r.encrypted = get32(in + 20) & 1;
  r.table_offset = get64(in + 24);
  r.data_offset = get64(in + 32);
  std::memcpy(r.key_check.data(), in + 40, 32);
  const uint32_t n = get32(in + 72);
  if (n > kMaxImage) return "the cache file's header is damaged (image name length)";
  r.image.assign(reinterpret_cast<const char*>(in + 76), n);
  const uint32_t b = get32(in + 1100);
  if (b > 40) return "the cache file's header is damaged (boot id length)";
  r.boot_id.assign(reinterpret_cast<const char*>(in + 1104), b);
  if (r.block_size < kPage || r.block_size > kPage * kMaxPagesPerBlock || r.block_size % kPage)
    return "the cache file's block size is invalid";
  if (r.table_offset != kHeaderSize || r.data_offset != Header::data_offset_for(r.slots))
    return "the cache file's layout is damaged";
  *h = r;
  return "";
}

// Record layout: seq 0, block 8, size 16, slot 24, flags 28, valid 32..64, dirty 64..96,
// CRC at 124 over 0..124.
void encode_record(const Record& r, uint8_t* out) {
  std::memset(out, 0, kRecordSize);
  put64(out, r.seq);
  put64(out + 8, r.block);
  put64(out + 16, r.size);
  put32(out + 24, r.slot);
  put32(out + 28, r.flags);
  for (int i = 0; i < 4; ++i) {
    put64(out + 32 + 8 * i, r.valid.w[i]);
    put64(out + 64 + 8 * i, r.dirty.w[i]);
  }
  put32(out + kRecordSize - 4, crc32c(out, kRecordSize - 4));
}

RecordState decode_record(const uint8_t* in, Record* r) {
  bool zero = true;
  for (size_t i = 0; i < kRecordSize && zero; ++i) zero = in[i] == 0;
  if (zero) return RecordState::Empty;
  if (get32(in + kRecordSize - 4) != crc32c(in, kRecordSize - 4)) return RecordState::Corrupt;
  r->seq = get64(in);
  r->block = get64(in + 8);
  r->size = get64(in + 16);
  r->slot = get32(in + 24);
  r->flags = get32(in + 28);
  for (int i = 0; i < 4; ++i) {
    r->valid.w[i] = get64(in + 32 + 8 * i);
    r->dirty.w[i] = get64(in + 64 + 8 * i);
  }
  return RecordState::Ok;
}

std::string cache_file_name(const std::string& image) {
  std::string o;
  for (char c : image) {
    if (c == '/') o += "%2F";
    else if (c == '%') o += "%25";
    else o += c;
  }
  return o + ".iofcache";
}

}  // namespace iofilterfs::cache
