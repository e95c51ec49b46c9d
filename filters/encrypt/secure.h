// Key material in memory: a fixed-size byte buffer that is locked into RAM where the system
// allows it (mlock, so it is never written to swap) and wiped (OPENSSL_cleanse) when it is
// freed or resized. Passphrases, derived keys and master keys live only in these.
#pragma once

#include <cstddef>
#include <cstdint>

namespace iofilterfs::encrypt {

class SecureBytes {
 public:
  SecureBytes() = default;
  explicit SecureBytes(size_t n) { resize(n); }
  SecureBytes(const void* p, size_t n);
  ~SecureBytes() { clear(); }
  SecureBytes(SecureBytes&& o) noexcept : p_(o.p_), n_(o.n_), locked_(o.locked_) {
    o.p_ = nullptr;
    o.n_ = 0;
    o.locked_ = false;
  }
  SecureBytes& operator=(SecureBytes&& o) noexcept;
  SecureBytes(const SecureBytes&) = delete;
  SecureBytes& operator=(const SecureBytes&) = delete;

  // Wipes and frees, then allocates n zero bytes.
  void resize(size_t n);
  // Wipes and frees.
  void clear();

  uint8_t* data() { return p_; }
  const uint8_t* data() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  // Whether mlock succeeded (it may not, under a small RLIMIT_MEMLOCK).
  bool locked() const { return locked_; }

 private:
  uint8_t* p_ = nullptr;
  size_t n_ = 0;
  bool locked_ = false;
};

}  // namespace iofilterfs::encrypt
