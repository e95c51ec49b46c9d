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
//           32 u64 length   40 u32 data bytes   44 u16 type   46 u16 flags  48 data
//
// Under a policy that also encrypts (filter.h, AtRest), Write records hold the container's
// ciphertext of whole 512-byte sectors (offset and length are sector multiples of the payload),
// and a Zero record with kZeroSealed in its flags means "the sectors hold the encryption of
// zeros" (a zero-range), without it "a hole" (a punched range). Offsets and times are not
// sealed: they are the journal's own metadata, not guest data.
//
// The journal by reference (async mode without retention or sealing; refmap.h): a Write record
// with kByRef in its flags holds no data (data_len 0, length `len`, the checksum covers the
// header): the shipper reads those bytes from the image. Before a later change overwrites bytes
// that an unshipped by-reference record still references, their old contents are appended as a
// Preserve record (type 5): offset and length of the bytes, data = u64 sequence number of the
// record they belong to, then the bytes (data_len = 8 + len). The shipper ships a by-reference
// record from the image and its Preserve pieces, and skips Preserve records themselves; replay
// after a crash finds the pieces by scanning the unshipped records.
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
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace iofilterfs::replicate {

enum class RecType : uint16_t { Write = 1, Zero = 2, Resize = 3, Point = 4, Preserve = 5 };

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
  uint16_t flags = 0;
};
inline constexpr uint16_t kZeroSealed = 1;  // Zero records: write sealed zeros, not a hole
inline constexpr uint16_t kByRef = 2;       // Write records: no data, the bytes are read from the image
inline constexpr uint32_t kPreserveHead = 8;  // Preserve records: the owner's sequence before the bytes
static_assert(sizeof(RecordHeader) == 48);
// A Write record by reference: no data, its bytes are in the image (or in Preserve records).
inline bool by_reference(const RecordHeader& h) {
  return h.type == static_cast<uint16_t>(RecType::Write) && (h.flags & kByRef);
}

inline constexpr uint32_t kRecordMagic = 0x31524a52;  // "RJR1"
inline constexpr uint64_t kJournalHeader = 4096;
inline constexpr uint32_t kMaxRecordData = 64u << 20;
inline constexpr uint64_t kKeepBytes = 256u << 20;  // a reset journal keeps this much of its file

// Fills *h for a record of `data` (data_len bytes) and computes its checksum.
void make_record(RecordHeader* h, RecType type, uint64_t seq, uint64_t time_ns, uint64_t off, uint64_t len,
                 const void* data, uint32_t data_len, uint16_t flags = 0);
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
  bool stale = false;     // it stopped at a sound-looking record of an earlier cycle (lower sequence)
};
// Walks records from `off` (expecting sequence `seq`), calling on_record for each sound one
// (its header and data; return false to stop early); stops at the first torn record.
ScanResult scan_journal(const ReadAt& read, uint64_t off, uint64_t seq,
                        const std::function<bool(const RecordHeader&, const uint8_t* data, uint64_t at)>& on_record);

// A record's place in the journal, handed out by Journal::reserve() (see there).
struct Reservation {
  uint64_t at = 0;  // file offset of the record
  RecordHeader h;   // its header, checksum included
};

// The journal file.
//
// Appends are a group commit without a copy: a writer checksums its data with no lock held,
// then, under the caller's journal lock, reserve() gives it the next sequence number and file
// offset and checksums the 48-byte header (the two CRCs are combined); the lock is released and
// commit() writes header and data with one pwritev at that offset, concurrently with the other
// writers, and returns once every record before it is in the file too. end() — what the
// shipper, the scans and sync() see — moves only over a contiguous run of complete records, so
// a caller that goes on to write the image after commit() knows the journal has its record and
// every earlier one (a kill -9 can never leave an image write whose record replay would cut).
// sync() is a group fdatasync: a caller whose records an fdatasync already in flight covers
// waits for that one instead of issuing its own.
//
// A failed record write breaks the journal: that commit() and every later one fail (their
// writers track their regions elsewhere), end() stays before the broken record, and the journal
// is usable again after reset().
//
// Threads: reserve(), append(), set_shipped(), reset() and drop_history() under the caller's
// journal lock; commit(), sync(), read() of records below end() and the accessors from any
// thread. Internal locks (leaves, below the caller's journal lock): sync_mu_ (one fdatasync at a
// time) and pub_mu_ (publication order).
class Journal {
 public:
  // Opens or creates PATH; scans from the header's ship point, cuts a torn tail (*note says
  // what was cut), and returns the journal ready to append after the last sound record.
  static std::string open(const std::string& path, std::unique_ptr<Journal>* out, std::string* note);
  ~Journal();

  // Under the caller's lock: the next record's place, for data whose crc32c(0, data, data_len)
  // is data_crc. No I/O. Every reservation must be committed.
  Reservation reserve(RecType type, uint64_t time_ns, uint64_t off, uint64_t len, uint32_t data_len,
                      uint32_t data_crc, uint16_t flags = 0);
  // Without the caller's lock: writes the reserved record and returns once it and every earlier
  // record are in the file (not yet durable: sync()); "" or the error (this record's or an
  // earlier one's write failed: the journal is broken until reset()).
  std::string commit(const Reservation& r, const void* data);
  // reserve() and commit() in one (under the caller's lock; for rare records and tests).
  std::string append(RecType type, uint64_t time_ns, uint64_t off, uint64_t len, const void* data, uint32_t data_len,
                     uint16_t flags = 0);
  // Makes every record below end() (as it was at the call) durable; group commit (see above).
  std::string sync();
  // Under the caller's lock: waits until every reserved record is committed (or failed).
  void wait_idle();
  // Under the caller's lock, after a failed record: cuts the file after the last published
  // record, so appending can go on there (what was cut its writers tracked elsewhere), with
  // the sequence number after that record's (a scan stops at a gap in the numbers, so the
  // records appended after a repair would otherwise never be read again).
  std::string repair();
  bool broken() const { return broken_.load(std::memory_order_acquire); }
  // Reads the header of the record at `at` (below end()); its data follows at at + 48.
  std::string read_header(uint64_t at, RecordHeader* h);
  // Reads the record at `at` (which must be below end()).
  std::string read(uint64_t at, RecordHeader* h, std::vector<uint8_t>* data);
  // Calls fn for the header of every record from `from` to end() (no data is read).
  std::string headers(uint64_t from, const std::function<void(const RecordHeader&)>& fn);
  // Records the ship point durably (call after the target flushed everything before it).
  std::string set_shipped(uint64_t off, uint64_t seq);
  // Everything is shipped: start again after the header. The file keeps up to kKeepBytes of
  // its pages for the next records to overwrite (the stale records there have lower sequence
  // numbers, so no replay reads past the new ones).
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
  std::atomic<uint64_t> end_{kJournalHeader};  // after the last published record (under pub_mu_)
  uint64_t next_seq_ = 1;                      // under the caller's journal lock
  uint64_t reserved_ = kJournalHeader;         // after the last reserved record (caller's lock)
  std::mutex pub_mu_;
  std::condition_variable pub_cv_;
  uint64_t done_to_ = kJournalHeader;  // under pub_mu_: records before it are written or failed
  uint64_t end_seq_ = 1;               // under pub_mu_: the sequence number of the record at end()
  uint64_t outstanding_ = 0;           // under pub_mu_: reserved, not yet committed
  std::atomic<bool> broken_{false};    // written under pub_mu_
  std::mutex sync_mu_;
  std::atomic<uint64_t> synced_{kJournalHeader};  // records before it are durable (under sync_mu_)
};

}  // namespace iofilterfs::replicate
