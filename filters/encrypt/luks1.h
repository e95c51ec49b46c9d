// The LUKS1 on-disk format, as a pure component: it reads and writes headers held in memory and
// knows nothing of files or FUSE (the encrypt filter does the I/O). Facts from the LUKS1 On-Disk
// Format Specification 1.2.3 (cryptsetup's docs/on-disk-format.pdf).
//
// A LUKS1 container is a header area followed by the payload:
//
//   0        592                       key-material-offset(s) x 512       payload-offset x 512
//   ┌─────────┬──────────────────────────┬───────┬───────┬─── ... ──┬───────┬──────────────────
//   │ phdr    │ (zeros)                  │ slot0 │ slot1 │          │ slot7 │ payload: the disk,
//   └─────────┴──────────────────────────┴───────┴───────┴─── ... ──┴───────┴ aes-xts-plain64
//
// The phdr (big-endian) names the cipher, the hash, the payload offset (512-byte sectors), the
// master key's length and a digest of it (PBKDF2 of the master key, 20 bytes), and 8 keyslots.
// A keyslot holds the master key encrypted under a key derived from one passphrase:
//
//   unlock:  derived = PBKDF2(hash, passphrase, slot salt, slot iterations, key-bytes)
//            split   = decrypt(aes-xts-plain64, derived, key material, IV = sector from 0)
//            master  = AF-merge(split, key-bytes, stripes)      (anti-forensic splitter)
//            accept when PBKDF2(hash, master, mk salt, mk iterations, 20) == mk-digest
//
// The anti-forensic splitter inflates the key to stripes (4000) x key-bytes of material so
// that destroying any part of the keyslot destroys the key (see af_split below).
//
// Supported: cipher aes, mode xts-plain64 (IV = little-endian 64-bit sector number), 256- or
// 512-bit XTS keys (key-bytes 32 or 64), hash sha1, sha256 or sha512 (read), payload after the
// header in the same file (no detached headers).
//
// Threads: everything here is reentrant; nothing keeps state between calls.
#pragma once

#include <openssl/evp.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "secure.h"

namespace iofilterfs::encrypt::luks1 {

inline constexpr size_t kSectorSize = 512;
inline constexpr size_t kPhdrSize = 592;
inline constexpr int kNumKeyslots = 8;
inline constexpr uint32_t kStripes = 4000;
inline constexpr uint32_t kSlotActive = 0x00AC71F3;
inline constexpr uint32_t kSlotDisabled = 0x0000DEAD;
inline constexpr size_t kDigestSize = 20;
inline constexpr size_t kSaltSize = 32;
inline constexpr uint32_t kMinIterations = 1000;  // cryptsetup's floor, for slots and the digest
inline constexpr char kMagic[6] = {'L', 'U', 'K', 'S', '\xba', '\xbe'};

struct Keyslot {
  uint32_t active = kSlotDisabled;  // kSlotActive or kSlotDisabled (anything else is corrupt)
  uint32_t iterations = 0;
  std::array<uint8_t, kSaltSize> salt{};
  uint32_t key_material_offset = 0;  // sectors
  uint32_t stripes = kStripes;
  bool is_active() const { return active == kSlotActive; }
};

struct Header {
  uint16_t version = 1;
  std::string cipher_name = "aes";
  std::string cipher_mode = "xts-plain64";
  std::string hash_spec = "sha256";
  uint32_t payload_offset = 0;  // sectors
  uint32_t key_bytes = 64;
  std::array<uint8_t, kDigestSize> mk_digest{};
  std::array<uint8_t, kSaltSize> mk_digest_salt{};
  uint32_t mk_digest_iter = 0;
  std::string uuid;
  std::array<Keyslot, kNumKeyslots> slots{};

  // Bytes of key material one slot holds on disk (key-bytes x stripes, in whole sectors).
  uint64_t slot_material_bytes(int slot) const;
  // The size of the header area: where the payload starts, in bytes.
  uint64_t payload_bytes_offset() const { return uint64_t{payload_offset} * kSectorSize; }
  // Where the key material of the last active slot ends: how much of the file unlock() reads.
  uint64_t key_material_end() const;
  int active_slots() const;
};

// True when buf starts with the LUKS magic.
bool has_magic(const void* buf, size_t len);

// Parses and checks a phdr (the first kPhdrSize bytes of buf; len must be at least that).
// Returns "" or why the header cannot be used ("unsupported cipher mode 'cbc-essiv:sha256'
// (only aes-xts-plain64)", "keyslot 3 overlaps keyslot 4", ...).
std::string parse_header(const uint8_t* buf, size_t len, Header* out);

// The 592 bytes of the phdr.
void write_header(const Header& h, uint8_t out[kPhdrSize]);

// The hash a header names, or null when unsupported (sha1, sha256, sha512).
const EVP_MD* hash_by_name(std::string_view name);

// ---- primitives ----

// PBKDF2-HMAC (PKCS #5) into out[0..outlen). False when OpenSSL fails.
bool pbkdf2(const EVP_MD* md, const void* pass, size_t passlen, const uint8_t* salt, size_t saltlen, uint32_t iter,
            uint8_t* out, size_t outlen);

// How many iterations of PBKDF2(md, output outlen bytes) take about `usec` on this machine,
// measured (briefly, as cryptsetup's benchmark does), never below kMinIterations.
uint32_t pbkdf2_iterations_for(const EVP_MD* md, size_t outlen, uint64_t usec);

// The LUKS diffusion H: the block is cut into digest-sized pieces and piece i (the last may be
// shorter) is replaced by the first bytes of hash(be32(i) || piece).
bool af_diffuse(const EVP_MD* md, const uint8_t* in, uint8_t* out, size_t len);

// The anti-forensic splitter. split: stripes-1 random blocks s_i, d_0 = 0,
// d_{i+1} = H(d_i xor s_i), and the last block is key xor d_{stripes-1}; out has
// block x stripes bytes. merge reverses it. False when OpenSSL fails.
bool af_split(const EVP_MD* md, const uint8_t* key, size_t block, uint32_t stripes, uint8_t* out);
bool af_merge(const EVP_MD* md, const uint8_t* split, size_t block, uint32_t stripes, uint8_t* key);

// aes-xts-plain64 over whole 512-byte sectors: n sectors from in to out (may be equal), the
// first with IV `first_sector`. key_bytes 32 (AES-128-XTS) or 64 (AES-256-XTS). For keyslot
// material; the data path keeps its contexts (xts.h).
bool xts_crypt(bool encrypt, const uint8_t* key, size_t key_bytes, const uint8_t* in, uint8_t* out, size_t n,
               uint64_t first_sector);

// ---- whole operations ----

enum class Unlock { Ok, WrongKey, Error };

// Tries the passphrase on each active slot of `h`. `area` is the start of the container, at
// least key_material_end() long. On Ok, *master holds the master key and *slot the
// slot that opened. WrongKey: no slot opens (or none is active). Error: *err says why.
Unlock unlock(const Header& h, std::string_view area, const SecureBytes& pass, SecureBytes* master, int* slot,
              std::string* err);

// Checks a master key against the header's digest.
bool verify_master_key(const Header& h, const SecureBytes& master);

struct FormatParams {
  uint32_t key_bytes = 64;          // 32 or 64 (a 256- or 512-bit XTS key)
  std::string hash = "sha256";
  uint64_t iter_time_us = 2000000;  // PBKDF2 time for the keyslot; the digest gets min(125ms, this)
  // When non-zero, fixed iteration counts instead of benchmarking (tests).
  uint32_t slot_iterations = 0;
  uint32_t digest_iterations = 0;
};

// A new container: a random master key (RAND_bytes), a fresh uuid, slot 0 opened by `pass`,
// the layout cryptsetup uses (keyslots 4 KiB aligned from sector 8, payload 1 MiB aligned).
// *area receives the whole header area (payload offset bytes) to write at the start of the
// file. Returns "" or why not.
std::string format(const FormatParams& p, const SecureBytes& pass, Header* h, std::vector<uint8_t>* area,
                   SecureBytes* master);

// Puts the master key into `slot` (disabled) of h and area under `pass`, with `iterations`
// (0: benchmark for iter_time_us). Returns "" or why not.
std::string add_keyslot(Header* h, std::vector<uint8_t>* area, const SecureBytes& master, const SecureBytes& pass,
                        int slot, uint32_t iterations, uint64_t iter_time_us);

// Disables `slot` and wipes its key material in area. Refuses the last active slot.
std::string kill_keyslot(Header* h, std::vector<uint8_t>* area, int slot);

}  // namespace iofilterfs::encrypt::luks1
