#include "xts_aesni.h"

#include <cstdlib>

#if defined(__x86_64__)
#include <immintrin.h>

// Only the functions in this file are compiled for AES-NI; callers check available() first.
#pragma GCC target("aes,sse2")

namespace iofilterfs::encrypt::aesni {
namespace {

constexpr size_t kSector = 512;
constexpr int kLanes = 8;  // blocks (or sectors' first tweaks) in flight at once

inline __m128i load(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline void store(uint8_t* p, __m128i v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }

// One step of the key expansion: the previous round key with each 32-bit word XORed into the
// words after it, then XORed with `word` (already broadcast to all four lanes).
inline __m128i fold(__m128i key, __m128i word) {
  key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
  key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
  key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
  return _mm_xor_si128(key, word);
}

// RotWord(SubWord(last word)) ^ rcon, and SubWord(last word), broadcast. The round constant
// must be an immediate, hence macros.
#define ROT_SUB(k, rcon) _mm_shuffle_epi32(_mm_aeskeygenassist_si128((k), (rcon)), 0xff)
#define SUB(k) _mm_shuffle_epi32(_mm_aeskeygenassist_si128((k), 0), 0xaa)

void expand128(const uint8_t* key, __m128i* rk) {
  rk[0] = load(key);
  rk[1] = fold(rk[0], ROT_SUB(rk[0], 0x01));
  rk[2] = fold(rk[1], ROT_SUB(rk[1], 0x02));
  rk[3] = fold(rk[2], ROT_SUB(rk[2], 0x04));
  rk[4] = fold(rk[3], ROT_SUB(rk[3], 0x08));
  rk[5] = fold(rk[4], ROT_SUB(rk[4], 0x10));
  rk[6] = fold(rk[5], ROT_SUB(rk[5], 0x20));
  rk[7] = fold(rk[6], ROT_SUB(rk[6], 0x40));
  rk[8] = fold(rk[7], ROT_SUB(rk[7], 0x80));
  rk[9] = fold(rk[8], ROT_SUB(rk[8], 0x1b));
  rk[10] = fold(rk[9], ROT_SUB(rk[9], 0x36));
}

void expand256(const uint8_t* key, __m128i* rk) {
  rk[0] = load(key);
  rk[1] = load(key + 16);
  rk[2] = fold(rk[0], ROT_SUB(rk[1], 0x01));
  rk[3] = fold(rk[1], SUB(rk[2]));
  rk[4] = fold(rk[2], ROT_SUB(rk[3], 0x02));
  rk[5] = fold(rk[3], SUB(rk[4]));
  rk[6] = fold(rk[4], ROT_SUB(rk[5], 0x04));
  rk[7] = fold(rk[5], SUB(rk[6]));
  rk[8] = fold(rk[6], ROT_SUB(rk[7], 0x08));
  rk[9] = fold(rk[7], SUB(rk[8]));
  rk[10] = fold(rk[8], ROT_SUB(rk[9], 0x10));
  rk[11] = fold(rk[9], SUB(rk[10]));
  rk[12] = fold(rk[10], ROT_SUB(rk[11], 0x20));
  rk[13] = fold(rk[11], SUB(rk[12]));
  rk[14] = fold(rk[12], ROT_SUB(rk[13], 0x40));
}

#undef ROT_SUB
#undef SUB

// The tweak times alpha in GF(2^128) (IEEE 1619, little-endian): each 64-bit half shifted
// left by one, the carry out of the low half into the high half, the carry out of bit 127
// folded back into the low byte as 0x87.
inline __m128i times_alpha(__m128i t) {
  const __m128i shifted = _mm_add_epi64(t, t);
  // Sign masks of the 32-bit words; word 3's (bit 127) goes to word 0, word 1's (bit 63) to word 2.
  const __m128i carries = _mm_shuffle_epi32(_mm_srai_epi32(t, 31), 0x13);
  return _mm_xor_si128(shifted, _mm_and_si128(carries, _mm_set_epi32(0, 1, 0, 0x87)));
}

// The first tweaks of sectors first..first+m-1 (m <= kLanes): plain64 numbers under the tweak key.
void first_tweaks(const __m128i* tk, int rounds, uint64_t first, int m, __m128i* t) {
  for (int i = 0; i < m; ++i)
    t[i] = _mm_xor_si128(_mm_set_epi64x(0, static_cast<long long>(first + static_cast<uint64_t>(i))), tk[0]);
  for (int r = 1; r < rounds; ++r)
    for (int i = 0; i < m; ++i) t[i] = _mm_aesenc_si128(t[i], tk[r]);
  for (int i = 0; i < m; ++i) t[i] = _mm_aesenclast_si128(t[i], tk[rounds]);
}

// One sector, whose first tweak is t: 32 blocks, eight at a time. The final XOR with the
// tweak is folded into the last round (its last step is an XOR with the round key).
template <bool kEncrypt>
void sector(const __m128i* rk, int rounds, const uint8_t* in, uint8_t* out, __m128i t) {
  for (size_t g = 0; g < kSector; g += kLanes * 16) {
    __m128i tw[kLanes], x[kLanes];
#pragma GCC unroll 8
    for (int i = 0; i < kLanes; ++i) {
      tw[i] = t;
      t = times_alpha(t);
      x[i] = _mm_xor_si128(_mm_xor_si128(load(in + g + i * 16), tw[i]), rk[0]);
    }
    for (int r = 1; r < rounds; ++r) {
      const __m128i k = rk[r];
#pragma GCC unroll 8
      for (int i = 0; i < kLanes; ++i) x[i] = kEncrypt ? _mm_aesenc_si128(x[i], k) : _mm_aesdec_si128(x[i], k);
    }
#pragma GCC unroll 8
    for (int i = 0; i < kLanes; ++i) {
      const __m128i last = _mm_xor_si128(rk[rounds], tw[i]);
      store(out + g + i * 16, kEncrypt ? _mm_aesenclast_si128(x[i], last) : _mm_aesdeclast_si128(x[i], last));
    }
  }
}

// ---- the wide form: VAES on 512-bit registers ----------------------------------------------
#define WIDE __attribute__((target("aes,sse2,avx512f,vaes")))


// Each 128-bit lane (a tweak) times alpha^4: the lane shifted left by four bits, the four bits
// carried out of its low half into its high half, and the four carried out of bit 127 (t) folded
// back as t * (x^7 + x^2 + x + 1), which for four bits is t ^ t<<1 ^ t<<2 ^ t<<7 (no overflow).
WIDE inline __m512i times_alpha4(__m512i t) {
  const __m512i low_halves = _mm512_set_epi64(0, -1, 0, -1, 0, -1, 0, -1);
  // Each half's top four bits, moved to the other half of its lane.
  const __m512i top = _mm512_shuffle_epi32(_mm512_srli_epi64(t, 60), static_cast<_MM_PERM_ENUM>(0x4e));
  const __m512i into_high = _mm512_andnot_si512(low_halves, top);
  const __m512i out_of_127 = _mm512_and_si512(low_halves, top);
  const __m512i folded = _mm512_xor_si512(_mm512_xor_si512(out_of_127, _mm512_slli_epi64(out_of_127, 1)),
                                          _mm512_xor_si512(_mm512_slli_epi64(out_of_127, 2), _mm512_slli_epi64(out_of_127, 7)));
  return _mm512_xor_si512(_mm512_xor_si512(_mm512_slli_epi64(t, 4), into_high), folded);
}

// One sector whose first tweak is t: eight vectors of four blocks, all in flight together.
// (Two or four sectors in flight at once measured no faster: the AES units are the limit.)
template <bool kEncrypt>
WIDE void sector_wide(const __m512i* rk, int rounds, const uint8_t* in, uint8_t* out, __m128i t) {
  constexpr int kVectors = kSector / 64;
  __m512i tw[kVectors], x[kVectors];
  const __m128i t1 = times_alpha(t), t2 = times_alpha(t1), t3 = times_alpha(t2);
  tw[0] = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(t), t1, 1), t2, 2), t3, 3);
#pragma GCC unroll 8
  for (int i = 1; i < kVectors; ++i) tw[i] = times_alpha4(tw[i - 1]);
#pragma GCC unroll 8
  for (int i = 0; i < kVectors; ++i)
    x[i] = _mm512_xor_si512(_mm512_xor_si512(_mm512_loadu_si512(in + i * 64), tw[i]), rk[0]);
  for (int r = 1; r < rounds; ++r) {
    const __m512i k = rk[r];
#pragma GCC unroll 8
    for (int i = 0; i < kVectors; ++i) x[i] = kEncrypt ? _mm512_aesenc_epi128(x[i], k) : _mm512_aesdec_epi128(x[i], k);
  }
#pragma GCC unroll 8
  for (int i = 0; i < kVectors; ++i) {
    const __m512i last = _mm512_xor_si512(rk[rounds], tw[i]);
    _mm512_storeu_si512(out + i * 64, kEncrypt ? _mm512_aesenclast_epi128(x[i], last) : _mm512_aesdeclast_epi128(x[i], last));
  }
}

template <bool kEncrypt>
WIDE void run_wide(const Schedule& s, const uint8_t* in, uint8_t* out, size_t n, uint64_t first) {
  const __m128i* narrow = reinterpret_cast<const __m128i*>(kEncrypt ? s.enc : s.dec);
  const __m128i* tk = reinterpret_cast<const __m128i*>(s.tweak);
  __m512i rk[15];
  for (int r = 0; r <= s.rounds; ++r) rk[r] = _mm512_broadcast_i32x4(narrow[r]);
  __m128i t[kLanes];
  while (n) {
    const int m = n < kLanes ? static_cast<int>(n) : kLanes;
    first_tweaks(tk, s.rounds, first, m, t);
    for (int i = 0; i < m; ++i) sector_wide<kEncrypt>(rk, s.rounds, in + i * kSector, out + i * kSector, t[i]);
    in += m * kSector;
    out += m * kSector;
    first += static_cast<uint64_t>(m);
    n -= static_cast<size_t>(m);
  }
  // No key material left in the broadcast copies.
  for (auto& k : rk) k = _mm512_setzero_si512();
  __asm__ __volatile__("" : : "m"(rk) : "memory");
}

#undef WIDE

template <bool kEncrypt>
void run(const Schedule& s, const uint8_t* in, uint8_t* out, size_t n, uint64_t first) {
  if (s.wide) return run_wide<kEncrypt>(s, in, out, n, first);
  const __m128i* rk = reinterpret_cast<const __m128i*>(kEncrypt ? s.enc : s.dec);
  const __m128i* tk = reinterpret_cast<const __m128i*>(s.tweak);
  __m128i t[kLanes];
  while (n) {
    const int m = n < kLanes ? static_cast<int>(n) : kLanes;
    first_tweaks(tk, s.rounds, first, m, t);
    for (int i = 0; i < m; ++i) sector<kEncrypt>(rk, s.rounds, in + i * kSector, out + i * kSector, t[i]);
    in += m * kSector;
    out += m * kSector;
    first += static_cast<uint64_t>(m);
    n -= static_cast<size_t>(m);
  }
}

}  // namespace

bool available() {
  static const bool yes = __builtin_cpu_supports("aes") && __builtin_cpu_supports("sse2");
  return yes;
}

bool wide_available() {
  static const bool yes = available() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vaes");
  return yes;
}

void expand(const uint8_t* key, size_t key_bytes, bool wide, Schedule* s) {
  s->wide = wide;
  const size_t half = key_bytes / 2;
  __m128i* enc = reinterpret_cast<__m128i*>(s->enc);
  __m128i* dec = reinterpret_cast<__m128i*>(s->dec);
  __m128i* tweak = reinterpret_cast<__m128i*>(s->tweak);
  if (half == 32) {
    s->rounds = 14;
    expand256(key, enc);
    expand256(key + half, tweak);
  } else {
    s->rounds = 10;
    expand128(key, enc);
    expand128(key + half, tweak);
  }
  // The equivalent inverse cipher's schedule: the round keys reversed, the inner ones through
  // InvMixColumns.
  const int nr = s->rounds;
  dec[0] = enc[nr];
  for (int i = 1; i < nr; ++i) dec[i] = _mm_aesimc_si128(enc[nr - i]);
  dec[nr] = enc[0];
}

void encrypt(const Schedule& s, const uint8_t* in, uint8_t* out, size_t n, uint64_t sector) {
  run<true>(s, in, out, n, sector);
}

void decrypt(const Schedule& s, const uint8_t* in, uint8_t* out, size_t n, uint64_t sector) {
  run<false>(s, in, out, n, sector);
}

}  // namespace iofilterfs::encrypt::aesni

#else  // not x86-64: the portable path only

namespace iofilterfs::encrypt::aesni {
bool available() { return false; }
bool wide_available() { return false; }
void expand(const uint8_t*, size_t, bool, Schedule*) { std::abort(); }
void encrypt(const Schedule&, const uint8_t*, uint8_t*, size_t, uint64_t) { std::abort(); }
void decrypt(const Schedule&, const uint8_t*, uint8_t*, size_t, uint64_t) { std::abort(); }
}  // namespace iofilterfs::encrypt::aesni

#endif
