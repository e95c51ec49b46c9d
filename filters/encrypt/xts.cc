#include "xts.h"

#include <atomic>
#include <cstring>

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

bool crypt(EVP_CIPHER_CTX* ctx, const uint8_t* in, uint8_t* out, uint64_t sector) {
  uint8_t iv[16] = {};
  for (int b = 0; b < 8; ++b) iv[b] = static_cast<uint8_t>(sector >> (8 * b));
  int outl = 0;
  return EVP_CipherInit_ex(ctx, nullptr, nullptr, nullptr, iv, -1) == 1 &&
         EVP_CipherUpdate(ctx, out, &outl, in, static_cast<int>(XtsKey::kSector)) == 1;
}

}  // namespace

std::shared_ptr<XtsKey> XtsKey::create(const SecureBytes& key) {
  std::shared_ptr<XtsKey> k(new XtsKey());
  k->cipher_ = key.size() == 64 ? EVP_aes_256_xts() : key.size() == 32 ? EVP_aes_128_xts() : nullptr;
  if (!k->cipher_) return nullptr;
  k->key_ = SecureBytes(key.data(), key.size());
  k->id_ = g_next_id.fetch_add(1);
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
  bool ok = p->enc && p->dec && EVP_CipherInit_ex(p->enc, cipher_, nullptr, key_.data(), nullptr, 1) == 1 &&
            EVP_CipherInit_ex(p->dec, cipher_, nullptr, key_.data(), nullptr, 0) == 1;
  if (!ok) {
    EVP_CIPHER_CTX_free(p->enc);
    EVP_CIPHER_CTX_free(p->dec);
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
  }
  all_.clear();
  free_.clear();
  key_.clear();
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

bool XtsKey::encrypt(const uint8_t* in, uint8_t* out, size_t n, uint64_t sector) {
  Pair* p = pair_for_this_thread();
  if (!p) return false;
  for (size_t i = 0; i < n; ++i)
    if (!crypt(p->enc, in + i * kSector, out + i * kSector, sector + i)) return false;
  return true;
}

bool XtsKey::decrypt(const uint8_t* in, uint8_t* out, size_t n, uint64_t sector, bool holes_read_zero) {
  Pair* p = pair_for_this_thread();
  if (!p) return false;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* s = in + i * kSector;
    uint8_t* d = out + i * kSector;
    if (holes_read_zero && zero_sector(s)) {
      if (d != s) std::memset(d, 0, kSector);
      continue;
    }
    if (!crypt(p->dec, s, d, sector + i)) return false;
  }
  return true;
}

}  // namespace iofilterfs::encrypt
