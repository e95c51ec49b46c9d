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
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "bucket.h"

namespace YAML { class Node; }

namespace iofilterfs::throttle {

// Every accepted key, in the table's order (the order describe() prints them in).
const std::vector<std::string_view>& throttle_keys();

// FilterInfo::validate: empty when params are valid, else a precise message; *where (may be
// null) is pointed at the offending key or value node, or left alone to blame the whole map.
std::string validate_throttle(const YAML::Node& params, YAML::Node* where);

// Parses valid params into *cfg; returns validate_throttle's message (and leaves *cfg alone)
// when they are not valid.
std::string parse_throttle(const YAML::Node& params, ThrottleConfig* cfg, YAML::Node* where = nullptr);

// "iops=500 iops-max=2000 iops-max-length=2s bps=20MiB/s": every set key, in table order,
// each value written so that parse_throttle reads it back.
std::string describe_throttle(const ThrottleConfig& cfg);

}  // namespace iofilterfs::throttle
