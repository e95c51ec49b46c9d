// The replicate filter's parameters. Validation is pure (no file or network is touched):
//
//   target: DIR | nbd://HOST[:PORT]/EXPORT | nbd+unix:///EXPORT?socket=PATH | nbds://...
//                                  where the replica goes (required). A directory: the replica
//                                  of MOUNT/a/b.img is DIR/a/b.img. An NBD URI: libnbd's syntax,
//                                  including its TLS query parameters (nbds://, tls-certificates=,
//                                  tls-psk-file=, tls-username=).
//   mode: sync | async             sync (default): a write completes when both the backing file
//                                  and the target have it; async: when the local write and its
//                                  journal record are done, shipped in order in the background.
//   journal: DIR                   where the image's journal, dirty bitmap and state live
//                                  (required; absolute). One set of files per image.
//   max-lag: SIZE                  async: the most unshipped data the journal holds (default 1GiB,
//                                  at least 1MiB).
//   on-overflow: bitmap | backpressure   async, beyond max-lag: collapse the journal into the
//                                  dirty bitmap and resync (default), or hold writes until the
//                                  lag is under max-lag again (while the target is reachable).
//   on-target-error: degrade | fail      sync, when the target fails: track changes in the
//                                  bitmap, resync and return to sync when it is back (default),
//                                  or fail the guest's write with EIO.
//   region-size: SIZE              the bitmap's granularity: a power of two from 4KiB to 64MiB
//                                  (default 64KiB).
//   retention: DURATION            keep the history of writes this long (continuous data
//                                  protection; 1s .. 365d), for `iofilterctl restore` (history.h);
//                                  async: the history is the journal; sync: a history journal
//                                  the write path appends to before the local write
//   reconnect-max: DURATION        the longest wait between reconnection attempts (the wait
//                                  starts at 100ms and doubles; default 5s, 100ms .. 10m).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace YAML { class Node; }

namespace iofilterfs::replicate {

enum class Mode { Sync, Async };
enum class Overflow { Bitmap, Backpressure };
enum class OnError { Degrade, Fail };

struct ReplicateParams {
  std::string target;
  bool target_is_nbd = false;
  Mode mode = Mode::Sync;
  std::string journal;
  uint64_t max_lag = uint64_t(1) << 30;
  Overflow on_overflow = Overflow::Bitmap;
  OnError on_error = OnError::Degrade;
  uint32_t region_shift = 16;
  uint64_t reconnect_max_us = 5'000'000;
  uint64_t retention_us = 0;  // 0: no history kept
  bool operator==(const ReplicateParams&) const = default;
};

const std::vector<std::string>& replicate_keys();

// FilterInfo::validate: "" or a precise message; *where (may be null) points at the offending
// node, or is left alone to blame the whole map.
std::string validate_replicate(const YAML::Node& params, YAML::Node* where);
std::string parse_replicate(const YAML::Node& params, ReplicateParams* out, YAML::Node* where = nullptr);
// "target=nbd+unix:///r?socket=/run/r.sock mode=async journal=/var/lib/r max-lag=1GiB ..."
std::string describe_replicate(const ReplicateParams& p);

}  // namespace iofilterfs::replicate
