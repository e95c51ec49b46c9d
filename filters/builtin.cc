// The filters built into the daemon. Each filter folder (filters/<class>/) provides a
// register_<name>(Registry&) function that adds its FilterInfo; this file calls them all.
//
// Installed so far: throttle. The replicate, cache and encrypt classes arrive with their own
// issues.
#include "filter.h"
#include "encrypt/encrypt_filter.h"
#include "replicate/replicate_filter.h"
#include "throttle/throttle_filter.h"

namespace iofilterfs {

void register_builtin_filters(Registry& r) {
  register_throttle(r);
  register_encrypt(r);
  register_replicate(r);
}

}  // namespace iofilterfs
