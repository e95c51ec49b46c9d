// Command-line parsing and the checks made before anything is mounted.
#pragma once

#include <string>
#include <vector>

#include "options.h"

namespace iofilterfs {

// Exit codes of the daemon (documented in iofilterfs(8)).
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;  // the mount failed or the daemon failed while running
inline constexpr int kExitUsage = 2;    // bad command line, bad paths, bad configuration

// Applies one comma-separated -o list to *opt. Returns an error message or "".
std::string apply_mount_options(const std::string& list, MountOptions* opt);

// Resolves and checks the backing directory and mountpoint, before anything changes:
// the backing directory exists and is a directory, writable unless read-only is asked for;
// the mountpoint is an empty directory that is not already a mountpoint and does not lie
// inside the backing tree (nor the other way round). Returns an error message or "".
std::string check_paths(MountOptions* opt);

}  // namespace iofilterfs
