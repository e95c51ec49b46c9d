// The filters built into the daemon. Each filter folder (filters/<class>/) provides a
// register_<name>(Registry&) function that adds its FilterInfo; this file calls them all.
//
// The four classes — replicate, cache, throttle, encrypt — arrive with their own issues; until
// then the registry is empty and every image runs through an empty chain.
#include "filter.h"

namespace iofilterfs {

void register_builtin_filters(Registry& /*r*/) {}

}  // namespace iofilterfs
