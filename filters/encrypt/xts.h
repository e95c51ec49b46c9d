// The data path's cipher: aes-xts-plain64 over 512-byte sectors with per-thread OpenSSL
// contexts, so that no request allocates or takes a shared lock in the steady state.
//
// Two engines compute it. Where the CPU has AES-NI (nearly every x86-64 server), xts_aesni.h
// does the whole mode in registers, one pass over the data; its key schedules live in the
// XtsKey (locked memory) and are shared read-only by every thread, so it needs no per-thread
// state at all. Elsewhere, or when asked for (the tests run both), the portable engine below.
//
// The portable engine computes XTS from AES in ECB mode rather than with OpenSSL's XTS cipher: that one
// takes one data unit (a sector) per call and needs its IV set before each, and in OpenSSL 3
// that re-initialisation costs more than the sector's AES (~0.8 GB/s against ~5 GB/s). Here a
// request is cut into chunks of 64 sectors; for each, the sectors' first tweaks are one ECB call
// under the tweak key (the key's second half), every block's tweak follows by multiplication
// by alpha in GF(2^128), and the data is XORed with the tweaks, run through one ECB call under
// the data key (the first half), and XORed again (IEEE 1619 XEX). The unit tests hold it to the
// IEEE 1619 vectors and to OpenSSL's own XTS byte for byte.
//
// An XtsKey is one disk's data key. The contexts that hold its key schedule are created lazily,
// one encrypt/decrypt pair per worker thread that uses the disk, and each thread remembers the
// pair it got in a small thread-local table keyed by the XtsKey's unique id:
//
//     worker thread ── thread-local table (16 entries: key id -> context pair) ──┐
//                                                                              ▼
//     XtsKey ── owns every pair it handed out (all_), keeps returned ones (free_) for reuse
//
// A request looks its pair up without a lock; only a thread's first request on a disk (or
// after its entry was evicted by a 17th disk) takes the XtsKey's mutex. revoke() (the disk
// closes) frees every pair, which wipes the key schedules, and wipes the key itself; the
// thread-local entries that still name the key are then never matched again (ids are never
// reused) and are dropped without touching the freed pairs. Entries hold a shared_ptr to their
// XtsKey, so the mutex outlives every entry that may still call release().
#pragma once

#include <openssl/evp.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "secure.h"
#include "xts_aesni.h"

namespace iofilterfs::encrypt {

class XtsKey : public std::enable_shared_from_this<XtsKey> {
 public:
  static constexpr size_t kSector = 512;

  enum class Engine {
    kBest,      // the widest this CPU runs: VAES (512-bit), else AES-NI, else portable
    kAesni,     // AES-NI on 128-bit registers when the CPU has it, else portable
    kPortable,  // OpenSSL's AES-ECB and tweaks computed here
  };
  // A key of 32 (AES-128-XTS) or 64 (AES-256-XTS) bytes; null when OpenSSL refuses it.
  static std::shared_ptr<XtsKey> create(const SecureBytes& key, Engine engine = Engine::kBest);
  ~XtsKey();

  // n sectors from in to out (which may be the same buffer); the first one's IV is `sector`
  // (plain64: the little-endian 64-bit sector number). False when OpenSSL fails or after
  // revoke().
  bool encrypt(const uint8_t* in, uint8_t* out, size_t n, uint64_t sector);
  // The same, decrypting; with holes_read_zero, a ciphertext sector of all zero bytes (a hole
  // or never-written area of the backing file; real ciphertext is all zeros with probability
  // 2^-4096) decrypts to zeros.
  bool decrypt(const uint8_t* in, uint8_t* out, size_t n, uint64_t sector, bool holes_read_zero);

  // Frees every context and wipes the key; later calls fail.
  void revoke();

  static constexpr size_t kChunkSectors = 64;  // sectors per ECB call (see above)
  struct Pair {
    EVP_CIPHER_CTX* enc = nullptr;    // AES-ECB, data key, encrypting
    EVP_CIPHER_CTX* dec = nullptr;    // AES-ECB, data key, decrypting
    EVP_CIPHER_CTX* tweak = nullptr;  // AES-ECB, tweak key, encrypting
    // Scratch: one chunk's tweaks, then its sectors' first tweaks (16 bytes each).
    alignas(64) uint8_t tweaks[kChunkSectors * kSector + kChunkSectors * 16];
  };
  // For the thread-local table: a pair to keep, and one given back.
  Pair* acquire();
  void release(Pair* p);
  uint64_t id() const { return id_; }
  // Whether the AES-NI engine serves this key, and whether in its wide (VAES) form.
  bool accelerated() const { return schedule_ != nullptr; }
  bool wide() const { return schedule_ != nullptr && schedule_->wide; }
  // Contexts created so far (tests check that requests reuse them).
  size_t contexts() const;

 private:
  XtsKey() = default;
  Pair* pair_for_this_thread();
  bool run(bool enc, const uint8_t* in, uint8_t* out, size_t n, uint64_t sector, bool holes_read_zero);

  SecureBytes key_;
  const EVP_CIPHER* cipher_ = nullptr;
  // The AES-NI engine's key schedules, inside schedule_mem_ (aligned); null for the portable
  // engine. Wiped by revoke(), freed with the key.
  SecureBytes schedule_mem_;
  aesni::Schedule* schedule_ = nullptr;
  uint64_t id_ = 0;
  mutable std::mutex mu_;                    // a leaf lock: guards all_, free_, revoked_
  std::vector<std::unique_ptr<Pair>> all_;   // under mu_
  std::vector<Pair*> free_;                  // under mu_
  bool revoked_ = false;                     // under mu_
  std::atomic<bool> dead_{false};            // revoked_, read without the lock by requests
};

}  // namespace iofilterfs::encrypt
