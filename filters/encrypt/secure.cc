#include "secure.h"

#include <openssl/crypto.h>
#include <sys/mman.h>

#include <cstring>
#include <new>

namespace iofilterfs::encrypt {

SecureBytes::SecureBytes(const void* p, size_t n) {
  resize(n);
  if (n) std::memcpy(p_, p, n);
}

SecureBytes& SecureBytes::operator=(SecureBytes&& o) noexcept {
  if (this != &o) {
    clear();
    p_ = o.p_;
    n_ = o.n_;
    locked_ = o.locked_;
    o.p_ = nullptr;
    o.n_ = 0;
    o.locked_ = false;
  }
  return *this;
}

void SecureBytes::resize(size_t n) {
  clear();
  if (n == 0) return;
  p_ = new uint8_t[n]();
  n_ = n;
  locked_ = ::mlock(p_, n_) == 0;
}

void SecureBytes::clear() {
  if (!p_) return;
  OPENSSL_cleanse(p_, n_);
  if (locked_) ::munlock(p_, n_);
  delete[] p_;
  p_ = nullptr;
  n_ = 0;
  locked_ = false;
}

}  // namespace iofilterfs::encrypt
