// CRC-32C (Castagnoli), the checksum of the replicate filter's journal records and bitmap file.
// The SSE4.2 instruction when the CPU has it (several GB/s, so checksumming every journaled
// write costs little next to the write itself), else a table.
#pragma once

#include <cstddef>
#include <cstdint>

namespace iofilterfs::replicate {

// Continues `crc` (0 to start) over len bytes.
uint32_t crc32c(uint32_t crc, const void* data, size_t len);

}  // namespace iofilterfs::replicate
