// The encrypt filter (class encrypt, the last filter above the backing file): the image is
// stored as a LUKS1 container — cryptsetup and QEMU's luks driver open the backing file
// directly — while the layers above see the plaintext payload. A thin adapter over luks1.h (the
// header, keyslots, PBKDF2, the splitter), xts.h (the data cipher with per-thread contexts) and
// params.h (the keys and where the passphrase comes from).
//
// Offsets: the layers above see the payload only. Byte x above is byte payload + x below, and
// sector x/512 of the payload is encrypted with IV x/512 (plain64 counts from the payload's
// start, as dm-crypt and QEMU do). The visible size is (backing size - payload) rounded down to
// whole sectors; resize() takes whole sectors only (EINVAL otherwise).
//
// Requests:
//   read     aligned: the ciphertext lands in the caller's buffer and is decrypted there, in
//            place; unaligned: the covering sectors go through the per-thread scratch buffer.
//   write    encrypted into the per-thread scratch buffer (BufferSlot::Filter), never into the
//            caller's; a request that starts or ends inside a sector reads, decrypts, patches and
//            re-encrypts that edge sector, holding the edge sectors' stripes of a lock table so
//            that two such read-modify-writes of one sector (neighbouring unaligned writes)
//            never lose each other's bytes. Aligned writes take no lock.
//   holes    a sector whose ciphertext is all zero bytes reads as zeros: a hole of the backing
//            file, an area a grow or a write past the end left unwritten, or one punched out.
//            (Real ciphertext is all zeros with probability 2^-4096.) Other LUKS readers see
//            such sectors as the decryption of zeros, as dm-crypt shows discarded sectors.
//   fallocate
//            zero-range writes encrypted zeros (every LUKS reader then reads zeros);
//            punch-hole deallocates the whole sectors below (they read as zeros, see holes) and
//            writes encrypted zeros into partly covered edge sectors; allocation (mode 0,
//            KEEP_SIZE) passes down, shifted; other modes are refused (EOPNOTSUPP).
//   seek     SEEK_DATA / SEEK_HOLE pass down, shifted by the payload offset.
//
// open(): an empty backing file gets a new header (a random master key, keyslot 0 opened by
// the policy's passphrase); a file with a LUKS1 header is unlocked (a passphrase no keyslot
// accepts: EACCES, and nothing is written); any other non-empty file is refused (EMEDIUMTYPE):
// plaintext is never read as ciphertext.
//
// Threads: read/write/fallocate/... run concurrently on FUSE workers; open/close under the
// disk's control lock, never alongside requests. The key, payload offset and header facts are
// set by open() and immutable until close(). rmw_locks_ are leaf locks, taken in stripe order.
// Counters are relaxed atomics.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>

#include "encrypt/luks1.h"
#include "encrypt/params.h"
#include "encrypt/xts.h"
#include "filter.h"

namespace iofilterfs {

class EncryptFilter : public Filter {
 public:
  explicit EncryptFilter(encrypt::EncryptParams p);
  ~EncryptFilter() override;

  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override;
  Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len) override;
  Status resize(const Io& io, uint64_t size) override;
  Status seek(const Io& io, uint64_t off, int whence, uint64_t* result) override;
  Status size(uint64_t* out) override;

  Status open(const DiskInfo& info) override;
  void close() override;
  // pbkdf-iter-time, key-size and hash only shape headers yet to be written: taken in place. A
  // new key-file or credential is taken in place only when its passphrase opens this image's
  // header (checked while requests keep flowing); otherwise a fresh instance replaces this one
  // and its open fails (EACCES), so the change is refused and this filter stays.
  bool reconfigure(const YAML::Node& params) override;

  // What the filters above use to keep their own copies (cache device, replication journal and
  // target) sealed: the container's own data cipher (filter.h, AtRest).
  std::shared_ptr<const AtRest> at_rest() const override { return at_rest_; }
  // Always refused: see filter.h.
  std::string removal_refused() const override;

  // {"cipher":"aes-xts-plain64","key_bits":N,"hash":S,"uuid":S,"keyslot":N,"payload_offset":N,
  //  "created":B,"encrypted_bytes":N,"decrypted_bytes":N,"rmw":N}: see iofilterfs.yaml(5).
  std::string stats_json() const override;
  std::string describe() const override;

  // The payload offset in bytes (0 before open); for tests.
  uint64_t payload_offset() const { return payload_; }

 private:
  static constexpr int kLockStripes = 64;
  std::mutex& stripe(uint64_t sector) { return rmw_locks_[(sector * 0x9E3779B97F4A7C15ull) >> 58]; }
  // Reads sector `s` of the payload into out as plaintext (zeros past the end or in a hole).
  Status read_sector(const Io& io, uint64_t s, uint8_t* out);
  // The payload's visible size (whole sectors).
  Status payload_size(uint64_t* out);
  // Writes encrypted zeros over [off, off+len) of the payload.
  Status write_zeros(const Io& io, uint64_t off, uint64_t len);
  // An open() failure with msg; Status::what stays valid for the process's life.
  static Status fail_open(int err, std::string msg);
  // Whether the passphrase that p names opens this image's header.
  bool passphrase_opens(const encrypt::EncryptParams& p);

  class Sealer : public AtRest {
   public:
    Sealer(std::shared_ptr<encrypt::XtsKey> key, uint64_t header, Layer* below)
        : key_(std::move(key)), header_(header), below_(below) {}
    ~Sealer() override { key_->revoke(); }
    Status seal(uint64_t off, const void* in, void* out, size_t len) const override;
    Status unseal(uint64_t off, const void* in, void* out, size_t len) const override;
    uint64_t header_bytes() const override { return header_; }
    Status read_header(void* buf, size_t len, uint64_t off) const override;

   private:
    std::shared_ptr<encrypt::XtsKey> key_;
    uint64_t header_;
    Layer* below_;  // the layer under the encrypt filter; the disk outlives its filters
  };

  encrypt::EncryptParams params_;        // changed by reconfigure(), under the control lock
  std::shared_ptr<encrypt::XtsKey> key_;  // set by open()
  uint64_t payload_ = 0;                  // bytes, set by open()
  encrypt::luks1::Header header_;         // set by open(); no key material
  std::shared_ptr<const AtRest> at_rest_;  // set by open()
  int keyslot_ = -1;
  bool created_ = false;
  std::array<std::mutex, kLockStripes> rmw_locks_;
  std::atomic<uint64_t> encrypted_{0}, decrypted_{0}, rmw_{0};
};

// FilterInfo::visible_size: the payload's size when head holds a usable LUKS1 header, else
// backing_size unchanged.
uint64_t encrypt_visible_size(std::string_view head, uint64_t backing_size);

// Adds "encrypt" to the registry.
void register_encrypt(Registry& r);

}  // namespace iofilterfs
