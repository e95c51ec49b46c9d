// The filters built into the daemon. Each filter folder (filters/<class>/) provides a
// register_<name>(Registry&) function that adds its FilterInfo; this file calls them all.
//
// Installed: one filter of each class — replicate, cache, throttle, encrypt.
#include "filter.h"
#include "cache/cache_filter.h"
#include "encrypt/encrypt_filter.h"
#include "replicate/replicate_filter.h"
#include "throttle/throttle_filter.h"

namespace iofilterfs {

void register_builtin_filters(Registry& r) {
  register_throttle(r);
  register_encrypt(r);
  register_cache(r);
  register_replicate(r);
}

}  // namespace iofilterfs
