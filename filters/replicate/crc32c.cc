#include "replicate/crc32c.h"

#include <array>
#include <cstring>

namespace iofilterfs::replicate {
namespace {

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kTable = make_table();

uint32_t crc_soft(uint32_t c, const uint8_t* p, size_t n) {
  while (n--) c = kTable[(c ^ *p++) & 0xff] ^ (c >> 8);
  return c;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t crc_hw(uint32_t c, const uint8_t* p, size_t n) {
  uint64_t c64 = c;
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c64 = __builtin_ia32_crc32di(c64, v);
    p += 8;
    n -= 8;
  }
  c = static_cast<uint32_t>(c64);
  while (n--) c = __builtin_ia32_crc32qi(c, *p++);
  return c;
}
const bool kHaveHw = __builtin_cpu_supports("sse4.2");

// Three streams at once. The crc32 instruction has a latency of 3 cycles and a throughput of
// one per cycle, so one stream uses a third of it: the data goes in blocks of 3 x kLane bytes,
// each lane's CRC register runs independently (the first from the running value, the others
// from 0), and the lanes are joined by shifting a register over kLane zero bytes (a linear map
// of the 32-bit register, applied with four 256-entry tables) and XORing the next lane in
// (Mark Adler's crc32c.c, the same idea).
constexpr size_t kLane = 4096;

struct Shift {
  uint32_t t[4][256];
};

// The register after kLane zero bytes, for every byte value in every byte position. Built once
// from the 32 single-bit registers (the map is linear over GF(2)).
__attribute__((target("sse4.2"))) Shift make_shift() {
  Shift s{};
  static const uint8_t zeros[kLane] = {};
  uint32_t bit[32];
  for (int i = 0; i < 32; ++i) bit[i] = crc_hw(1u << i, zeros, kLane);
  for (int k = 0; k < 4; ++k)
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t v = 0;
      for (int j = 0; j < 8; ++j)
        if (b & (1u << j)) v ^= bit[8 * k + j];
      s.t[k][b] = v;
    }
  return s;
}

inline uint32_t shift(const Shift& s, uint32_t c) {
  return s.t[0][c & 0xff] ^ s.t[1][(c >> 8) & 0xff] ^ s.t[2][(c >> 16) & 0xff] ^ s.t[3][c >> 24];
}

__attribute__((target("sse4.2"))) uint32_t crc_hw3(uint32_t c, const uint8_t* p, size_t n) {
  static const Shift kShift = make_shift();
  while (n >= 3 * kLane) {
    uint64_t a = c, b = 0, d = 0;
    const uint8_t* q = p;
    for (size_t i = 0; i < kLane; i += 8, q += 8) {
      uint64_t va, vb, vd;
      std::memcpy(&va, q, 8);
      std::memcpy(&vb, q + kLane, 8);
      std::memcpy(&vd, q + 2 * kLane, 8);
      a = __builtin_ia32_crc32di(a, va);
      b = __builtin_ia32_crc32di(b, vb);
      d = __builtin_ia32_crc32di(d, vd);
    }
    c = shift(kShift, static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b);
    c = shift(kShift, c) ^ static_cast<uint32_t>(d);
    p += 3 * kLane;
    n -= 3 * kLane;
  }
  return crc_hw(c, p, n);
}
#endif

}  // namespace

uint32_t crc32c(uint32_t crc, const void* data, size_t len) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
#if defined(__x86_64__)
  if (kHaveHw) return ~(len >= 3 * kLane ? crc_hw3(c, p, len) : crc_hw(c, p, len));
#endif
  return ~crc_soft(c, p, len);
}

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected

// a(x) * b(x) modulo the polynomial, in the reflected bit order (zlib's multmodp).
uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = b & 1 ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

struct X2n {
  uint32_t t[32];  // x^(2^k) modulo the polynomial
  X2n() {
    uint32_t p = 1u << 30;  // x^1
    t[0] = p;
    for (int k = 1; k < 32; ++k) t[k] = p = multmodp(p, p);
  }
};
const X2n kX2n;

// x^(n * 2^k) modulo the polynomial.
uint32_t x2nmodp(uint64_t n, unsigned k) {
  uint32_t p = 1u << 31;  // x^0
  while (n) {
    if (n & 1) p = multmodp(kX2n.t[k & 31], p);
    n >>= 1;
    ++k;
  }
  return p;
}

}  // namespace

// crc_a shifted over len_b zero bytes (a multiplication by x^(8 len_b)), then crc_b XORed in
// (zlib 1.2.12's crc32_combine: about 20 polynomial products for a MiB, where the matrix
// method took some 40 matrix squarings: this runs under the journal lock).
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  if (len_b == 0) return crc_a;
  return multmodp(x2nmodp(len_b, 3), crc_a) ^ crc_b;
}

}  // namespace iofilterfs::replicate
