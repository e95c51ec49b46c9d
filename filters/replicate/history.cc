#include "replicate/history.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "replicate/crc32c.h"
#include "replicate/journal.h"

namespace iofilterfs::replicate {
namespace {

constexpr char kMagic[8] = {'I', 'O', 'F', 'R', 'C', 'D', 'P', '1'};

std::string errtext(const char* what, const std::string& path) {
  return std::string(what) + " " + path + ": " + std::strerror(errno);
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

long read_at(int fd, uint64_t off, void* buf, size_t len) {
  size_t got = 0;
  while (got < len) {
    ssize_t n = ::pread(fd, static_cast<uint8_t*>(buf) + got, len - got, static_cast<off_t>(off + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  return static_cast<long>(got);
}

bool write_all(int fd, const void* buf, size_t len, uint64_t off) {
  const auto* p = static_cast<const uint8_t*>(buf);
  while (len) {
    ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    off += static_cast<uint64_t>(n);
    len -= static_cast<size_t>(n);
  }
  return true;
}

// Walks the journal's kept records (from the meta's history point) under a shared lock held
// by the caller.
std::string walk(const HistoryFiles& f, const HistoryMeta& m,
                 const std::function<bool(const RecordHeader&, const uint8_t*)>& fn) {
  Fd j;
  j.fd = ::open(f.journal.c_str(), O_RDONLY | O_CLOEXEC);
  if (j.fd < 0) return errtext("cannot open", f.journal);
  const int fd = j.fd;
  ScanResult r = scan_journal([fd](uint64_t off, void* buf, size_t len) { return read_at(fd, off, buf, len); },
                              m.history_off, m.history_seq,
                              [&](const RecordHeader& h, const uint8_t* data, uint64_t) { return fn(h, data); });
  if (r.stopped == "read error") return errtext("cannot read", f.journal);
  return "";  // a torn tail ends the history (a crash mid-append): what is before it stands
}

}  // namespace

void encode_history_meta(const HistoryMeta& m, uint8_t out[64]) {
  std::memset(out, 0, 64);
  std::memcpy(out, kMagic, 8);
  std::memcpy(out + 8, &m.window_start_ns, 8);
  std::memcpy(out + 16, &m.history_off, 8);
  std::memcpy(out + 24, &m.history_seq, 8);
  std::memcpy(out + 40, &m.payload_off, 8);
  const uint32_t crc = crc32c(0, out, 64);
  std::memcpy(out + 32, &crc, 4);
}

std::string decode_history_meta(const uint8_t in[64], HistoryMeta* out) {
  if (std::memcmp(in, kMagic, 8) != 0) return "not a history file (bad magic)";
  uint8_t copy[64];
  std::memcpy(copy, in, 64);
  std::memset(copy + 32, 0, 4);
  uint32_t crc;
  std::memcpy(&crc, in + 32, 4);
  if (crc32c(0, copy, 64) != crc) return "history file checksum mismatch";
  HistoryMeta m;
  std::memcpy(&m.window_start_ns, in + 8, 8);
  std::memcpy(&m.history_off, in + 16, 8);
  std::memcpy(&m.history_seq, in + 24, 8);
  std::memcpy(&m.payload_off, in + 40, 8);
  if (m.history_off < kJournalHeader || m.history_seq == 0) return "history file out of range";
  *out = m;
  return "";
}

std::string read_history_meta(const std::string& path, HistoryMeta* out) {
  Fd fd;
  fd.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd.fd < 0) return errtext("cannot open", path);
  uint8_t b[64];
  if (read_at(fd.fd, 0, b, 64) != 64) return path + ": too short";
  std::string e = decode_history_meta(b, out);
  return e.empty() ? "" : path + ": " + e;
}

std::string write_history_meta(const std::string& path, const HistoryMeta& m) {
  uint8_t b[64];
  encode_history_meta(m, b);
  const std::string tmp = path + ".tmp";
  Fd fd;
  fd.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd.fd < 0) return errtext("cannot create", tmp);
  if (!write_all(fd.fd, b, 64, 0) || ::fdatasync(fd.fd) != 0) return errtext("cannot write", tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) return errtext("cannot rename onto", path);
  const size_t slash = path.rfind('/');
  Fd dir;
  dir.fd = ::open(slash == std::string::npos ? "." : path.substr(0, slash ? slash : 1).c_str(),
                  O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir.fd >= 0) (void)::fsync(dir.fd);
  return "";
}

std::string list_history(const HistoryFiles& f, HistoryInfo* out) {
  Fd lock;
  lock.fd = ::open(f.meta.c_str(), O_RDONLY | O_CLOEXEC);
  if (lock.fd < 0) return errtext("cannot open", f.meta);
  if (::flock(lock.fd, LOCK_SH) != 0) return errtext("cannot lock", f.meta);
  HistoryMeta m;
  std::string e = read_history_meta(f.meta, &m);
  if (!e.empty()) return e;
  HistoryInfo info;
  info.window_start_ns = m.window_start_ns;
  e = walk(f, m, [&](const RecordHeader& h, const uint8_t* data) {
    ++info.records;
    if (h.time_ns > info.last_record_ns) info.last_record_ns = h.time_ns;
    if (h.type == static_cast<uint16_t>(RecType::Point) && h.time_ns >= m.window_start_ns)
      info.points.push_back({std::string(reinterpret_cast<const char*>(data), h.data_len), h.time_ns});
    return true;
  });
  if (!e.empty()) return e;
  *out = std::move(info);
  return "";
}

std::string restore_history(const HistoryFiles& f, uint64_t at_ns, const std::string& point, const std::string& output,
                            uint64_t* applied_records) {
  *applied_records = 0;
  Fd lock;
  lock.fd = ::open(f.meta.c_str(), O_RDONLY | O_CLOEXEC);
  if (lock.fd < 0) return errtext("cannot open", f.meta);
  if (::flock(lock.fd, LOCK_SH) != 0) return errtext("cannot lock", f.meta);
  HistoryMeta m;
  std::string e = read_history_meta(f.meta, &m);
  if (!e.empty()) return e;
  uint64_t stop_seq = 0;  // with a point: apply records before this sequence number
  if (!point.empty()) {
    e = walk(f, m, [&](const RecordHeader& h, const uint8_t* data) {
      if (h.type == static_cast<uint16_t>(RecType::Point) && h.time_ns >= m.window_start_ns &&
          std::string(reinterpret_cast<const char*>(data), h.data_len) == point)
        stop_seq = h.seq;
      return true;
    });
    if (!e.empty()) return e;
    if (!stop_seq) return "no restore point named '" + point + "' in the retention window";
  } else if (at_ns < m.window_start_ns) {
    return "the moment asked for is before the oldest one kept (" + std::to_string(m.window_start_ns) +
           " ns since the epoch)";
  }
  // The base, sparsely.
  Fd base, out;
  base.fd = ::open(f.base.c_str(), O_RDONLY | O_CLOEXEC);
  if (base.fd < 0) return errtext("cannot open", f.base);
  out.fd = ::open(output.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (out.fd < 0) return errtext("cannot create", output);
  struct stat st;
  if (::fstat(base.fd, &st) != 0) return errtext("cannot stat", f.base);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (::ftruncate(out.fd, static_cast<off_t>(size)) != 0) return errtext("cannot size", output);
  std::vector<uint8_t> buf(1u << 20);
  for (uint64_t off = 0; off < size;) {
    off_t d = ::lseek(base.fd, static_cast<off_t>(off), SEEK_DATA);
    if (d < 0) break;  // ENXIO: only a hole is left
    off_t hole = ::lseek(base.fd, d, SEEK_HOLE);
    if (hole < 0) hole = static_cast<off_t>(size);
    for (uint64_t p = static_cast<uint64_t>(d); p < static_cast<uint64_t>(hole);) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), static_cast<uint64_t>(hole) - p));
      long got = read_at(base.fd, p, buf.data(), n);
      if (got <= 0) return errtext("cannot read", f.base);
      if (!write_all(out.fd, buf.data(), static_cast<size_t>(got), p)) return errtext("cannot write", output);
      p += static_cast<uint64_t>(got);
    }
    off = static_cast<uint64_t>(hole);
  }
  // Then the records, in order, up to the moment.
  // Offsets in the records are the payload's: under encryption they land past the header.
  std::string werr;
  const uint64_t po = m.payload_off;
  uint64_t cur = size;
  e = walk(f, m, [&](const RecordHeader& h, const uint8_t* data) {
    if (stop_seq ? h.seq >= stop_seq : h.time_ns > at_ns) return false;
    bool ok = true;
    // Records of the journal by reference (no data; preserved pieces) are never in a history:
    // retention keeps the copying journal, and turning it off drops the history. Refuse rather
    // than restore bytes that are not there.
    if (static_cast<RecType>(h.type) == RecType::Preserve ||
        by_reference(h)) {
      werr = "the history holds a record without its data (journal by reference): cannot restore";
      return false;
    }
    switch (static_cast<RecType>(h.type)) {
      case RecType::Write:
        ok = write_all(out.fd, data, h.data_len, po + h.off);
        if (po + h.off + h.len > cur) cur = po + h.off + h.len;
        break;
      case RecType::Zero: {
        const uint64_t end = std::min(po + h.off + h.len, cur);
        if (end > po + h.off)
          ok = ::fallocate(out.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(po + h.off),
                           static_cast<off_t>(end - po - h.off)) == 0;
        break;
      }
      case RecType::Resize:
        ok = ::ftruncate(out.fd, static_cast<off_t>(po + h.len)) == 0;
        cur = po + h.len;
        break;
      case RecType::Point:
      case RecType::Preserve: break;  // refused above
    }
    if (!ok) {
      werr = errtext("cannot write", output);
      return false;
    }
    ++*applied_records;
    return true;
  });
  if (!e.empty()) return e;
  if (!werr.empty()) return werr;
  if (::fsync(out.fd) != 0) return errtext("cannot sync", output);
  return "";
}

}  // namespace iofilterfs::replicate
