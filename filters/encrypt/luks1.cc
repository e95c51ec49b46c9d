#include "luks1.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>

namespace iofilterfs::encrypt::luks1 {
namespace {

// phdr field offsets (spec, figure 1).
constexpr size_t kOffVersion = 6, kOffCipherName = 8, kOffCipherMode = 40, kOffHashSpec = 72,
                 kOffPayload = 104, kOffKeyBytes = 108, kOffMkDigest = 112, kOffMkSalt = 132, kOffMkIter = 164,
                 kOffUuid = 168, kOffSlots = 208, kSlotSize = 48;
constexpr size_t kNameLen = 32, kUuidLen = 40;

// Layout of new containers (cryptsetup's): keyslots 4 KiB aligned from 4 KiB, payload 1 MiB aligned.
constexpr uint32_t kSlotAlignSectors = 4096 / kSectorSize;
constexpr uint32_t kPayloadAlignSectors = 1024 * 1024 / kSectorSize;

uint32_t be32(const uint8_t* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | uint32_t{p[3]};
}
uint16_t be16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }
void put_be32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}

// A NUL-padded char[n] field; "" if it holds no NUL (then it is not a C string).
std::string field(const uint8_t* p, size_t n) {
  const void* nul = std::memchr(p, 0, n);
  if (!nul) return {};
  return std::string(reinterpret_cast<const char*>(p), static_cast<const uint8_t*>(nul) - p);
}

void put_field(uint8_t* p, size_t n, const std::string& s) {
  std::memset(p, 0, n);
  std::memcpy(p, s.data(), std::min(s.size(), n - 1));
}

uint64_t div_up(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

uint64_t now_us() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000 + static_cast<uint64_t>(ts.tv_nsec) / 1000;
}

std::string new_uuid() {
  uint8_t b[16];
  if (RAND_bytes(b, sizeof b) != 1) return {};
  b[6] = (b[6] & 0x0f) | 0x40;  // version 4
  b[8] = (b[8] & 0x3f) | 0x80;  // RFC 4122 variant
  char s[37];
  std::snprintf(s, sizeof s, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
                b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
  return s;
}

struct CtxFree {
  void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
};
struct MdCtxFree {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};

}  // namespace

uint64_t Header::slot_material_bytes(int slot) const {
  return div_up(uint64_t{key_bytes} * slots[slot].stripes, kSectorSize) * kSectorSize;
}

uint64_t Header::key_material_end() const {
  uint64_t end = kPhdrSize;
  for (int i = 0; i < kNumKeyslots; ++i)
    if (slots[i].is_active())
      end = std::max(end, uint64_t{slots[i].key_material_offset} * kSectorSize + slot_material_bytes(i));
  return end;
}

int Header::active_slots() const {
  int n = 0;
  for (const Keyslot& s : slots) n += s.is_active();
  return n;
}

bool has_magic(const void* buf, size_t len) { return len >= sizeof kMagic && std::memcmp(buf, kMagic, sizeof kMagic) == 0; }

const EVP_MD* hash_by_name(std::string_view name) {
  if (name == "sha1") return EVP_sha1();
  if (name == "sha256") return EVP_sha256();
  if (name == "sha512") return EVP_sha512();
  return nullptr;
}

std::string parse_header(const uint8_t* buf, size_t len, Header* out) {
  if (len < kPhdrSize) return "the header is truncated (" + std::to_string(len) + " of 592 bytes)";
  if (!has_magic(buf, len)) return "no LUKS magic";
  Header h;
  h.version = be16(buf + kOffVersion);
  if (h.version != 1) return "LUKS version " + std::to_string(h.version) + " is not supported (only LUKS1)";
  h.cipher_name = field(buf + kOffCipherName, kNameLen);
  h.cipher_mode = field(buf + kOffCipherMode, kNameLen);
  h.hash_spec = field(buf + kOffHashSpec, kNameLen);
  h.payload_offset = be32(buf + kOffPayload);
  h.key_bytes = be32(buf + kOffKeyBytes);
  std::memcpy(h.mk_digest.data(), buf + kOffMkDigest, kDigestSize);
  std::memcpy(h.mk_digest_salt.data(), buf + kOffMkSalt, kSaltSize);
  h.mk_digest_iter = be32(buf + kOffMkIter);
  h.uuid = field(buf + kOffUuid, kUuidLen);
  for (int i = 0; i < kNumKeyslots; ++i) {
    const uint8_t* p = buf + kOffSlots + i * kSlotSize;
    Keyslot& s = h.slots[i];
    s.active = be32(p);
    s.iterations = be32(p + 4);
    std::memcpy(s.salt.data(), p + 8, kSaltSize);
    s.key_material_offset = be32(p + 40);
    s.stripes = be32(p + 44);
  }

  std::string cipher = h.cipher_name + "-" + h.cipher_mode;
  if (h.cipher_name != "aes" || h.cipher_mode != "xts-plain64")
    return "unsupported cipher '" + cipher + "' (only aes-xts-plain64)";
  if (!hash_by_name(h.hash_spec)) return "unsupported hash '" + h.hash_spec + "' (sha1, sha256 or sha512)";
  if (h.key_bytes != 32 && h.key_bytes != 64)
    return "unsupported key size of " + std::to_string(h.key_bytes * 8) + " bits (256 or 512 for xts)";
  if (h.mk_digest_iter == 0) return "the master key digest has no iterations";
  if (h.payload_offset == 0) return "a detached header (payload offset 0) is not supported";
  if (h.payload_offset < div_up(kPhdrSize, kSectorSize)) return "the payload offset lies inside the header";
  for (int i = 0; i < kNumKeyslots; ++i) {
    const Keyslot& s = h.slots[i];
    if (s.active != kSlotActive && s.active != kSlotDisabled) return "keyslot " + std::to_string(i) + " is corrupt";
    if (!s.is_active()) continue;
    if (s.stripes != kStripes || s.iterations == 0) return "keyslot " + std::to_string(i) + " is corrupt";
    uint64_t start = uint64_t{s.key_material_offset} * kSectorSize, end = start + h.slot_material_bytes(i);
    if (start < kPhdrSize) return "keyslot " + std::to_string(i) + " overlaps the header";
    if (end > h.payload_bytes_offset()) return "keyslot " + std::to_string(i) + " overlaps the payload";
    for (int j = 0; j < kNumKeyslots; ++j) {
      const Keyslot& o = h.slots[j];
      if (j == i || !o.is_active()) continue;
      uint64_t os = uint64_t{o.key_material_offset} * kSectorSize, oe = os + h.slot_material_bytes(j);
      if (start < oe && os < end) return "keyslot " + std::to_string(i) + " overlaps keyslot " + std::to_string(j);
    }
  }
  *out = std::move(h);
  return {};
}

void write_header(const Header& h, uint8_t out[kPhdrSize]) {
  std::memset(out, 0, kPhdrSize);
  std::memcpy(out, kMagic, sizeof kMagic);
  out[kOffVersion] = static_cast<uint8_t>(h.version >> 8);
  out[kOffVersion + 1] = static_cast<uint8_t>(h.version);
  put_field(out + kOffCipherName, kNameLen, h.cipher_name);
  put_field(out + kOffCipherMode, kNameLen, h.cipher_mode);
  put_field(out + kOffHashSpec, kNameLen, h.hash_spec);
  put_be32(out + kOffPayload, h.payload_offset);
  put_be32(out + kOffKeyBytes, h.key_bytes);
  std::memcpy(out + kOffMkDigest, h.mk_digest.data(), kDigestSize);
  std::memcpy(out + kOffMkSalt, h.mk_digest_salt.data(), kSaltSize);
  put_be32(out + kOffMkIter, h.mk_digest_iter);
  put_field(out + kOffUuid, kUuidLen, h.uuid);
  for (int i = 0; i < kNumKeyslots; ++i) {
    uint8_t* p = out + kOffSlots + i * kSlotSize;
    const Keyslot& s = h.slots[i];
    put_be32(p, s.active);
    put_be32(p + 4, s.iterations);
    std::memcpy(p + 8, s.salt.data(), kSaltSize);
    put_be32(p + 40, s.key_material_offset);
    put_be32(p + 44, s.stripes);
  }
}

bool pbkdf2(const EVP_MD* md, const void* pass, size_t passlen, const uint8_t* salt, size_t saltlen, uint32_t iter,
            uint8_t* out, size_t outlen) {
  static const char kEmpty[1] = {0};
  return PKCS5_PBKDF2_HMAC(passlen ? static_cast<const char*>(pass) : kEmpty, static_cast<int>(passlen), salt,
                           static_cast<int>(saltlen), static_cast<int>(iter), md, static_cast<int>(outlen), out) == 1;
}

uint32_t pbkdf2_iterations_for(const EVP_MD* md, size_t outlen, uint64_t usec) {
  // Time growing runs until one lasts long enough to measure (a quarter of the target, at
  // least 1 ms, at most 250 ms), then scale.
  const uint64_t want = std::clamp<uint64_t>(usec / 4, 1000, 250000);
  static const char kPass[] = "iofilterfs benchmark";
  uint8_t salt[kSaltSize] = {};
  std::vector<uint8_t> out(outlen);
  uint64_t iter = 1000, spent = 0;
  for (;;) {
    const uint64_t t0 = now_us();
    if (!pbkdf2(md, kPass, sizeof kPass - 1, salt, sizeof salt, static_cast<uint32_t>(iter), out.data(), outlen))
      return kMinIterations;
    spent = std::max<uint64_t>(now_us() - t0, 1);
    if (spent >= want || iter >= (uint64_t{1} << 31)) break;
    iter *= spent * 4 < want ? 4 : 2;
  }
  const double per_us = static_cast<double>(iter) / static_cast<double>(spent);
  const double n = per_us * static_cast<double>(usec);
  if (n < kMinIterations) return kMinIterations;
  if (n > 4294967295.0) return 4294967295u;
  return static_cast<uint32_t>(n);
}

bool af_diffuse(const EVP_MD* md, const uint8_t* in, uint8_t* out, size_t len) {
  const size_t ds = static_cast<size_t>(EVP_MD_get_size(md));
  std::unique_ptr<EVP_MD_CTX, MdCtxFree> ctx(EVP_MD_CTX_new());
  if (!ctx) return false;
  uint8_t digest[EVP_MAX_MD_SIZE];
  for (size_t off = 0, i = 0; off < len; off += ds, ++i) {
    const size_t n = std::min(ds, len - off);
    uint8_t iv[4];
    put_be32(iv, static_cast<uint32_t>(i));
    if (EVP_DigestInit_ex(ctx.get(), md, nullptr) != 1 || EVP_DigestUpdate(ctx.get(), iv, sizeof iv) != 1 ||
        EVP_DigestUpdate(ctx.get(), in + off, n) != 1 || EVP_DigestFinal_ex(ctx.get(), digest, nullptr) != 1)
      return false;
    std::memcpy(out + off, digest, n);
  }
  OPENSSL_cleanse(digest, sizeof digest);
  return true;
}

bool af_split(const EVP_MD* md, const uint8_t* key, size_t block, uint32_t stripes, uint8_t* out) {
  if (stripes == 0) return false;
  SecureBytes d(block);
  for (uint32_t i = 0; i + 1 < stripes; ++i) {
    uint8_t* s = out + size_t{i} * block;
    if (RAND_bytes(s, static_cast<int>(block)) != 1) return false;
    for (size_t k = 0; k < block; ++k) d.data()[k] ^= s[k];
    if (!af_diffuse(md, d.data(), d.data(), block)) return false;
  }
  uint8_t* last = out + size_t{stripes - 1} * block;
  for (size_t k = 0; k < block; ++k) last[k] = key[k] ^ d.data()[k];
  return true;
}

bool af_merge(const EVP_MD* md, const uint8_t* split, size_t block, uint32_t stripes, uint8_t* key) {
  if (stripes == 0) return false;
  SecureBytes d(block);
  for (uint32_t i = 0; i + 1 < stripes; ++i) {
    const uint8_t* s = split + size_t{i} * block;
    for (size_t k = 0; k < block; ++k) d.data()[k] ^= s[k];
    if (!af_diffuse(md, d.data(), d.data(), block)) return false;
  }
  const uint8_t* last = split + size_t{stripes - 1} * block;
  for (size_t k = 0; k < block; ++k) key[k] = last[k] ^ d.data()[k];
  return true;
}

bool xts_crypt(bool encrypt, const uint8_t* key, size_t key_bytes, const uint8_t* in, uint8_t* out, size_t n,
               uint64_t first_sector) {
  const EVP_CIPHER* c = key_bytes == 64 ? EVP_aes_256_xts() : key_bytes == 32 ? EVP_aes_128_xts() : nullptr;
  if (!c) return false;
  std::unique_ptr<EVP_CIPHER_CTX, CtxFree> ctx(EVP_CIPHER_CTX_new());
  if (!ctx || EVP_CipherInit_ex(ctx.get(), c, nullptr, key, nullptr, encrypt ? 1 : 0) != 1) return false;
  uint8_t iv[16] = {};
  for (size_t i = 0; i < n; ++i) {
    const uint64_t s = first_sector + i;
    for (int b = 0; b < 8; ++b) iv[b] = static_cast<uint8_t>(s >> (8 * b));
    int outl = 0;
    if (EVP_CipherInit_ex(ctx.get(), nullptr, nullptr, nullptr, iv, -1) != 1 ||
        EVP_CipherUpdate(ctx.get(), out + i * kSectorSize, &outl, in + i * kSectorSize, kSectorSize) != 1)
      return false;
  }
  return true;
}

bool verify_master_key(const Header& h, const SecureBytes& master) {
  const EVP_MD* md = hash_by_name(h.hash_spec);
  uint8_t digest[kDigestSize];
  if (!md || master.size() != h.key_bytes ||
      !pbkdf2(md, master.data(), master.size(), h.mk_digest_salt.data(), kSaltSize, h.mk_digest_iter, digest,
              sizeof digest))
    return false;
  return CRYPTO_memcmp(digest, h.mk_digest.data(), kDigestSize) == 0;
}

Unlock unlock(const Header& h, std::string_view area, const SecureBytes& pass, SecureBytes* master, int* slot,
              std::string* err) {
  const EVP_MD* md = hash_by_name(h.hash_spec);
  if (!md) {
    *err = "unsupported hash '" + h.hash_spec + "'";
    return Unlock::Error;
  }
  if (area.size() < h.key_material_end()) {
    *err = "the file is shorter than its LUKS header";
    return Unlock::Error;
  }
  for (int i = 0; i < kNumKeyslots; ++i) {
    const Keyslot& s = h.slots[i];
    if (!s.is_active()) continue;
    const size_t split_len = size_t{h.key_bytes} * s.stripes;
    const size_t sectors = div_up(split_len, kSectorSize);
    SecureBytes derived(h.key_bytes), split(sectors * kSectorSize), candidate(h.key_bytes);
    const uint8_t* material = reinterpret_cast<const uint8_t*>(area.data()) + uint64_t{s.key_material_offset} * kSectorSize;
    if (!pbkdf2(md, pass.data(), pass.size(), s.salt.data(), kSaltSize, s.iterations, derived.data(), h.key_bytes) ||
        !xts_crypt(false, derived.data(), h.key_bytes, material, split.data(), sectors, 0) ||
        !af_merge(md, split.data(), h.key_bytes, s.stripes, candidate.data())) {
      *err = "OpenSSL failed while opening keyslot " + std::to_string(i);
      return Unlock::Error;
    }
    if (verify_master_key(h, candidate)) {
      *master = std::move(candidate);
      *slot = i;
      return Unlock::Ok;
    }
  }
  return Unlock::WrongKey;
}

std::string add_keyslot(Header* h, std::vector<uint8_t>* area, const SecureBytes& master, const SecureBytes& pass,
                        int slot, uint32_t iterations, uint64_t iter_time_us) {
  if (slot < 0 || slot >= kNumKeyslots) return "no keyslot " + std::to_string(slot);
  Keyslot& s = h->slots[slot];
  if (s.is_active()) return "keyslot " + std::to_string(slot) + " is in use";
  const EVP_MD* md = hash_by_name(h->hash_spec);
  if (!md) return "unsupported hash '" + h->hash_spec + "'";
  if (master.size() != h->key_bytes) return "the master key has the wrong length";
  s.stripes = kStripes;
  const uint64_t start = uint64_t{s.key_material_offset} * kSectorSize, bytes = h->slot_material_bytes(slot);
  if (start < kPhdrSize || start + bytes > h->payload_bytes_offset() || start + bytes > area->size())
    return "keyslot " + std::to_string(slot) + " does not fit the header area";
  if (RAND_bytes(s.salt.data(), kSaltSize) != 1) return "no random salt";
  s.iterations = iterations ? iterations : pbkdf2_iterations_for(md, h->key_bytes, iter_time_us);
  SecureBytes derived(h->key_bytes), split(bytes);
  if (!pbkdf2(md, pass.data(), pass.size(), s.salt.data(), kSaltSize, s.iterations, derived.data(), h->key_bytes) ||
      !af_split(md, master.data(), h->key_bytes, s.stripes, split.data()) ||
      !xts_crypt(true, derived.data(), h->key_bytes, split.data(), area->data() + start, bytes / kSectorSize, 0))
    return "OpenSSL failed while writing keyslot " + std::to_string(slot);
  s.active = kSlotActive;
  write_header(*h, area->data());
  return {};
}

std::string kill_keyslot(Header* h, std::vector<uint8_t>* area, int slot) {
  if (slot < 0 || slot >= kNumKeyslots) return "no keyslot " + std::to_string(slot);
  Keyslot& s = h->slots[slot];
  if (!s.is_active()) return "keyslot " + std::to_string(slot) + " is not in use";
  if (h->active_slots() == 1) return "keyslot " + std::to_string(slot) + " is the last one; it would lock the data away";
  const uint64_t start = uint64_t{s.key_material_offset} * kSectorSize, bytes = h->slot_material_bytes(slot);
  if (start + bytes <= area->size() && RAND_bytes(area->data() + start, static_cast<int>(bytes)) != 1)
    std::memset(area->data() + start, 0, bytes);
  s.active = kSlotDisabled;
  s.iterations = 0;
  s.salt.fill(0);
  write_header(*h, area->data());
  return {};
}

std::string format(const FormatParams& p, const SecureBytes& pass, Header* out, std::vector<uint8_t>* area,
                   SecureBytes* master) {
  if (p.key_bytes != 32 && p.key_bytes != 64) return "key size must be 256 or 512 bits";
  const EVP_MD* md = hash_by_name(p.hash);
  if (!md) return "unsupported hash '" + p.hash + "' (sha1, sha256 or sha512)";
  Header h;
  h.hash_spec = p.hash;
  h.key_bytes = p.key_bytes;
  h.uuid = new_uuid();
  if (h.uuid.empty()) return "no random uuid";
  const uint32_t slot_sectors =
      static_cast<uint32_t>(div_up(div_up(uint64_t{p.key_bytes} * kStripes, kSectorSize), kSlotAlignSectors)) *
      kSlotAlignSectors;
  uint32_t next = kSlotAlignSectors;  // the first slot after the phdr's 4 KiB
  for (Keyslot& s : h.slots) {
    s = Keyslot{};
    s.key_material_offset = next;
    next += slot_sectors;
  }
  h.payload_offset = static_cast<uint32_t>(div_up(next, kPayloadAlignSectors) * kPayloadAlignSectors);

  SecureBytes mk(p.key_bytes);
  if (RAND_bytes(mk.data(), static_cast<int>(mk.size())) != 1 ||
      RAND_bytes(h.mk_digest_salt.data(), kSaltSize) != 1)
    return "no random master key";
  h.mk_digest_iter = p.digest_iterations
                         ? p.digest_iterations
                         : pbkdf2_iterations_for(md, kDigestSize, std::min<uint64_t>(p.iter_time_us, 125000));
  if (!pbkdf2(md, mk.data(), mk.size(), h.mk_digest_salt.data(), kSaltSize, h.mk_digest_iter, h.mk_digest.data(),
              kDigestSize))
    return "OpenSSL failed computing the master key digest";
  area->assign(h.payload_bytes_offset(), 0);
  std::string err = add_keyslot(&h, area, mk, pass, 0, p.slot_iterations, p.iter_time_us);
  if (!err.empty()) return err;
  *out = std::move(h);
  *master = std::move(mk);
  return {};
}

}  // namespace iofilterfs::encrypt::luks1
