// Where the cache keeps its blocks: RAM (MemStore) or a cache file on a fast local device
// (FileStore, layout in format.h). Slot-addressed: read/write `len` bytes (whole pages) at
// `off` inside slot `slot`, which holds disk block `block`. When the disk is encrypted
// (DiskInfo::at_rest), FileStore seals what it writes with the container's own cipher at the
// disk offset block * block_size + off, and unseals what it reads: the file never holds
// plaintext, only the very ciphertext the backing file holds for those bytes.
//
// Threads: read/write/put_record run concurrently for different slots; the filter serialises
// the requests of one slot (its block's stripe lock). sync is safe at any time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cache/format.h"
#include "filter.h"
#include "status.h"

namespace iofilterfs::cache {

class Store {
 public:
  virtual ~Store() = default;
  virtual Status read(uint32_t slot, uint64_t block, uint32_t off, void* buf, size_t len) = 0;
  virtual Status write(uint32_t slot, uint64_t block, uint32_t off, const void* buf, size_t len) = 0;
  // Persists a slot's record (a no-op in RAM).
  virtual Status put_record(const Record& r) = 0;
  // Makes everything written so far durable (fdatasync; a no-op in RAM).
  virtual Status sync() = 0;
  virtual bool persistent() const = 0;
  // The device failed and every dirty block is below: makes sure no later open replays this
  // store (a no-op in RAM). *how says what was done, for the log.
  virtual Status retire(std::string* how) {
    *how = "nothing to set aside";
    return Status::Ok();
  }
};

class MemStore final : public Store {
 public:
  // Reserves slots * block bytes of anonymous memory (pages appear as they are written).
  static std::unique_ptr<MemStore> create(uint32_t slots, uint32_t block, std::string* err);
  ~MemStore() override;
  Status read(uint32_t slot, uint64_t block, uint32_t off, void* buf, size_t len) override;
  Status write(uint32_t slot, uint64_t block, uint32_t off, const void* buf, size_t len) override;
  Status put_record(const Record&) override { return Status::Ok(); }
  Status sync() override { return Status::Ok(); }
  bool persistent() const override { return false; }

 private:
  MemStore() = default;
  uint8_t* base_ = nullptr;
  size_t bytes_ = 0;
  uint32_t block_ = 0;
};

// What opening a cache file found.
struct Replay {
  bool created = false;      // a new, empty file
  std::vector<Record> live;  // the records to place, one per block (highest seq), dirty or clean
  uint64_t max_seq = 0;
  uint64_t dropped_clean = 0;  // clean records dropped because the machine rebooted
  // The file was made for another block size, slot count or key (or none) and holds dirty
  // records: the store is open with the file's own geometry (header()), `live` holds only the
  // dirty records; the caller destages them (blocks of header().block_size bytes) and then
  // calls reformat().
  bool incompatible = false;
  // Set with an error: the file holds (or may hold) dirty data that cannot be used, so the
  // disk must not open. Without it an error is about the device (missing, full, failing) and
  // the filter may run as pass-through instead.
  bool refuse = false;
};

class FileStore final : public Store {
 public:
  // Opens or creates DIR/<cache_file_name(image)> for `slots` slots of `block` bytes. key: the
  // image's at-rest cipher when it is encrypted (null otherwise). Returns an errno with *err,
  // or Ok with *out and *replay (see Replay). Refuses (EIO, *err says why) when a record that
  // may hold dirty data is damaged, dirty pages cannot be read, or dirty data is encrypted
  // with a key this open does not have.
  static Status open(const std::string& dir, const std::string& image, uint32_t slots, uint32_t block,
                     std::shared_ptr<const AtRest> key, std::unique_ptr<FileStore>* out, Replay* replay,
                     std::string* err);
  ~FileStore() override;

  Status read(uint32_t slot, uint64_t block, uint32_t off, void* buf, size_t len) override;
  Status write(uint32_t slot, uint64_t block, uint32_t off, const void* buf, size_t len) override;
  Status put_record(const Record& r) override;
  Status sync() override;
  bool persistent() const override { return true; }
  // Renames the file to NAME.failed (kept for the operator; the next open starts a new one),
  // else unlinks it, else empties it; the directory is synced. Ok when the file is gone.
  Status retire(std::string* how) override;

  // Empties the file and writes a fresh header for this geometry and key (the data area stays
  // sparse), then syncs.
  Status reformat(uint32_t slots, uint32_t block, std::string* err);
  const Header& header() const { return h_; }
  const std::string& path() const { return path_; }

 private:
  FileStore() = default;
  uint64_t data_pos(uint32_t slot, uint32_t off) const { return h_.data_offset + uint64_t(slot) * h_.block_size + off; }
  static std::array<uint8_t, 32> key_check(const AtRest* key);

  int fd_ = -1;
  std::string path_;
  std::string image_;
  Header h_;
  std::shared_ptr<const AtRest> key_;  // null: plaintext (the image is not encrypted)
};

// `iofilterctl cache discard`: renames an image's cache file in dir to NAME.discarded (kept for
// the operator), so the next open starts empty. Returns "" or why not (no file: "" as well).
std::string discard_cache_file(const std::string& dir, const std::string& image);

}  // namespace iofilterfs::cache
