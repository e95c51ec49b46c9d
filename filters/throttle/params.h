// The throttle filter's parameters: one table of keys shared by validation, parsing, the key
// listing and describe(). Pure functions; no FUSE, files or clocks.
//
// Keys (all optional, at least one limit required; QEMU's throttling.* names in brackets):
//   iops, read-iops, write-iops      ops/s, whole number > 0          [iops-total, -read, -write]
//   bps, read-bps, write-bps         bytes/s: 1048576, 20MiB/s, 1GB/s [bps-total, -read, -write]
//   <limit>-max                      burst rate, same unit, >= <limit>
//   <limit>-max-length               duration (2s, 500ms, 1m; a plain number is seconds),
//                                    default 1s; needs <limit>-max
//   iops-size                        bytes (4096, 4KiB); needs an iops limit
// A total limit excludes the read/write limits of the same kind, as in QEMU.
// Groups and datastore QoS (group.h, qos.h):
//   group                            a name: every disk naming it shares one budget, the
//                                    limits above (which then are the group's); needs a limit
//   shares                           1..1000000 or low/normal/high (500/1000/2000); default 1000
//   reservation                      IOPS guaranteed under congestion; <= limit and <= iops
//   limit                            IOPS cap (mClock's L, no burst)
// At least one limit or QoS key is required.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bucket.h"
#include "qos.h"

namespace YAML { class Node; }

namespace iofilterfs::throttle {

// Every accepted key, in the table's order (the order describe() prints them in).
const std::vector<std::string_view>& throttle_keys();

// FilterInfo::validate: empty when params are valid, else a precise message; *where (may be
// null) is pointed at the offending key or value node, or left alone to blame the whole map.
std::string validate_throttle(const YAML::Node& params, YAML::Node* where);

// Everything one policy's throttle says.
struct ThrottleParams {
  ThrottleConfig limits;  // the disk's own limits, or with `group` the group's
  std::string group;      // empty: none
  uint64_t shares = kDefaultShares;
  uint64_t reservation = 0;  // IOPS; 0: none
  uint64_t limit = 0;        // IOPS; 0: none
  bool operator==(const ThrottleParams&) const = default;
};

// Parses valid params into *out; returns validate_throttle's message (and leaves *out alone)
// when they are not valid.
std::string parse_throttle(const YAML::Node& params, ThrottleParams* out, YAML::Node* where = nullptr);
// The same, for the limits only.
std::string parse_throttle(const YAML::Node& params, ThrottleConfig* cfg, YAML::Node* where = nullptr);

// FilterInfo::validate_policies: every policy's throttle parameters together (policy name,
// params, in file order). Refuses two policies that name one group with different limits,
// pointing *where at the second one's group value.
std::string validate_throttle_policies(const std::vector<std::pair<std::string, YAML::Node>>& uses,
                                       YAML::Node* where);

// Every set key of params, as describe_throttle(limits) followed by group, shares (when not
// the default), reservation and limit.
std::string describe_throttle(const ThrottleParams& p);

// "iops=500 iops-max=2000 iops-max-length=2s bps=20MiB/s": every set key, in table order,
// each value written so that parse_throttle reads it back.
std::string describe_throttle(const ThrottleConfig& cfg);

}  // namespace iofilterfs::throttle
