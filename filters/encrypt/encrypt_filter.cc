#include "encrypt/encrypt_filter.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <spdlog/spdlog.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstring>
#include <set>

#include "buffers.h"
#include "json.h"

namespace iofilterfs {
namespace {

namespace l1 = encrypt::luks1;
constexpr uint64_t kSector = encrypt::XtsKey::kSector;
constexpr uint64_t kZeroChunk = 256 * 1024;
alignas(4096) const uint8_t kZeros[kZeroChunk] = {};

uint64_t down(uint64_t x) { return x & ~(kSector - 1); }
uint64_t up(uint64_t x) { return (x + kSector - 1) & ~(kSector - 1); }

const Status kNotOpen = Status::Error(EIO, "encrypt: the filter is not open");
const Status kNoBuffer = Status::Error(ENOMEM, "encrypt: no scratch buffer");
const Status kCipherFailed = Status::Error(EIO, "encrypt: OpenSSL failed");

}  // namespace

EncryptFilter::EncryptFilter(encrypt::EncryptParams p) : params_(std::move(p)) {}

EncryptFilter::~EncryptFilter() { close(); }

Status EncryptFilter::fail_open(int err, std::string msg) {
  // Status::what must outlive the filter (the disk is gone when FUSE replies), so the message is
  // interned: kept for the process's life, once per distinct text. There are few (a message
  // names at most a key file, its owner and mode); past a bound a generic one stands in.
  static std::mutex mu;
  static std::set<std::string> messages;
  std::lock_guard<std::mutex> g(mu);
  if (messages.size() >= 1000 && !messages.count(msg)) return Status::Error(err, "the image cannot be opened");
  return Status::Error(err, messages.insert(std::move(msg)).first->c_str());  // the disk names the filter and image
}

Status EncryptFilter::open(const DiskInfo& info) {
  encrypt::SecureBytes pass;
  std::string err = encrypt::read_passphrase(params_, &pass);
  if (!err.empty()) return fail_open(EACCES, err);

  uint64_t bsize = 0;
  Status s = next_->size(&bsize);
  if (!s.ok()) return s;

  encrypt::SecureBytes master;
  if (bsize == 0) {
    // A new image: a fresh header. Written whole, then synced, before any data can follow.
    if (info.read_only) return fail_open(EROFS, "the image is empty and the mount read-only: no LUKS header to open");
    l1::FormatParams fp;
    fp.key_bytes = params_.key_bits / 8;
    fp.hash = params_.hash;
    fp.iter_time_us = params_.iter_time_us;
    std::vector<uint8_t> area;
    err = l1::format(fp, pass, &header_, &area, &master);
    if (!err.empty()) return fail_open(EIO, "cannot create a LUKS header: " + err);
    s = next_->write(Io{}, area.data(), area.size(), 0);
    if (s.ok()) s = next_->sync(Io{}, false);
    if (!s.ok()) return s;
    keyslot_ = 0;
    created_ = true;
    spdlog::info("{}: new LUKS1 header (aes-xts-plain64, {}-bit key, {}, keyslot 0 with {} iterations)", info.path,
                 params_.key_bits, params_.hash, header_.slots[0].iterations);
  } else {
    std::vector<uint8_t> head(std::min<uint64_t>(bsize, l1::kPhdrSize));
    size_t got = 0;
    s = next_->read(Io{}, head.data(), head.size(), 0, &got);
    if (!s.ok()) return s;
    if (!l1::has_magic(head.data(), got))
      return fail_open(EMEDIUMTYPE,
                       "the image has no LUKS header: a plaintext image is not opened under a policy that encrypts "
                       "(its data would be read as ciphertext)");
    err = l1::parse_header(head.data(), got, &header_);
    if (!err.empty()) return fail_open(EMEDIUMTYPE, "the LUKS header cannot be used: " + err);
    std::string area(header_.key_material_end(), '\0');
    s = next_->read(Io{}, area.data(), area.size(), 0, &got);
    if (!s.ok()) return s;
    area.resize(got);
    int slot = -1;
    switch (l1::unlock(header_, area, pass, &master, &slot, &err)) {
      case l1::Unlock::Ok: break;
      case l1::Unlock::WrongKey:
        return fail_open(EACCES, "the policy's passphrase opens no keyslot of the LUKS header");
      case l1::Unlock::Error: return fail_open(EIO, err);
    }
    keyslot_ = slot;
    if (bsize < header_.payload_bytes_offset())
      spdlog::warn("{}: the file ends inside its LUKS header area; its payload is empty", info.path);
  }
  key_ = encrypt::XtsKey::create(master);
  if (!key_) return fail_open(EIO, "OpenSSL refused the master key");
  payload_ = header_.payload_bytes_offset();
  // The filters above get their own key object: it outlives this filter (a kept cache keeps
  // sealing after a re-plumb replaced this instance), and close() revokes only ours.
  auto sealing = encrypt::XtsKey::create(master);
  if (!sealing) return fail_open(EIO, "OpenSSL refused the master key");
  at_rest_ = std::make_shared<Sealer>(std::move(sealing), payload_, next_);
  return Status::Ok();
}

Status EncryptFilter::Sealer::seal(uint64_t off, const void* in, void* out, size_t len) const {
  if (off % kSector || len % kSector) return Status::Error(EINVAL, "encrypt: sealing needs whole sectors");
  if (!key_->encrypt(static_cast<const uint8_t*>(in), static_cast<uint8_t*>(out), len / kSector, off / kSector))
    return kCipherFailed;
  return Status::Ok();
}

Status EncryptFilter::Sealer::unseal(uint64_t off, const void* in, void* out, size_t len) const {
  if (off % kSector || len % kSector) return Status::Error(EINVAL, "encrypt: unsealing needs whole sectors");
  if (!key_->decrypt(static_cast<const uint8_t*>(in), static_cast<uint8_t*>(out), len / kSector, off / kSector,
                     false))
    return kCipherFailed;
  return Status::Ok();
}

Status EncryptFilter::Sealer::read_header(void* buf, size_t len, uint64_t off) const {
  if (off > header_ || len > header_ - off) return Status::Error(EINVAL, "encrypt: read past the LUKS header");
  size_t got = 0;
  Status s = below_->read(Io{}, buf, len, off, &got);
  if (s.ok() && got < len) std::memset(static_cast<uint8_t*>(buf) + got, 0, len - got);
  return s;
}

std::string EncryptFilter::removal_refused() const {
  return "encrypt cannot leave an open disk: the guest would see the LUKS container's ciphertext in place of its "
         "data; close the disk first (or give the policy a new key in place of removing encrypt)";
}

void EncryptFilter::close() {
  if (key_) key_->revoke();
  key_.reset();
  at_rest_.reset();
}

bool EncryptFilter::passphrase_opens(const encrypt::EncryptParams& p) {
  encrypt::SecureBytes pass, master;
  if (!encrypt::read_passphrase(p, &pass).empty()) return false;
  std::string area(header_.key_material_end(), '\0');
  size_t got = 0;
  if (!next_->read(Io{}, area.data(), area.size(), 0, &got).ok()) return false;
  area.resize(got);
  l1::Header h;
  int slot = -1;
  std::string err;
  return l1::parse_header(reinterpret_cast<const uint8_t*>(area.data()), area.size(), &h).empty() &&
         l1::unlock(h, area, pass, &master, &slot, &err) == l1::Unlock::Ok;
}

bool EncryptFilter::reconfigure(const YAML::Node& params) {
  encrypt::EncryptParams p;
  if (!key_ || !encrypt::parse_encrypt(params, &p).empty()) return false;
  if ((p.key_file != params_.key_file || p.credential != params_.credential) && !passphrase_opens(p)) return false;
  params_ = std::move(p);
  return true;
}

Status EncryptFilter::payload_size(uint64_t* out) {
  uint64_t b = 0;
  Status s = next_->size(&b);
  if (!s.ok()) return s;
  *out = b > payload_ ? down(b - payload_) : 0;
  return Status::Ok();
}

Status EncryptFilter::size(uint64_t* out) {
  if (!key_) return kNotOpen;
  return payload_size(out);
}

Status EncryptFilter::read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) {
  if (!key_) return kNotOpen;
  *got = 0;
  if (len == 0) return Status::Ok();
  const uint64_t a = down(off), e = up(off + len);
  if (a == off && e == off + len) {
    // Aligned: ciphertext into the caller's buffer, decrypted in place.
    size_t n = 0;
    Status s = next_->read(io, buf, len, payload_ + off, &n);
    if (!s.ok()) return s;
    const size_t sectors = n / kSector;  // a torn last sector lies past the visible size
    auto* p = static_cast<uint8_t*>(buf);
    if (!key_->decrypt(p, p, sectors, off / kSector, true)) return kCipherFailed;
    decrypted_.fetch_add(sectors * kSector, std::memory_order_relaxed);
    *got = sectors * kSector;
    return Status::Ok();
  }
  // Unaligned: the covering sectors through the scratch buffer.
  auto* tmp = static_cast<uint8_t*>(thread_buffer(BufferSlot::Filter, e - a));
  if (!tmp) return kNoBuffer;
  size_t n = 0;
  Status s = next_->read(io, tmp, e - a, payload_ + a, &n);
  if (!s.ok()) return s;
  const size_t sectors = n / kSector;
  if (!key_->decrypt(tmp, tmp, sectors, a / kSector, true)) return kCipherFailed;
  decrypted_.fetch_add(sectors * kSector, std::memory_order_relaxed);
  const uint64_t avail = sectors * kSector, skip = off - a;
  if (avail > skip) {
    *got = static_cast<size_t>(std::min<uint64_t>(len, avail - skip));
    std::memcpy(buf, tmp + skip, *got);
  }
  return Status::Ok();
}

Status EncryptFilter::read_sector(const Io& io, uint64_t sector, uint8_t* out) {
  size_t n = 0;
  Status s = next_->read(io, out, kSector, payload_ + sector * kSector, &n);
  if (!s.ok()) return s;
  if (n < kSector) {
    std::memset(out, 0, kSector);  // past the end (a torn sector there is past the visible size)
    return Status::Ok();
  }
  if (!key_->decrypt(out, out, 1, sector, true)) return kCipherFailed;
  return Status::Ok();
}

Status EncryptFilter::write(const Io& io, const void* buf, size_t len, uint64_t off) {
  if (!key_) return kNotOpen;
  if (len == 0) return Status::Ok();
  const uint64_t a = down(off), e = up(off + len);
  const size_t total = static_cast<size_t>(e - a);
  auto* out = static_cast<uint8_t*>(thread_buffer(BufferSlot::Filter, total));
  if (!out) return kNoBuffer;
  if (a == off && e == off + len) {
    if (!key_->encrypt(static_cast<const uint8_t*>(buf), out, total / kSector, a / kSector)) return kCipherFailed;
    encrypted_.fetch_add(total, std::memory_order_relaxed);
    return next_->write(io, out, total, payload_ + a);
  }
  // Read-modify-write of the edge sectors, each under its stripe of the lock table (in stripe
  // order, one lock when both edges share a stripe).
  const bool head = a != off, tail = e != off + len;
  const uint64_t hs = a / kSector, ts = e / kSector - 1;
  std::mutex* m1 = head ? &stripe(hs) : &stripe(ts);
  std::mutex* m2 = tail ? &stripe(ts) : m1;
  if (m2 < m1) std::swap(m1, m2);
  std::unique_lock<std::mutex> l1(*m1), l2;
  if (m2 != m1) l2 = std::unique_lock<std::mutex>(*m2);
  rmw_.fetch_add(1, std::memory_order_relaxed);
  Status s = Status::Ok();
  if (head) s = read_sector(io, hs, out);
  if (s.ok() && tail && (ts != hs || !head)) s = read_sector(io, ts, out + total - kSector);
  if (!s.ok()) return s;
  std::memcpy(out + (off - a), buf, len);
  if (!key_->encrypt(out, out, total / kSector, hs)) return kCipherFailed;
  encrypted_.fetch_add(total, std::memory_order_relaxed);
  return next_->write(io, out, total, payload_ + a);
}

Status EncryptFilter::write_zeros(const Io& io, uint64_t off, uint64_t len) {
  while (len > 0) {
    // Keep the chunks sector-aligned after the first, so only the ends read-modify-write.
    uint64_t n = std::min<uint64_t>(len, kZeroChunk - (off % kSector));
    Status s = write(io, kZeros, static_cast<size_t>(n), off);
    if (!s.ok()) return s;
    off += n;
    len -= n;
  }
  return Status::Ok();
}

Status EncryptFilter::fallocate(const Io& io, int mode, uint64_t off, uint64_t len) {
  if (!key_) return kNotOpen;
  const bool keep = mode & FALLOC_FL_KEEP_SIZE;
  const int kind = mode & ~FALLOC_FL_KEEP_SIZE;
  if (kind == 0) {
    // Allocation: what it adds below reads as zeros (holes). Whole sectors, so the size stays a
    // whole number of them.
    const uint64_t a = down(off), e = up(off + len);
    return next_->fallocate(io, mode, payload_ + a, e - a);
  }
  if (kind != FALLOC_FL_PUNCH_HOLE && kind != FALLOC_FL_ZERO_RANGE)
    return Status::Error(EOPNOTSUPP, "encrypt: only allocate, punch-hole and zero-range are supported");
  uint64_t end = off + len;
  if (keep || kind == FALLOC_FL_PUNCH_HOLE) {  // punch-hole always keeps the size
    uint64_t size = 0;
    Status s = payload_size(&size);
    if (!s.ok()) return s;
    end = std::min(end, size);
    if (end <= off) return Status::Ok();
  }
  if (kind == FALLOC_FL_ZERO_RANGE) return write_zeros(io, off, end - off);
  // Punch: whole sectors are deallocated below; partly covered edges get encrypted zeros.
  const uint64_t a = up(off), e = down(end);
  if (a >= e) return write_zeros(io, off, end - off);
  Status s = next_->fallocate(io, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, payload_ + a, e - a);
  if (s.ok() && off < a) s = write_zeros(io, off, a - off);
  if (s.ok() && e < end) s = write_zeros(io, e, end - e);
  return s;
}

Status EncryptFilter::resize(const Io& io, uint64_t size) {
  if (!key_) return kNotOpen;
  if (size % kSector) return Status::Error(EINVAL, "encrypt: the size must be a whole number of 512-byte sectors");
  return next_->resize(io, payload_ + size);
}

Status EncryptFilter::seek(const Io& io, uint64_t off, int whence, uint64_t* result) {
  if (!key_) return kNotOpen;
  uint64_t r = 0;
  Status s = next_->seek(io, payload_ + off, whence, &r);
  if (!s.ok()) return s;
  *result = r > payload_ ? r - payload_ : 0;
  return Status::Ok();
}

std::string EncryptFilter::stats_json() const {
  std::string s = "{\"cipher\":\"aes-xts-plain64\",\"key_bits\":" + std::to_string(header_.key_bytes * 8) +
                  ",\"hash\":" + json_str(header_.hash_spec) + ",\"uuid\":" + json_str(header_.uuid) +
                  ",\"keyslot\":" + std::to_string(keyslot_) + ",\"payload_offset\":" + std::to_string(payload_) +
                  ",\"created\":" + (created_ ? "true" : "false");
  s += ",\"encrypted_bytes\":" + std::to_string(encrypted_.load(std::memory_order_relaxed));
  s += ",\"decrypted_bytes\":" + std::to_string(decrypted_.load(std::memory_order_relaxed));
  s += ",\"rmw\":" + std::to_string(rmw_.load(std::memory_order_relaxed)) + "}";
  return s;
}

std::string EncryptFilter::describe() const { return encrypt::describe_encrypt(params_); }

uint64_t encrypt_visible_size(std::string_view head, uint64_t backing_size) {
  l1::Header h;
  if (l1::parse_header(reinterpret_cast<const uint8_t*>(head.data()), head.size(), &h).empty()) {
    const uint64_t p = h.payload_bytes_offset();
    return backing_size > p ? down(backing_size - p) : 0;
  }
  return backing_size;  // empty (a header comes at open) or refused at open: as it is
}

void register_encrypt(Registry& r) {
  FilterInfo info;
  info.name = "encrypt";
  info.cls = FilterClass::Encrypt;
  info.api_version = kFilterApiVersion;
  info.description =
      "stores the image as a LUKS1 container (aes-xts-plain64, PBKDF2 keyslots) that cryptsetup and QEMU's luks "
      "driver open; the layers above see the plaintext payload";
  info.params = encrypt::encrypt_keys();
  info.validate = [](const YAML::Node& params, YAML::Node* where) { return encrypt::validate_encrypt(params, where); };
  info.create = [](const YAML::Node& params) -> std::unique_ptr<Filter> {
    encrypt::EncryptParams p;
    if (!encrypt::parse_encrypt(params, &p).empty()) return nullptr;
    return std::make_unique<EncryptFilter>(p);
  };
  info.visible_size = encrypt_visible_size;
  r.add(std::move(info));
}

}  // namespace iofilterfs
