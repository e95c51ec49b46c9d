// The control plane: extended attributes in the `user.iofilter.` namespace.
//
// Reads and writes of these names are answered by the daemon and never reach the backing
// file; every other xattr passes through. On an image:
//   stats   (read)  JSON counters of the disk and each filter
//   state   (read)  active | degraded: REASON | failed: REASON
//   chain   (read)  the ordered filters with their key parameters
//   policy  (read)  the policy's name; (write, root) assign a policy by name, persistently;
//                   removexattr drops the assignment
//   dirty   (read)  bytes the filters hold that the backing file lacks
//   flush   (write) every filter drains, then the backing file is synced
//   fault   (write) a fault-injection plan (fault.h); only with --fault-injection
// On the mount's root:
//   status  (read)  JSON of every open disk
//   filters (read)  the installed filters: name, class, interface version
//   version (read)
//   reload  (write, root) re-read the policy file
#pragma once

#include <fuse_lowlevel.h>

#include <string>
#include <string_view>
#include <vector>

#include "datastore.h"

namespace iofilterfs {

inline constexpr std::string_view kControlPrefix = "user.iofilter.";

inline bool is_control_name(std::string_view name) { return name.substr(0, kControlPrefix.size()) == kControlPrefix; }

// Value of a control xattr. ENODATA for a name this object does not have.
Status control_get(Datastore& ds, Inode& inode, std::string_view name, std::string* value);
// A control verb. EPERM for a mutation by a non-root caller; EINVAL for an unknown verb or a
// malformed value; ENOTSUP for a verb on a file that is not an image. Nothing changes on error.
Status control_set(Datastore& ds, Inode& inode, std::string_view name, std::string_view value, const fuse_ctx* ctx);
// removexattr of a control name: `policy` drops an image's assignment (the rules apply again);
// the others are not stored, EPERM.
Status control_remove(Datastore& ds, Inode& inode, std::string_view name, const fuse_ctx* ctx);
// The control names listxattr shows on this object (NUL-terminated, concatenated).
std::string control_list(Datastore& ds, Inode& inode);

}  // namespace iofilterfs
