#include "replicate/bitmap.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "replicate/crc32c.h"

namespace iofilterfs::replicate {
namespace {

constexpr char kMagic[8] = {'I', 'O', 'F', 'R', 'B', 'M', 'A', 'P'};
constexpr size_t kHeader = 40;

template <typename T>
void put(std::string* s, size_t at, T v) {
  std::memcpy(s->data() + at, &v, sizeof v);
}
template <typename T>
T get(std::string_view s, size_t at) {
  T v;
  std::memcpy(&v, s.data() + at, sizeof v);
  return v;
}

std::string errtext(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

}  // namespace

AtomicBits::AtomicBits() : chunks_(new std::atomic<std::atomic<uint64_t>*>[kChunks]) {
  for (uint64_t i = 0; i < kChunks; ++i) chunks_[i].store(nullptr, std::memory_order_relaxed);
}

AtomicBits::~AtomicBits() {
  for (uint64_t i = 0; i < kChunks; ++i) delete[] chunks_[i].load(std::memory_order_relaxed);
}

std::atomic<uint64_t>* AtomicBits::chunk(uint64_t c, bool create) const {
  std::atomic<uint64_t>* p = chunks_[c].load(std::memory_order_acquire);
  if (p || !create) return p;
  auto* fresh = new std::atomic<uint64_t>[kChunkWords];
  for (uint64_t i = 0; i < kChunkWords; ++i) fresh[i].store(0, std::memory_order_relaxed);
  if (chunks_[c].compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return fresh;
  delete[] fresh;  // another thread won the race; p is its chunk
  return p;
}

bool AtomicBits::set(uint64_t i) {
  if (i >= kCapacity) return false;
  const uint64_t w = i / 64, m = uint64_t(1) << (i % 64);
  std::atomic<uint64_t>* c = chunk(w / kChunkWords, true);
  const bool was_clear = !(c[w % kChunkWords].fetch_or(m, std::memory_order_seq_cst) & m);
  if (was_clear) count_.fetch_add(1, std::memory_order_relaxed);
  return was_clear;
}

bool AtomicBits::clear(uint64_t i) {
  if (i >= kCapacity) return false;
  const uint64_t w = i / 64, m = uint64_t(1) << (i % 64);
  std::atomic<uint64_t>* c = chunk(w / kChunkWords, false);
  if (!c) return false;
  const bool was_set = c[w % kChunkWords].fetch_and(~m, std::memory_order_seq_cst) & m;
  if (was_set) count_.fetch_sub(1, std::memory_order_relaxed);
  return was_set;
}

bool AtomicBits::test(uint64_t i) const {
  if (i >= kCapacity) return false;
  const uint64_t w = i / 64;
  std::atomic<uint64_t>* c = chunk(w / kChunkWords, false);
  return c && (c[w % kChunkWords].load(std::memory_order_seq_cst) >> (i % 64) & 1);
}

uint64_t AtomicBits::next(uint64_t from) const {
  if (from >= kCapacity) return npos;
  uint64_t w = from / 64;
  uint64_t mask = ~uint64_t(0) << (from % 64);
  while (w < kChunks * kChunkWords) {
    std::atomic<uint64_t>* c = chunk(w / kChunkWords, false);
    if (!c) {
      w = (w / kChunkWords + 1) * kChunkWords;
      mask = ~uint64_t(0);
      continue;
    }
    const uint64_t end = (w / kChunkWords + 1) * kChunkWords;
    for (; w < end; ++w) {
      const uint64_t v = c[w % kChunkWords].load(std::memory_order_seq_cst) & mask;
      mask = ~uint64_t(0);
      if (v) return w * 64 + static_cast<uint64_t>(__builtin_ctzll(v));
    }
  }
  return npos;
}

void AtomicBits::clear_all() {
  for (uint64_t c = 0; c < kChunks; ++c) {
    std::atomic<uint64_t>* p = chunk(c, false);
    if (!p) continue;
    for (uint64_t i = 0; i < kChunkWords; ++i) {
      const uint64_t v = p[i].exchange(0, std::memory_order_seq_cst);
      if (v) count_.fetch_sub(static_cast<uint64_t>(__builtin_popcountll(v)), std::memory_order_relaxed);
    }
  }
}

void AtomicBits::words(std::vector<std::pair<uint64_t, uint64_t>>* out) const {
  out->clear();
  for (uint64_t c = 0; c < kChunks; ++c) {
    std::atomic<uint64_t>* p = chunk(c, false);
    if (!p) continue;
    for (uint64_t i = 0; i < kChunkWords; ++i) {
      const uint64_t v = p[i].load(std::memory_order_seq_cst);
      if (v) out->emplace_back(c * kChunkWords + i, v);
    }
  }
}

void AtomicBits::assign(const std::vector<std::pair<uint64_t, uint64_t>>& words) {
  clear_all();
  for (const auto& [idx, v] : words) {
    if (idx >= kChunks * kChunkWords) continue;
    chunk(idx / kChunkWords, true)[idx % kChunkWords].store(v, std::memory_order_relaxed);
    count_.fetch_add(static_cast<uint64_t>(__builtin_popcountll(v)), std::memory_order_relaxed);
  }
}

std::string encode_bitmap(const BitmapImage& img) {
  std::string s(kHeader + img.words.size() * 16, '\0');
  std::memcpy(s.data(), kMagic, 8);
  put<uint32_t>(&s, 8, 1);
  put<uint32_t>(&s, 12, img.region_shift);
  put<uint64_t>(&s, 16, img.target_id);
  put<uint64_t>(&s, 24, img.words.size());
  size_t at = kHeader;
  for (const auto& [idx, v] : img.words) {
    put<uint64_t>(&s, at, idx);
    put<uint64_t>(&s, at + 8, v);
    at += 16;
  }
  put<uint32_t>(&s, 32, crc32c(0, s.data(), s.size()));
  return s;
}

std::string decode_bitmap(std::string_view b, BitmapImage* out) {
  if (b.size() < kHeader) return "the file is shorter than its header (" + std::to_string(b.size()) + " bytes)";
  if (std::memcmp(b.data(), kMagic, 8) != 0) return "not a bitmap file (bad magic)";
  if (get<uint32_t>(b, 8) != 1) return "unknown bitmap version " + std::to_string(get<uint32_t>(b, 8));
  const uint64_t n = get<uint64_t>(b, 24);
  if (n > (b.size() - kHeader) / 16 || kHeader + n * 16 != b.size())
    return "the file's length does not match its " + std::to_string(n) + " entries";
  std::string copy(b);
  put<uint32_t>(&copy, 32, 0);
  if (crc32c(0, copy.data(), copy.size()) != get<uint32_t>(b, 32)) return "checksum mismatch";
  BitmapImage img;
  img.region_shift = get<uint32_t>(b, 12);
  img.target_id = get<uint64_t>(b, 16);
  img.words.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t idx = get<uint64_t>(b, kHeader + i * 16), v = get<uint64_t>(b, kHeader + i * 16 + 8);
    if (!img.words.empty() && idx <= img.words.back().first) return "entries out of order";
    if (v) img.words.emplace_back(idx, v);
  }
  *out = std::move(img);
  return "";
}

uint64_t target_id_of(std::string_view spec) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : spec) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

PersistentBitmap::PersistentBitmap(std::string path, uint32_t region_shift, uint64_t target_id)
    : path_(std::move(path)), shift_(region_shift), target_id_(target_id) {}

std::string PersistentBitmap::load(bool* found, std::string* note) {
  *found = false;
  int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return "";
    return errtext("cannot open", path_);
  }
  std::string data;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::string e = errtext("cannot read", path_);
      ::close(fd);
      return e;
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  BitmapImage img;
  std::string err = decode_bitmap(data, &img);
  if (!err.empty()) {
    *note = path_ + ": " + err;
    return "";
  }
  if (img.region_shift != shift_) {
    *note = path_ + ": written for " + std::to_string(uint64_t(1) << img.region_shift) + "-byte regions, not " +
            std::to_string(uint64_t(1) << shift_);
    return "";
  }
  if (img.target_id != target_id_) {
    *note = path_ + ": written for another target";
    return "";
  }
  bits_.assign(img.words);
  *found = true;
  return "";
}

std::string PersistentBitmap::save() {
  const uint64_t ticket = want_.fetch_add(1, std::memory_order_seq_cst) + 1;
  std::lock_guard<std::mutex> g(save_mu_);
  if (done_ >= ticket) return "";  // a save that started after our change has finished
  const uint64_t upto = want_.load(std::memory_order_seq_cst);
  BitmapImage img;
  img.region_shift = shift_;
  img.target_id = target_id_;
  bits_.words(&scratch_);
  img.words.swap(scratch_);
  buf_ = encode_bitmap(img);
  img.words.swap(scratch_);
  const std::string tmp = path_ + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return errtext("cannot create", tmp);
  size_t off = 0;
  while (off < buf_.size()) {
    ssize_t n = ::write(fd, buf_.data() + off, buf_.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::string e = errtext("cannot write", tmp);
      ::close(fd);
      return e;
    }
    off += static_cast<size_t>(n);
  }
  if (::fdatasync(fd) != 0) {
    std::string e = errtext("cannot sync", tmp);
    ::close(fd);
    return e;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path_.c_str()) != 0) return errtext("cannot rename onto", path_);
  const size_t slash = path_.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path_.substr(0, slash));
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
  done_ = upto;
  saves_.fetch_add(1, std::memory_order_relaxed);
  return "";
}

}  // namespace iofilterfs::replicate
