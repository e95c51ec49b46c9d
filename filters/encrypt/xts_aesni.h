// aes-xts-plain64 on the CPU's AES instructions (x86-64 AES-NI), in one pass over the data.
//
// The portable path in xts.cc builds XTS from OpenSSL's AES-ECB: it writes every block's tweak
// to a scratch buffer, XORs the data with it, runs ECB over the chunk and XORs again, so a
// sector crosses memory three times and the tweaks are made one 64-bit half at a time. Here a
// sector is read once and written once: eight blocks at a time are loaded, XORed with their
// tweaks (kept in registers, each the previous times alpha), taken through the AES rounds
// interleaved (so the eight blocks hide each instruction's latency), XORed again and stored.
// A sector's first tweak is its plain64 number encrypted under the tweak key, eight sectors at
// a time.
//
// Used when the CPU has AES-NI (checked once at run time; the functions are compiled for it
// with a target attribute, so the rest of the build needs no -maes). The unit tests hold it to
// OpenSSL's XTS byte for byte, as they do the portable path.
//
// Where the CPU also has VAES on 512-bit registers (AVX-512F + VAES: Ice Lake and later Intel,
// AMD Zen 4 and later), the wide form runs four blocks per instruction: a sector is eight
// 512-bit vectors, all in flight at once, and the tweaks advance four blocks per step (each
// 128-bit lane times alpha^4). The first tweaks are made as above.
//
// Measured on this project's machines (AMD EPYC Zen 5, one core, 1 MiB requests): see
// bench/encrypt_bench.sh's cipher line. An earlier VAES variant on 256-bit registers that made
// every block's tweak one at a time ran slower than the 128-bit form (~4.5 GB/s): the serial
// tweak chain, not the AES units, was its limit; the alpha^4 step removes that chain.
#pragma once

#include <cstddef>
#include <cstdint>

namespace iofilterfs::encrypt::aesni {

// Whether this CPU can run the functions below (AES-NI), and whether it can run their wide form.
bool available();
bool wide_available();

// Expanded keys of one XTS key: the data key's encryption and decryption schedules and the
// tweak key's encryption schedule. Holds key material: keep it in SecureBytes (aligned to 16).
struct Schedule {
  alignas(16) uint8_t enc[15 * 16];
  alignas(16) uint8_t dec[15 * 16];
  alignas(16) uint8_t tweak[15 * 16];
  int rounds;  // 10 (AES-128) or 14 (AES-256)
  bool wide;   // encrypt/decrypt run the 512-bit VAES form
};

// key: 32 bytes (AES-128-XTS) or 64 (AES-256-XTS), data key first, tweak key second.
// wide: use the VAES form (requires wide_available()). Requires available().
void expand(const uint8_t* key, size_t key_bytes, bool wide, Schedule* s);

// n sectors of 512 bytes from in to out (which may be the same buffer, not otherwise
// overlapping); the first sector's tweak is `sector`. Requires available().
void encrypt(const Schedule& s, const uint8_t* in, uint8_t* out, size_t n, uint64_t sector);
void decrypt(const Schedule& s, const uint8_t* in, uint8_t* out, size_t n, uint64_t sector);

}  // namespace iofilterfs::encrypt::aesni
