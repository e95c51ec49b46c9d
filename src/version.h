#pragma once
namespace iofilterfs {
inline constexpr const char* kVersion = IOFILTERFS_VERSION;
}
