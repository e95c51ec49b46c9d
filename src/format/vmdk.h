// VMDK: the guest-visible disk of a VMDK image, as a Layer (the raw view's other format).
//
// A VMDK disk is a text descriptor listing extents, in guest order; each extent is
//   FLAT / VMFS – the bytes themselves, in a file at an offset;
//   SPARSE      – a hosted sparse extent ("KDMV" header): a grain directory (GD) of grain-table
//                 (GT) offsets, each GT a run of grain offsets, in sectors; 0 is unallocated
//                 (reads as zeros), 1 a zeroed grain when the header says so. A redundant GD
//                 with its own GTs mirrors the first and is kept in step on write;
//   ZERO        – zeros.
// monolithicSparse and streamOptimized keep the descriptor inside their one sparse extent;
// monolithicFlat and the twoGbMaxExtent kinds have a descriptor file beside the extents.
// streamOptimized grains are deflate-compressed behind a marker, and its GD is in a footer:
// it is read-only here.
//
// Writes to a sparse extent fill a grain in place when it is allocated, else append a new
// grain at the end of the extent file; the GT entries (both copies) change in memory and are
// written by flush() after the data is durable, so a crash leaves at worst unreferenced grains.
//
// Growth (resize to a larger size; shrinking is refused): the last extent grows, and for the
// twoGbMaxExtent kinds new extent files (2 GiB each at most, named as qemu-img names them) are
// added; sparse extents get grain tables for every new directory entry, as qemu-img makes them
// (QEMU cannot write under a directory entry of 0). Each step is durable before the one that
// makes it visible, so a crash at any point leaves a consistent image of the old or the new
// size (at worst unreferenced tables or extent files):
//   sparse extent: new grain tables, then the directories (in place when the entries fit in the
//     directory's last sector, else a copy of each at the end of the file), then - for an
//     embedded descriptor - the descriptor's extent line, then the header's capacity and
//     directory offsets in one sector write, the commit (QEMU sizes a sparse extent by its header);
//   descriptor file: the extents first (flat files extended, new files made and synced), then
//     the descriptor rewritten in place in one write and synced (not a new file renamed over it:
//     the daemon's inode table and the disk hold the file open, and would be left on the
//     unlinked old one - writes to the view would land there).
//
// Untrusted input: header fields, the GD and every GT/grain offset are checked against the
// file before use; a bad one fails that request (EIO) and marks the image corrupt.
//
// Threads: layout_mu_ guards the extent list and the size: read/write/seek hold it shared,
// resize exclusive. mu_ guards the grain tables; data I/O to allocated grains happens without
// it. Lock order: layout_mu_, then mu_.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "filter.h"

namespace iofilterfs::format {

struct VmdkOptions {
  bool read_only = false;
  std::string path;          // the descriptor's (or sparse file's) path: extents are beside it
  std::string backing_root;  // when set, extent files must lie under it
};

class Vmdk final : public Layer {
 public:
  // `file` is the descriptor file or the single sparse extent (not owned).
  static Status open(Layer* file, const VmdkOptions& opt, std::unique_ptr<Vmdk>* out, std::string* err);
  ~Vmdk() override;

  bool read_only() const { return read_only_; }
  const std::string& read_only_reason() const { return ro_reason_; }
  const std::string& create_type() const { return create_type_; }
  uint64_t virtual_size() const { return size_; }
  bool corrupt() const { return corrupt_.load(); }

  Status read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) override;
  Status write(const Io& io, const void* buf, size_t len, uint64_t off) override;
  Status sync(const Io& io, bool datasync) override;
  Status fallocate(const Io& io, int mode, uint64_t off, uint64_t len) override;
  Status resize(const Io& io, uint64_t size) override;
  Status seek(const Io& io, uint64_t off, int whence, uint64_t* result) override;
  Status size(uint64_t* out) override;
  Status flush();

 private:
  struct Sparse {
    uint64_t grain_sectors = 0;
    uint32_t gtes = 0;            // entries per grain table
    bool zero_grains = false;     // GTE 1 means a zeroed grain
    bool compressed = false;      // streamOptimized
    std::vector<uint32_t> gd, rgd;  // sector offsets of the GTs
    uint64_t gd_off = 0, rgd_off = 0;  // bytes
    uint64_t file_end = 0;        // bytes, where the next grain goes
    std::unordered_map<uint64_t, std::vector<uint32_t>> gts;  // GD index → its GT's entries
    std::unordered_map<uint64_t, bool> gt_dirty;             // GD index → needs writing
    bool gd_dirty = false;
    std::vector<std::pair<uint64_t, uint64_t>> meta;  // sorted byte ranges of GD/RGD/GTs
  };
  struct Extent {
    enum Kind { Flat, Sparse_, Zero } kind = Flat;
    uint64_t start = 0;    // guest byte offset
    uint64_t length = 0;   // bytes
    uint64_t file_off = 0; // flat: byte offset in the file
    bool writable = true;
    Layer* file = nullptr;
    std::unique_ptr<Layer> owned;
    std::unique_ptr<Sparse> sparse;
    std::string name;      // its file's name as the descriptor gives it
    int desc_line = -1;    // its line in desc_lines_ (-1: a new extent, not written yet)
  };

  Vmdk() = default;
  Status open_sparse(Extent* e, std::string* text, std::string* err);
  Status parse_descriptor(const std::string& text, bool embedded, std::string* err);
  Status load_gt(Extent& e, uint64_t gdi, std::vector<uint32_t>** gt);
  bool in_meta(const Sparse& sp, uint64_t off, uint64_t len) const;
  Status grain_of(Extent& e, uint64_t ext_off, uint32_t* gte, uint64_t* gt_sector, uint32_t* idx);
  Status read_extent(Extent& e, char* buf, size_t len, uint64_t ext_off);
  Status write_extent(Extent& e, const char* buf, size_t len, uint64_t ext_off);
  Status flush_locked();
  template <typename Fn>
  Status each_piece(uint64_t off, size_t len, size_t* done, Fn fn);
  Status mark_corrupt(const char* what);
  Status grow_sparse(Extent& e, uint64_t new_bytes, const std::string* embedded_desc);
  Status add_extent(Extent::Kind kind, uint64_t bytes, Extent* out);
  std::string render_descriptor(uint64_t new_size) const;
  Status rewrite_descriptor_file(const std::string& text);

  Layer* file_ = nullptr;
  VmdkOptions opt_;
  std::vector<Extent> extents_;
  uint64_t size_ = 0;
  bool read_only_ = false;
  std::string ro_reason_;
  std::string create_type_;
  std::atomic<bool> corrupt_{false};
  std::vector<std::string> desc_lines_;  // the descriptor's lines (embedded or in the file)
  bool desc_crlf_ = false;
  uint64_t desc_area_ = 0;               // embedded: bytes reserved for it in the sparse file
  uint64_t desc_at_ = 0;                 // embedded: its byte offset
  std::shared_mutex layout_mu_;
  std::mutex mu_;
};

}  // namespace iofilterfs::format
