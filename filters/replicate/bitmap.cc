#include "replicate/bitmap.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
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

uint64_t AtomicBits::word(uint64_t w) const {
  if (w >= kChunks * kChunkWords) return 0;
  std::atomic<uint64_t>* c = chunk(w / kChunkWords, false);
  return c ? c[w % kChunkWords].load(std::memory_order_seq_cst) : 0;
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

void encode_bitmap_header(const BitmapHeader& h, uint8_t out[kBitmapPage]) {
  std::memset(out, 0, kBitmapPage);
  std::memcpy(out, kMagic, 8);
  const uint32_t version = 2;
  std::memcpy(out + 8, &version, 4);
  std::memcpy(out + 12, &h.region_shift, 4);
  std::memcpy(out + 16, &h.target_id, 8);
  const uint32_t crc = crc32c(0, out, 24);
  std::memcpy(out + 24, &crc, 4);
}

std::string decode_bitmap_header(const uint8_t in[kBitmapPage], BitmapHeader* out) {
  if (std::memcmp(in, kMagic, 8) != 0) return "not a bitmap file (bad magic)";
  uint32_t version, crc;
  std::memcpy(&version, in + 8, 4);
  std::memcpy(&crc, in + 24, 4);
  if (version != 2) return "unknown bitmap version " + std::to_string(version);
  if (crc32c(0, in, 24) != crc) return "header checksum mismatch";
  BitmapHeader h;
  std::memcpy(&h.region_shift, in + 12, 4);
  std::memcpy(&h.target_id, in + 16, 8);
  *out = h;
  return "";
}

void encode_bitmap_page(uint64_t index, const uint64_t* words, uint8_t out[kBitmapPage]) {
  std::memcpy(out, words, kPageWords * 8);
  const uint32_t idx = static_cast<uint32_t>(index);
  std::memcpy(out + 4088, &idx, 4);
  const uint32_t crc = crc32c(0, out, 4092);
  std::memcpy(out + 4092, &crc, 4);
}

PageState decode_bitmap_page(const uint8_t in[kBitmapPage], uint64_t index, uint64_t* words) {
  static const uint8_t zero[kBitmapPage] = {};
  if (std::memcmp(in, zero, kBitmapPage) == 0) {
    std::memset(words, 0, kPageWords * 8);
    return PageState::Empty;
  }
  uint32_t idx, crc;
  std::memcpy(&idx, in + 4088, 4);
  std::memcpy(&crc, in + 4092, 4);
  if (idx != static_cast<uint32_t>(index) || crc32c(0, in, 4092) != crc) {
    std::memset(words, 0xff, kPageWords * 8);
    return PageState::Bad;
  }
  std::memcpy(words, in, kPageWords * 8);
  return PageState::Ok;
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

PersistentBitmap::~PersistentBitmap() {
  if (fd_ >= 0) ::close(fd_);
}

std::string PersistentBitmap::load(bool* found, std::string* note, uint64_t* bad_pages) {
  *found = false;
  *bad_pages = 0;
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd_ < 0) return errtext("cannot open", path_);
  struct stat st;
  if (::fstat(fd_, &st) != 0) return errtext("cannot stat", path_);
  alignas(8) uint8_t page[kBitmapPage];
  bool usable = false;
  if (st.st_size >= static_cast<off_t>(kBitmapPage) && ::pread(fd_, page, kBitmapPage, 0) == kBitmapPage) {
    BitmapHeader h;
    std::string e = decode_bitmap_header(page, &h);
    if (!e.empty()) *note = path_ + ": " + e;
    else if (h.region_shift != shift_)
      *note = path_ + ": written for " + std::to_string(uint64_t(1) << h.region_shift) + "-byte regions, not " +
              std::to_string(uint64_t(1) << shift_);
    else if (h.target_id != target_id_) *note = path_ + ": written for another target";
    else usable = true;
  } else if (st.st_size > 0) {
    *note = path_ + ": the file is shorter than its header";
  }
  if (!usable) {
    BitmapHeader h{shift_, target_id_};
    encode_bitmap_header(h, page);
    if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, page, kBitmapPage, 0) != kBitmapPage || ::fdatasync(fd_) != 0)
      return errtext("cannot write", path_);
    return "";
  }
  std::vector<std::pair<uint64_t, uint64_t>> words;
  uint64_t w[kPageWords];
  const uint64_t pages = static_cast<uint64_t>(st.st_size) / kBitmapPage - 1;
  for (uint64_t i = 0; i < pages; ++i) {
    ssize_t n = ::pread(fd_, page, kBitmapPage, static_cast<off_t>((i + 1) * kBitmapPage));
    if (n != static_cast<ssize_t>(kBitmapPage)) return errtext("cannot read", path_);
    const PageState ps = decode_bitmap_page(page, i, w);
    if (ps == PageState::Empty) continue;
    if (ps == PageState::Bad) ++*bad_pages;
    for (uint64_t k = 0; k < kPageWords; ++k)
      if (w[k]) words.emplace_back(i * kPageWords + k, w[k]);
  }
  bits_.assign(words);
  if (*bad_pages) *note = path_ + ": " + std::to_string(*bad_pages) + " torn pages; their regions are resent";
  *found = true;
  return "";
}

void PersistentBitmap::touch(uint64_t r) {
  std::lock_guard<std::mutex> g(dirty_mu_);
  dirty_pages_.push_back(r / kPageBits);
}

bool PersistentBitmap::set(uint64_t r) {
  if (!bits_.set(r)) return false;
  touch(r);
  want_.fetch_add(1, std::memory_order_seq_cst);
  return true;
}

bool PersistentBitmap::clear(uint64_t r) {
  if (!bits_.clear(r)) return false;
  touch(r);
  want_.fetch_add(1, std::memory_order_seq_cst);
  return true;
}

std::string PersistentBitmap::save() {
  const uint64_t ticket = want_.load(std::memory_order_seq_cst);
  std::lock_guard<std::mutex> g(save_mu_);
  if (done_ >= ticket) return "";  // a save that began after our change has finished
  if (fd_ < 0) return "the bitmap file is not open";
  const uint64_t upto = want_.load(std::memory_order_seq_cst);
  {
    std::lock_guard<std::mutex> d(dirty_mu_);
    saving_.swap(dirty_pages_);
    dirty_pages_.clear();
  }
  std::sort(saving_.begin(), saving_.end());
  saving_.erase(std::unique(saving_.begin(), saving_.end()), saving_.end());
  alignas(8) uint8_t page[kBitmapPage];
  uint64_t w[kPageWords];
  for (uint64_t p : saving_) {
    for (uint64_t k = 0; k < kPageWords; ++k) {
      const uint64_t word = p * kPageWords + k;
      const uint64_t v = bits_.word(word);
      w[k] = v;
    }
    encode_bitmap_page(p, w, page);
    if (::pwrite(fd_, page, kBitmapPage, static_cast<off_t>((p + 1) * kBitmapPage)) != static_cast<ssize_t>(kBitmapPage)) {
      std::string e = errtext("cannot write", path_);
      std::lock_guard<std::mutex> d(dirty_mu_);
      dirty_pages_.insert(dirty_pages_.end(), saving_.begin(), saving_.end());
      return e;
    }
    pages_written_.fetch_add(1, std::memory_order_relaxed);
  }
  if (::fdatasync(fd_) != 0) {
    std::string e = errtext("cannot sync", path_);
    std::lock_guard<std::mutex> d(dirty_mu_);
    dirty_pages_.insert(dirty_pages_.end(), saving_.begin(), saving_.end());
    return e;
  }
  done_ = upto;
  saves_.fetch_add(1, std::memory_order_relaxed);
  return "";
}

}  // namespace iofilterfs::replicate
