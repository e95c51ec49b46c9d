// iofilterctl's offline commands on encrypted images: they work on the backing file (a LUKS1
// container), not through the mount, and never while an iofilterfs daemon has the image open
// (they take the same whole-file lock the daemon holds on every open image, so a running disk
// is refused, never changed under the daemon's feet).
//
//   encrypt SRC DST     a plaintext image into a new LUKS1 container (filters/encrypt/convert.h)
//   key list IMAGE      the header and its keyslots (no key material)
//   key add IMAGE       a new passphrase in a free keyslot, unlocked by an existing one
//   key remove IMAGE    disables a keyslot (never the last one)
//
// Passphrases come from files (--key-file, byte for byte as the encrypt filter and cryptsetup
// --key-file read them; "-" reads standard input) and are held in locked, wiped memory. They
// never appear in output or error messages.
#pragma once

#include <cstdint>
#include <string>

namespace iofilterctl {

struct EncryptOptions {
  std::string key_file;
  uint64_t iter_time_us = 2'000'000;
  uint32_t key_bits = 512;
  std::string hash = "sha256";
  bool sparse = false;
  bool progress = false;  // print progress on stderr
};

// Each returns iofilterctl's exit code (0 done, 1 failed, 4 wrong passphrase) after printing
// what it did (or why not) itself.
int cmd_encrypt(const std::string& src, const std::string& dst, const EncryptOptions& o);
int cmd_key_list(const std::string& image, bool json);
// slot < 0: the first free keyslot.
int cmd_key_add(const std::string& image, const std::string& key_file, const std::string& new_key_file, int slot,
                uint64_t iter_time_us, bool json);
// slot < 0: the keyslot that key_file opens; else key_file must open some active keyslot.
int cmd_key_remove(const std::string& image, const std::string& key_file, int slot, bool json);

}  // namespace iofilterctl
