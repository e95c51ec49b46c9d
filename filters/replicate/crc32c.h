// CRC-32C (Castagnoli), the checksum of the replicate filter's journal records and bitmap file.
// The SSE4.2 instruction when the CPU has it, three streams interleaved for 12 KiB and more
// (crc32c.cc: about three times one stream's speed, so a journaled write's checksum costs well
// under a copy of its data), else a table.
#pragma once

#include <cstddef>
#include <cstdint>

namespace iofilterfs::replicate {

// Continues `crc` (0 to start) over len bytes.
uint32_t crc32c(uint32_t crc, const void* data, size_t len);
// The CRC of A followed by B from crc_a = crc32c(0, A), crc_b = crc32c(0, B) and B's length
// (zlib's crc32_combine, for the Castagnoli polynomial): lets a journal writer checksum its data
// before it takes the journal lock, and only the 48-byte header under it.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

}  // namespace iofilterfs::replicate
