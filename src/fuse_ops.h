// The FUSE low-level operations of the datastore mount.
#pragma once

#include <fuse_lowlevel.h>

namespace iofilterfs {

// The operation table; the session's userdata must be the Datastore.
const fuse_lowlevel_ops& datastore_operations();

}  // namespace iofilterfs
