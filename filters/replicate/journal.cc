#include "replicate/journal.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "replicate/crc32c.h"

namespace iofilterfs::replicate {
namespace {

constexpr char kMagic[8] = {'I', 'O', 'F', 'R', 'J', 'N', 'L', '1'};

std::string errtext(const char* what, const std::string& path) {
  return std::string(what) + " " + path + ": " + std::strerror(errno);
}

uint32_t record_crc(const RecordHeader& h, const void* data) {
  RecordHeader c = h;
  c.crc = 0;
  uint32_t crc = crc32c(0, &c, sizeof c);
  return crc32c(crc, data, h.data_len);
}

}  // namespace

void make_record(RecordHeader* h, RecType type, uint64_t seq, uint64_t time_ns, uint64_t off, uint64_t len,
                 const void* data, uint32_t data_len, uint16_t flags) {
  *h = RecordHeader{};
  h->flags = flags;
  h->magic = kRecordMagic;
  h->seq = seq;
  h->time_ns = time_ns;
  h->off = off;
  h->len = len;
  h->data_len = data_len;
  h->type = static_cast<uint16_t>(type);
  h->crc = record_crc(*h, data);
}

std::string check_record(const RecordHeader& h, const void* data, uint64_t seq) {
  if (h.magic != kRecordMagic) return "bad record magic";
  if (h.seq != seq) return "sequence " + std::to_string(h.seq) + " where " + std::to_string(seq) + " was expected";
  if (h.type < 1 || h.type > 5) return "unknown record type " + std::to_string(h.type);
  const bool byref = by_reference(h);
  const bool carries =
      !byref && (h.type == static_cast<uint16_t>(RecType::Write) || h.type == static_cast<uint16_t>(RecType::Point));
  if (carries && h.data_len != h.len) return "write record length mismatch";
  if (byref && h.data_len != 0) return "by-reference write record with data";
  if (h.type == static_cast<uint16_t>(RecType::Preserve)) {
    if (h.data_len < kPreserveHead || h.data_len - kPreserveHead != h.len) return "preserve record length mismatch";
  } else if (!carries && h.data_len != 0) {
    return "unexpected record data";
  }
  if (record_crc(h, data) != h.crc) return "record checksum mismatch";
  return "";
}

void encode_journal_header(const JournalHeader& h, uint8_t out[64]) {
  std::memset(out, 0, 64);
  std::memcpy(out, kMagic, 8);
  const uint32_t version = 1;
  std::memcpy(out + 8, &version, 4);
  std::memcpy(out + 16, &h.ship_off, 8);
  std::memcpy(out + 24, &h.ship_seq, 8);
  std::memcpy(out + 32, &h.history_off, 8);
  std::memcpy(out + 40, &h.history_seq, 8);
  const uint32_t crc = crc32c(0, out, 64);
  std::memcpy(out + 12, &crc, 4);
}

std::string decode_journal_header(const uint8_t in[64], JournalHeader* out) {
  if (std::memcmp(in, kMagic, 8) != 0) return "not a journal (bad magic)";
  uint32_t version, crc;
  std::memcpy(&version, in + 8, 4);
  std::memcpy(&crc, in + 12, 4);
  if (version != 1) return "unknown journal version " + std::to_string(version);
  uint8_t copy[64];
  std::memcpy(copy, in, 64);
  std::memset(copy + 12, 0, 4);
  if (crc32c(0, copy, 64) != crc) return "journal header checksum mismatch";
  JournalHeader h;
  std::memcpy(&h.ship_off, in + 16, 8);
  std::memcpy(&h.ship_seq, in + 24, 8);
  std::memcpy(&h.history_off, in + 32, 8);
  std::memcpy(&h.history_seq, in + 40, 8);
  if (h.ship_off < kJournalHeader || h.ship_seq == 0 || h.history_off < kJournalHeader || h.history_seq == 0 ||
      h.history_off > h.ship_off)
    return "journal header out of range";
  *out = h;
  return "";
}

ScanResult scan_journal(const ReadAt& read, uint64_t off, uint64_t seq,
                        const std::function<bool(const RecordHeader&, const uint8_t* data, uint64_t at)>& on_record) {
  ScanResult r;
  r.end = off;
  r.next_seq = seq;
  std::vector<uint8_t> data;
  for (;;) {
    RecordHeader h;
    const long n = read(r.end, &h, sizeof h);
    if (n == 0) return r;  // clean end
    if (n < 0) {
      r.stopped = "read error";
      return r;
    }
    if (static_cast<size_t>(n) < sizeof h) {
      r.stopped = "torn record header";
      return r;
    }
    if (h.magic != kRecordMagic) {
      r.stopped = "bad record magic";
      return r;
    }
    if (h.data_len > kMaxRecordData) {
      r.stopped = "record length out of range";
      return r;
    }
    data.resize(h.data_len);
    if (h.data_len && read(r.end + sizeof h, data.data(), h.data_len) != static_cast<long>(h.data_len)) {
      r.stopped = "torn record data";
      return r;
    }
    std::string e = check_record(h, data.data(), r.next_seq);
    if (!e.empty()) {
      r.stopped = e;
      r.stale = h.magic == kRecordMagic && h.seq < r.next_seq;
      return r;
    }
    const uint64_t at = r.end;
    r.end += sizeof h + h.data_len;
    r.next_seq++;
    r.records++;
    if (on_record && !on_record(h, data.data(), at)) return r;
  }
}

std::string Journal::open(const std::string& path, std::unique_ptr<Journal>* out, std::string* note) {
  std::unique_ptr<Journal> j(new Journal());
  j->path_ = path;
  j->fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (j->fd_ < 0) return errtext("cannot open", path);
  struct stat st;
  if (::fstat(j->fd_, &st) != 0) return errtext("cannot stat", path);
  uint8_t head[64] = {};
  bool fresh = st.st_size == 0;
  if (!fresh) {
    if (::pread(j->fd_, head, 64, 0) != 64) {
      *note = path + ": the header is torn; starting an empty journal";
      fresh = true;
    } else {
      std::string e = decode_journal_header(head, &j->hdr_);
      if (!e.empty()) {
        // Only the ship point is lost: replay from the first record (resending is harmless).
        *note = path + ": " + e + "; replaying from the first record";
        j->hdr_ = JournalHeader{};
        RecordHeader first;
        if (::pread(j->fd_, &first, sizeof first, kJournalHeader) == static_cast<ssize_t>(sizeof first) &&
            first.magic == kRecordMagic)
          j->hdr_.ship_seq = j->hdr_.history_seq = first.seq;
      }
    }
  }
  if (fresh) {
    j->hdr_ = JournalHeader{};
    if (::ftruncate(j->fd_, 0) != 0) return errtext("cannot truncate", path);
    encode_journal_header(j->hdr_, head);
    if (::pwrite(j->fd_, head, 64, 0) != 64 || ::ftruncate(j->fd_, kJournalHeader) != 0 || ::fdatasync(j->fd_) != 0)
      return errtext("cannot write", path);
  }
  const int fd = j->fd_;
  ScanResult r = scan_journal(
      [fd](uint64_t off, void* buf, size_t len) -> long {
        size_t got = 0;
        while (got < len) {
          ssize_t n = ::pread(fd, static_cast<uint8_t*>(buf) + got, len - got, static_cast<off_t>(off + got));
          if (n < 0 && errno == EINTR) continue;
          if (n < 0) return -1;
          if (n == 0) break;
          got += static_cast<size_t>(n);
        }
        return static_cast<long>(got);
      },
      j->hdr_.ship_off, j->hdr_.ship_seq, nullptr);
  if (!::fstat(fd, &st) && static_cast<uint64_t>(st.st_size) > r.end) {
    // What follows the last sound record is a torn append, or what is left of the records of
    // a cycle before the last reset (kept pages): a lower sequence number says the latter.
    if (note->empty() && !r.stale)
      *note = path + ": cut " + std::to_string(static_cast<uint64_t>(st.st_size) - r.end) +
              " bytes after the last sound record (" + r.stopped + "; a torn append or an earlier cycle's records) after " +
              std::to_string(r.records) + " records";
    if (::ftruncate(fd, static_cast<off_t>(r.end)) != 0) return errtext("cannot truncate", path);
  }
  j->end_.store(r.end);
  j->reserved_ = j->done_to_ = r.end;
  j->synced_.store(kJournalHeader);
  j->next_seq_ = j->end_seq_ = r.next_seq;
  *out = std::move(j);
  return "";
}

Journal::~Journal() {
  if (fd_ >= 0) ::close(fd_);
}

Reservation Journal::reserve(RecType type, uint64_t time_ns, uint64_t off, uint64_t len, uint32_t data_len,
                             uint32_t data_crc, uint16_t flags) {
  Reservation r;
  RecordHeader& h = r.h;
  h.magic = kRecordMagic;
  h.seq = next_seq_++;
  h.time_ns = time_ns;
  h.off = off;
  h.len = len;
  h.data_len = data_len;
  h.type = static_cast<uint16_t>(type);
  h.flags = flags;
  h.crc = 0;
  h.crc = crc32c_combine(crc32c(0, &h, sizeof h), data_crc, data_len);
  r.at = reserved_;
  reserved_ += sizeof h + data_len;
  std::lock_guard<std::mutex> g(pub_mu_);
  ++outstanding_;
  return r;
}

std::string Journal::commit(const Reservation& r, const void* data) {
  const size_t total = sizeof r.h + r.h.data_len;
  struct iovec iov[2] = {{const_cast<RecordHeader*>(&r.h), sizeof r.h}, {const_cast<void*>(data), r.h.data_len}};
  size_t done = 0;
  int err = 0;
  while (done < total) {
    ssize_t n;
    if (done < sizeof r.h) {
      struct iovec rest[2] = {{reinterpret_cast<uint8_t*>(iov[0].iov_base) + done, sizeof r.h - done}, iov[1]};
      n = ::pwritev(fd_, rest, r.h.data_len ? 2 : 1, static_cast<off_t>(r.at + done));
    } else {
      n = ::pwrite(fd_, static_cast<const uint8_t*>(data) + (done - sizeof r.h), total - done,
                   static_cast<off_t>(r.at + done));
    }
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = n < 0 ? errno : EIO;
      break;
    }
    done += static_cast<size_t>(n);
  }
  // Publish in order: wait for the records before this one, then move end() over it.
  std::unique_lock<std::mutex> l(pub_mu_);
  pub_cv_.wait(l, [&] { return done_to_ == r.at; });
  done_to_ = r.at + total;
  if (err) broken_.store(true, std::memory_order_release);
  if (!broken_.load(std::memory_order_relaxed)) {
    end_.store(done_to_, std::memory_order_release);
    end_seq_ = r.h.seq + 1;
  }
  --outstanding_;
  const bool broken = broken_.load(std::memory_order_relaxed);
  l.unlock();
  pub_cv_.notify_all();
  if (err) {
    errno = err;
    return errtext("cannot append to", path_);
  }
  if (broken) return path_ + ": an earlier record could not be written";
  return "";
}

std::string Journal::append(RecType type, uint64_t time_ns, uint64_t off, uint64_t len, const void* data,
                            uint32_t data_len, uint16_t flags) {
  const Reservation r = reserve(type, time_ns, off, len, data_len, crc32c(0, data, data_len), flags);
  return commit(r, data);
}

void Journal::wait_idle() {
  std::unique_lock<std::mutex> l(pub_mu_);
  pub_cv_.wait(l, [&] { return outstanding_ == 0; });
}

std::string Journal::repair() {
  wait_idle();
  std::lock_guard<std::mutex> g(pub_mu_);
  if (!broken_.load(std::memory_order_relaxed)) return "";
  const uint64_t e = end_.load(std::memory_order_relaxed);
  if (::ftruncate(fd_, static_cast<off_t>(e)) != 0) return errtext("cannot truncate", path_);
  reserved_ = done_to_ = e;
  next_seq_ = end_seq_;
  broken_.store(false, std::memory_order_release);
  return "";
}

std::string Journal::sync() {
  const uint64_t want = end();
  if (synced_.load(std::memory_order_acquire) >= want) return "";
  std::lock_guard<std::mutex> g(sync_mu_);
  if (synced_.load(std::memory_order_acquire) >= want) return "";  // the fdatasync we waited for had it
  const uint64_t covers = end();
  if (::fdatasync(fd_) != 0) return errtext("cannot sync", path_);
  synced_.store(covers, std::memory_order_release);
  return "";
}

std::string Journal::read_header(uint64_t at, RecordHeader* h) {
  if (::pread(fd_, h, sizeof *h, static_cast<off_t>(at)) != static_cast<ssize_t>(sizeof *h))
    return errtext("cannot read", path_);
  if (h->magic != kRecordMagic || h->data_len > kMaxRecordData) return path_ + ": bad record at " + std::to_string(at);
  return "";
}

std::string Journal::read(uint64_t at, RecordHeader* h, std::vector<uint8_t>* data) {
  if (::pread(fd_, h, sizeof *h, static_cast<off_t>(at)) != static_cast<ssize_t>(sizeof *h))
    return errtext("cannot read", path_);
  if (h->magic != kRecordMagic || h->data_len > kMaxRecordData) return path_ + ": bad record at " + std::to_string(at);
  data->resize(h->data_len);
  size_t got = 0;
  while (got < h->data_len) {
    ssize_t n = ::pread(fd_, data->data() + got, h->data_len - got, static_cast<off_t>(at + sizeof *h + got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return errtext("cannot read", path_);
    got += static_cast<size_t>(n);
  }
  return "";
}

std::string Journal::headers(uint64_t from, const std::function<void(const RecordHeader&)>& fn) {
  const uint64_t end = end_.load(std::memory_order_acquire);
  RecordHeader h;
  while (from < end) {
    if (::pread(fd_, &h, sizeof h, static_cast<off_t>(from)) != static_cast<ssize_t>(sizeof h))
      return errtext("cannot read", path_);
    if (h.magic != kRecordMagic || h.data_len > kMaxRecordData) return path_ + ": bad record at " + std::to_string(from);
    fn(h);
    from += sizeof h + h.data_len;
  }
  return "";
}

std::string Journal::set_shipped(uint64_t off, uint64_t seq) {
  JournalHeader h = hdr_;
  h.ship_off = off;
  h.ship_seq = seq;
  uint8_t head[64];
  encode_journal_header(h, head);
  if (::pwrite(fd_, head, 64, 0) != 64 || ::fdatasync(fd_) != 0) return errtext("cannot write the header of", path_);
  hdr_ = h;
  return "";
}

std::string Journal::drop_history(uint64_t off, uint64_t seq) {
  if (off <= hdr_.history_off) return "";
  JournalHeader h = hdr_;
  h.history_off = off;
  h.history_seq = seq;
  uint8_t head[64];
  encode_journal_header(h, head);
  if (::pwrite(fd_, head, 64, 0) != 64 || ::fdatasync(fd_) != 0) return errtext("cannot write the header of", path_);
  const uint64_t from = hdr_.history_off;
  hdr_ = h;
  if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(from),
                  static_cast<off_t>(off - from)) != 0 && errno != EOPNOTSUPP)
    return errtext("cannot punch", path_);
  return "";
}

std::string Journal::reset() {
  wait_idle();  // no record may land after the cut
  std::lock_guard<std::mutex> sg(sync_mu_);
  JournalHeader h{kJournalHeader, next_seq_, kJournalHeader, next_seq_};
  uint8_t head[64];
  encode_journal_header(h, head);
  if (::pwrite(fd_, head, 64, 0) != 64 || ::fdatasync(fd_) != 0) return errtext("cannot write the header of", path_);
  // The file keeps up to kKeepBytes: the next records overwrite pages the file already has
  // (allocating and freeing them for every cycle cost more than writing them, on tmpfs most of
  // all). What they do not overwrite is stale: those records' sequence numbers are below the
  // header's ship_seq, so a replay stops at the first of them (and open() cuts it off).
  struct stat st;
  if (::fstat(fd_, &st) != 0) return errtext("cannot stat", path_);
  if (static_cast<uint64_t>(st.st_size) > kKeepBytes && ::ftruncate(fd_, static_cast<off_t>(kKeepBytes)) != 0)
    return errtext("cannot truncate", path_);
  hdr_ = h;
  reserved_ = kJournalHeader;
  {
    std::lock_guard<std::mutex> g(pub_mu_);
    done_to_ = kJournalHeader;
    end_seq_ = next_seq_;
    broken_.store(false, std::memory_order_release);
    end_.store(kJournalHeader, std::memory_order_release);
  }
  synced_.store(kJournalHeader, std::memory_order_release);
  return "";
}

}  // namespace iofilterfs::replicate
