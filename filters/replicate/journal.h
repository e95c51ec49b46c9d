// The replicate filter's journal (async mode): an append-only file of the disk's changes, in
// the order they were made, that a background thread ships to the target.
//
// File layout: a 4 KiB header, then records back to back.
//
//   header  0 "IOFRJNL1"  8 u32 version (1)  12 u32 crc32c of bytes 0..63 (this field zero)
//           16 u64 ship_off: the file offset of the first record the target may lack
//           24 u64 ship_seq: that record's sequence number
//           32 u64 history_off, 40 u64 history_seq: the first record kept for point-in-time
//              restore (continuous data protection; records before it are punched out)
//           48..63 zero
//   record  0 u32 magic "RJR1"   4 u32 crc32c of the 48-byte header (this field zero) + data
//           8 u64 seq (consecutive)   16 u64 time (ns since the epoch)   24 u64 offset
//           32 u64 length   40 u32 data bytes   44 u16 type   46 u16 0     48 data
//
// The header is rewritten in place (one sector) only after the target has flushed everything
// before ship_off, so a restart resends at most what had not been confirmed; resending is
// harmless because records are applied in order. Replay stops at the first record that is short,
// has a bad magic or checksum, or breaks the sequence: that is where a crash tore the tail, and
// the file is cut there. A header with a bad checksum means replay from the first record.
//
// The pure part (encode/verify/scan over a reader) is what the unit tests drive; Journal adds
// the file.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace iofilterfs::replicate {

enum class RecType : uint16_t { Write = 1, Zero = 2, Resize = 3, Point = 4 };

struct RecordHeader {
  uint32_t magic = 0;
  uint32_t crc = 0;
  uint64_t seq = 0;
  uint64_t time_ns = 0;
  uint64_t off = 0;
  uint64_t len = 0;  // Write: bytes; Zero: bytes that read as zeros; Resize: the new size (off 0);
                     // Point: the restore point's name's bytes (its data)
  uint32_t data_len = 0;
  uint16_t type = 0;
  uint16_t pad = 0;
};
static_assert(sizeof(RecordHeader) == 48);

inline constexpr uint32_t kRecordMagic = 0x31524a52;  // "RJR1"
inline constexpr uint64_t kJournalHeader = 4096;
inline constexpr uint32_t kMaxRecordData = 64u << 20;

// Fills *h for a record of `data` (data_len bytes) and computes its checksum.
void make_record(RecordHeader* h, RecType type, uint64_t seq, uint64_t time_ns, uint64_t off, uint64_t len,
                 const void* data, uint32_t data_len);
// "" when h and its data (data_len bytes) form a sound record with sequence `seq`; else why not.
std::string check_record(const RecordHeader& h, const void* data, uint64_t seq);

struct JournalHeader {
  uint64_t ship_off = kJournalHeader;
  uint64_t ship_seq = 1;
  uint64_t history_off = kJournalHeader;
  uint64_t history_seq = 1;
};
void encode_journal_header(const JournalHeader& h, uint8_t out[64]);
// "" or why the 64 bytes are not a usable header.
std::string decode_journal_header(const uint8_t in[64], JournalHeader* out);

// Reads up to len bytes at off into buf; returns the count (short at the end), or -1.
using ReadAt = std::function<long(uint64_t off, void* buf, size_t len)>;
struct ScanResult {
  uint64_t end = 0;       // the offset after the last sound record
  uint64_t next_seq = 0;  // the sequence number the next record gets
  uint64_t records = 0;
  std::string stopped;    // why the scan stopped before the end of the data ("" at a clean end)
};
// Walks records from `off` (expecting sequence `seq`), calling on_record for each sound one
// (its header and data; return false to stop early); stops at the first torn record.
ScanResult scan_journal(const ReadAt& read, uint64_t off, uint64_t seq,
                        const std::function<bool(const RecordHeader&, const uint8_t* data, uint64_t at)>& on_record);

// The journal file. Threads: append() is serialised by the caller (the filter's journal lock);
// read() may run concurrently with append() for records below end(); set_shipped() and reset()
// run on the shipping thread under the caller's journal lock.
class Journal {
 public:
  // Opens or creates PATH; scans from the header's ship point, cuts a torn tail (*note says
  // what was cut), and returns the journal ready to append after the last sound record.
  static std::string open(const std::string& path, std::unique_ptr<Journal>* out, std::string* note);
  ~Journal();

  // Appends one record (header and data in one pwritev); "" or the error.
  std::string append(RecType type, uint64_t time_ns, uint64_t off, uint64_t len, const void* data, uint32_t data_len);
  std::string sync();
  // Reads the header of the record at `at` (below end()); its data follows at at + 48.
  std::string read_header(uint64_t at, RecordHeader* h);
  // Reads the record at `at` (which must be below end()).
  std::string read(uint64_t at, RecordHeader* h, std::vector<uint8_t>* data);
  // Calls fn for the header of every record from `from` to end() (no data is read).
  std::string headers(uint64_t from, const std::function<void(const RecordHeader&)>& fn);
  // Records the ship point durably (call after the target flushed everything before it).
  std::string set_shipped(uint64_t off, uint64_t seq);
  // Everything is shipped: cut the file back to its header.
  std::string reset();
  // History before `off` (whose record has sequence `seq`) is no longer kept: the header says
  // so, then the bytes are punched out (the file keeps its offsets).
  std::string drop_history(uint64_t off, uint64_t seq);
  uint64_t history_off() const { return hdr_.history_off; }
  uint64_t history_seq() const { return hdr_.history_seq; }

  uint64_t end() const { return end_.load(std::memory_order_acquire); }
  uint64_t next_seq() const { return next_seq_; }
  uint64_t ship_off() const { return hdr_.ship_off; }
  uint64_t ship_seq() const { return hdr_.ship_seq; }
  const std::string& path() const { return path_; }
  int fd() const { return fd_; }  // for readers of records below end()

 private:
  Journal() = default;
  std::string path_;
  int fd_ = -1;
  JournalHeader hdr_;
  std::atomic<uint64_t> end_{kJournalHeader};
  uint64_t next_seq_ = 1;  // under the caller's journal lock
};

}  // namespace iofilterfs::replicate
