// Human units for sizes and durations ("64KiB", "250ms"), shared by the CLI, the control plane
// and filters. Pure functions; an empty error string means success.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace iofilterfs {

// "4096", "64KiB", "20GiB", "1M" (binary), "1MB" (decimal) -> bytes.
std::string parse_size(std::string_view s, uint64_t* bytes);
// "250ms", "5s", "24h", "500us", "2m" -> microseconds. A bare number is seconds.
std::string parse_duration(std::string_view s, uint64_t* usec);
// 1536 -> "1.5KiB"
std::string format_size(uint64_t bytes);

}  // namespace iofilterfs
