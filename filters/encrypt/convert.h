// Offline conversion of a plaintext image into a LUKS1 container, for `iofilterctl encrypt SRC
// DST`: the engine, without any command line. DST gets exactly what the encrypt filter would
// have written had the image been created through the mount and filled with SRC's bytes: a
// fresh header (random master key, keyslot 0 opened by the passphrase), then SRC encrypted
// sector by sector, its size rounded up to whole sectors (the tail padded with zeros).
//
// sparse: all-zero 1 MiB chunks of SRC are left as holes in DST instead of being encrypted.
// Through the mount they read as zeros (encrypt_filter.h, "holes"); other LUKS readers
// (cryptsetup, QEMU) see noise there, so keep sparse off for images that leave the datastore.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "encrypt/params.h"
#include "encrypt/secure.h"

namespace iofilterfs::encrypt {

struct ConvertStats {
  uint64_t payload_bytes = 0;    // SRC's size rounded up to whole sectors
  uint64_t encrypted_bytes = 0;  // written as ciphertext
  uint64_t skipped_bytes = 0;    // all-zero chunks left as holes (sparse)
  uint64_t payload_offset = 0;   // where the payload starts in DST
};

// Reads SRC (src_fd, from offset 0) and writes DST (dst_fd, which must be empty), then fsyncs
// DST. p gives the new header's key size, hash and PBKDF2 time. progress (may be null) is told
// the bytes done and the total after each chunk. Returns "" or why not (never with key
// material); on failure DST holds a partial container the caller removes.
std::string encrypt_image(int src_fd, int dst_fd, const EncryptParams& p, const SecureBytes& pass, bool sparse,
                          ConvertStats* stats,
                          const std::function<void(uint64_t done, uint64_t total)>& progress = nullptr);

}  // namespace iofilterfs::encrypt
