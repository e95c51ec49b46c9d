// Continuous data protection for the replicate filter (`retention`): the image's past, kept as
// a base image plus the journal's records since it, so the disk can be rebuilt as it was at
// any moment of the window, or at a named restore point.
//
//   NAME.cdp-base   a sparse raw copy of the disk at the window's start
//   NAME.cdp-meta   64 bytes: "IOFRCDP1", u64 window_start (ns since the epoch), u64 history_off,
//                   u64 history_seq (the first journal record after the base), 32 u32 crc32c,
//                   40 u64 payload_off (0, or under encryption the container's header size)
//   NAME.journal    records from history_off on (journal.h), with their times; restore points
//                   are Point records named by the snapshot verb. In mode: async this is the
//                   shipping journal itself; in mode: sync a journal of the same format that the
//                   synchronous write path appends to (before the local write) and nothing ships.
//
// Under a policy that also encrypts, the history is the backing file's bytes, never plaintext:
// the base is the whole LUKS container (its header, then the payload's ciphertext) and the
// records hold ciphertext of whole sectors at payload offsets, which restore and compaction
// move by payload_off. The restored file is the container as it was, which opens with the key
// (with the keyslots it had when the history started).
//
// Restoring to T copies the base and applies, in order, every record up to T (up to the named
// Point). Compaction (by the filter, in the background) folds records older than the retention
// into the base: it first moves window_start forward to the newest record it will fold (so no
// restore can ask for a moment the base has gone past), applies them, syncs the base, then
// records the new history_off and punches the folded records out of the journal. A restore
// holds a shared flock on the meta file, compaction an exclusive one, so they never overlap.
//
// No FUSE and no daemon here: iofilterctl links this to restore from the files directly.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace iofilterfs::replicate {

struct HistoryMeta {
  uint64_t window_start_ns = 0;
  uint64_t history_off = 0;
  uint64_t history_seq = 0;
  uint64_t payload_off = 0;  // where record offset 0 is in the base (the container's header size)
};
void encode_history_meta(const HistoryMeta& m, uint8_t out[64]);
std::string decode_history_meta(const uint8_t in[64], HistoryMeta* out);
// Reads / writes (tmp, fdatasync, rename) the meta file.
std::string read_history_meta(const std::string& path, HistoryMeta* out);
std::string write_history_meta(const std::string& path, const HistoryMeta& m);

struct HistoryFiles {
  std::string journal, base, meta;
};

struct RestorePoint {
  std::string name;
  uint64_t time_ns = 0;
};
struct HistoryInfo {
  uint64_t window_start_ns = 0;  // the oldest moment that can be restored
  uint64_t last_record_ns = 0;   // the newest change kept (0: none since the window started)
  uint64_t records = 0;
  std::vector<RestorePoint> points;
};
std::string list_history(const HistoryFiles& f, HistoryInfo* out);

// Rebuilds the disk into `output` (created or truncated) as it was at time `at_ns`, or, when
// `point` is not empty, at the restore point of that name (the last one of that name). The
// answer says why not: a moment before the window, an unknown point, unreadable files.
std::string restore_history(const HistoryFiles& f, uint64_t at_ns, const std::string& point, const std::string& output,
                            uint64_t* applied_records);

}  // namespace iofilterfs::replicate
