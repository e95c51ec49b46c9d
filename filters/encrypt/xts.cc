#include "xts.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>

#include <openssl/crypto.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace iofilterfs::encrypt {
namespace {

std::atomic<uint64_t> g_next_id{1};

// This thread's pairs, by key id (see xts.h).
struct Table {
  static constexpr int kEntries = 16;
  struct Entry {
    uint64_t id = 0;
    std::shared_ptr<XtsKey> key;
    XtsKey::Pair* pair = nullptr;
  };
  Entry e[kEntries];
  unsigned next = 0;
  ~Table() {
    for (Entry& x : e)
      if (x.key) x.key->release(x.pair);
  }
};
thread_local Table tls_table;

// True when all 512 bytes are zero; the first 16 bytes decide almost always.
bool zero_sector(const uint8_t* p) {
  uint64_t a, b;
  std::memcpy(&a, p, 8);
  std::memcpy(&b, p + 8, 8);
  if (a | b) return false;
  for (size_t i = 16; i < XtsKey::kSector; i += 8) {
    std::memcpy(&a, p + i, 8);
    if (a) return false;
  }
  return true;
}

// GF(2^128) multiplication by alpha of a tweak held as two little-endian 64-bit halves
// (IEEE 1619: byte 0 is least significant; the carry out of bit 127 folds back as 0x87).
inline void times_alpha(uint64_t* lo, uint64_t* hi) {
  const uint64_t carry = *hi >> 63;
  *hi = (*hi << 1) | (*lo >> 63);
  *lo = (*lo << 1) ^ (0x87 & (0 - carry));
}

// out[i] = a[i] ^ b[i] over n bytes (a multiple of 16); out may be a. SSE2 is in every x86-64.
inline void xor_into(uint8_t* out, const uint8_t* a, const uint8_t* b, size_t n) {
#if defined(__SSE2__)
  for (size_t i = 0; i < n; i += 16) {
    __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i));
    __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_xor_si128(x, y));
  }
#else
  for (size_t i = 0; i < n; i += 8) {
    uint64_t x, y;
    std::memcpy(&x, a + i, 8);
    std::memcpy(&y, b + i, 8);
    x ^= y;
    std::memcpy(out + i, &x, 8);
  }
#endif
}

}  // namespace

std::shared_ptr<XtsKey> XtsKey::create(const SecureBytes& key, Engine engine) {
  std::shared_ptr<XtsKey> k(new XtsKey());
  k->cipher_ = key.size() == 64 ? EVP_aes_256_ecb() : key.size() == 32 ? EVP_aes_128_ecb() : nullptr;
  if (!k->cipher_) return nullptr;
  // As OpenSSL's own XTS does: equal halves would make the tweak key the data key.
  if (CRYPTO_memcmp(key.data(), key.data() + key.size() / 2, key.size() / 2) == 0) return nullptr;
  k->key_ = SecureBytes(key.data(), key.size());
  k->id_ = g_next_id.fetch_add(1);
  if (engine != Engine::kPortable && aesni::available()) {
    k->schedule_mem_.resize(sizeof(aesni::Schedule) + alignof(aesni::Schedule));
    void* p = k->schedule_mem_.data();
    size_t space = k->schedule_mem_.size();
    k->schedule_ = static_cast<aesni::Schedule*>(std::align(alignof(aesni::Schedule), sizeof(aesni::Schedule), p, space));
    aesni::expand(k->key_.data(), k->key_.size(), engine == Engine::kBest && aesni::wide_available(), k->schedule_);
    return k;
  }
  // Make one pair now, so that a key OpenSSL refuses fails here and not on the first request.
  Pair* p = k->acquire();
  if (!p) return nullptr;
  k->release(p);
  return k;
}

XtsKey::~XtsKey() { revoke(); }

XtsKey::Pair* XtsKey::acquire() {
  std::lock_guard<std::mutex> g(mu_);
  if (revoked_) return nullptr;
  if (!free_.empty()) {
    Pair* p = free_.back();
    free_.pop_back();
    return p;
  }
  auto p = std::make_unique<Pair>();
  p->enc = EVP_CIPHER_CTX_new();
  p->dec = EVP_CIPHER_CTX_new();
  p->tweak = EVP_CIPHER_CTX_new();
  const size_t half = key_.size() / 2;
  bool ok = p->enc && p->dec && p->tweak &&
            EVP_CipherInit_ex(p->enc, cipher_, nullptr, key_.data(), nullptr, 1) == 1 &&
            EVP_CipherInit_ex(p->dec, cipher_, nullptr, key_.data(), nullptr, 0) == 1 &&
            EVP_CipherInit_ex(p->tweak, cipher_, nullptr, key_.data() + half, nullptr, 1) == 1 &&
            EVP_CIPHER_CTX_set_padding(p->enc, 0) == 1 && EVP_CIPHER_CTX_set_padding(p->dec, 0) == 1 &&
            EVP_CIPHER_CTX_set_padding(p->tweak, 0) == 1;
  if (!ok) {
    EVP_CIPHER_CTX_free(p->enc);
    EVP_CIPHER_CTX_free(p->dec);
    EVP_CIPHER_CTX_free(p->tweak);
    return nullptr;
  }
  all_.push_back(std::move(p));
  return all_.back().get();
}

void XtsKey::release(Pair* p) {
  std::lock_guard<std::mutex> g(mu_);
  if (!revoked_ && p) free_.push_back(p);
}

size_t XtsKey::contexts() const {
  std::lock_guard<std::mutex> g(mu_);
  return all_.size();
}

void XtsKey::revoke() {
  std::lock_guard<std::mutex> g(mu_);
  if (revoked_) return;
  revoked_ = true;
  dead_.store(true);
  for (auto& p : all_) {
    EVP_CIPHER_CTX_free(p->enc);  // frees with the key schedule wiped
    EVP_CIPHER_CTX_free(p->dec);
    EVP_CIPHER_CTX_free(p->tweak);
    OPENSSL_cleanse(p->tweaks, sizeof p->tweaks);
  }
  all_.clear();
  free_.clear();
  key_.clear();
  // Wiped, not freed: the schedule's memory goes with the XtsKey.
  if (schedule_) OPENSSL_cleanse(schedule_, sizeof *schedule_);
}

XtsKey::Pair* XtsKey::pair_for_this_thread() {
  if (dead_.load(std::memory_order_relaxed)) return nullptr;
  Table& t = tls_table;
  for (Table::Entry& x : t.e)
    if (x.id == id_) return x.pair;
  Pair* p = acquire();
  if (!p) return nullptr;
  // An empty entry, else the next one round robin; the pair it held goes back to its key.
  Table::Entry* slot = nullptr;
  for (Table::Entry& x : t.e)
    if (!x.key) {
      slot = &x;
      break;
    }
  if (!slot) slot = &t.e[t.next++ % Table::kEntries];
  if (slot->key) slot->key->release(slot->pair);
  slot->id = id_;
  slot->key = shared_from_this();
  slot->pair = p;
  return p;
}

bool XtsKey::run(bool enc, const uint8_t* in, uint8_t* out, size_t n, uint64_t sector, bool holes_read_zero) {
  if (schedule_) {
    if (dead_.load(std::memory_order_relaxed)) return false;
    if (enc) {
      aesni::encrypt(*schedule_, in, out, n, sector);
      return true;
    }
    while (n) {
      const size_t m = std::min<size_t>(n, kChunkSectors);
      uint64_t holes = 0;  // as below
      if (holes_read_zero)
        for (size_t i = 0; i < m; ++i)
          if (zero_sector(in + i * kSector)) holes |= uint64_t{1} << i;
      aesni::decrypt(*schedule_, in, out, m, sector);
      for (uint64_t h = holes; h; h &= h - 1) std::memset(out + __builtin_ctzll(h) * kSector, 0, kSector);
      in += m * kSector;
      out += m * kSector;
      sector += m;
      n -= m;
    }
    return true;
  }
  Pair* p = pair_for_this_thread();
  if (!p) return false;
  constexpr size_t kBlocks = kSector / 16;
  while (n) {
    const size_t m = std::min<size_t>(n, kChunkSectors);
    const size_t bytes = m * kSector;
    // Sectors whose ciphertext is all zeros (holes) read as zeros: noted before `in` changes.
    uint64_t holes = 0;
    if (holes_read_zero)
      for (size_t i = 0; i < m; ++i)
        if (zero_sector(in + i * kSector)) holes |= uint64_t{1} << i;
    // The first tweak of each sector: its number (plain64), encrypted with the tweak key.
    uint8_t* first = p->tweaks + kChunkSectors * kSector;  // m blocks of 16 bytes after the tweaks
    std::memset(first, 0, m * 16);
    for (size_t i = 0; i < m; ++i) {
      const uint64_t v = sector + i;
      for (int b = 0; b < 8; ++b) first[i * 16 + b] = static_cast<uint8_t>(v >> (8 * b));
    }
    int outl = 0;
    if (EVP_EncryptUpdate(p->tweak, first, &outl, first, static_cast<int>(m * 16)) != 1) return false;
    // Every block's tweak: the sector's first one, times alpha per block.
    for (size_t i = 0; i < m; ++i) {
      uint64_t lo, hi;
      std::memcpy(&lo, first + i * 16, 8);
      std::memcpy(&hi, first + i * 16 + 8, 8);
      uint8_t* t = p->tweaks + i * kSector;
      for (size_t j = 0; j < kBlocks; ++j) {
        std::memcpy(t + j * 16, &lo, 8);
        std::memcpy(t + j * 16 + 8, &hi, 8);
        times_alpha(&lo, &hi);
      }
    }
    // XEX: out = E(in ^ T) ^ T, the block cipher over the whole chunk in one call.
    xor_into(out, in, p->tweaks, bytes);
    if (EVP_CipherUpdate(enc ? p->enc : p->dec, out, &outl, out, static_cast<int>(bytes)) != 1) return false;
    xor_into(out, out, p->tweaks, bytes);
    for (uint64_t h = holes; h; h &= h - 1) std::memset(out + __builtin_ctzll(h) * kSector, 0, kSector);
    in += bytes;
    out += bytes;
    sector += m;
    n -= m;
  }
  return true;
}

bool XtsKey::encrypt(const uint8_t* in, uint8_t* out, size_t n, uint64_t sector) {
  return run(true, in, out, n, sector, false);
}

bool XtsKey::decrypt(const uint8_t* in, uint8_t* out, size_t n, uint64_t sector, bool holes_read_zero) {
  return run(false, in, out, n, sector, holes_read_zero);
}

}  // namespace iofilterfs::encrypt
