// The cache's bookkeeping, with no I/O: which disk block lives in which cache slot, which slots
// are free, pinned (a request is copying into or out of them) or dirty (hold data the layer
// below lacks), and which slot to reuse next. Pure, and called under the filter's metadata
// lock (a reader-writer lock): everything that changes the map holds it exclusively; find(),
// touch(), pin(), pins() and dirty() may run together under a shared hold, so a cache hit
// never waits for another hit; unpin() may run without the lock (it only ever makes a slot
// evictable, and an eviction that misses it just passes over the slot once more).
//
// Eviction is S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP
// 2023), which resists scans where LRU does not:
//
//     insert ──► small FIFO (10% of slots) ──► tail: seen again? ──yes──► main FIFO head
//                                                  │ no
//                                                  ▼
//                                    evicted; its block number goes to the ghost FIFO
//     insert of a block in the ghost FIFO ──► main FIFO head (it came back: it is reused)
//     main FIFO tail: seen since last pass? ──yes──► head again, its count lowered; no: evicted
//
// A block read once by a scan passes through the small FIFO and leaves without touching the
// main FIFO, where the working set lives. Each hit raises a 2-bit counter (a relaxed atomic, so
// hits need only the shared lock; two hits racing may raise it once, which S3-FIFO does not
// mind); nothing moves on a hit, so a hit costs one table lookup.
//
// Dirty and pinned slots are never evicted: the walk passes over them (a dirty block in the
// small FIFO is promoted, in the main FIFO it goes round again). When every slot is dirty or
// pinned, insert() fails and the caller bypasses or waits for the destager.
//
// The block table is open addressing with linear probing and backward-shift deletion, sized
// once: no allocation after construction.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace iofilterfs::cache {

inline constexpr uint32_t kNoSlot = UINT32_MAX;
inline constexpr uint64_t kNoBlock = UINT64_MAX;

// The filter's per-block locks are 64 stripes; a block's stripe is a hash of its number, so
// neighbouring blocks fall in different stripes (and a stripe may hold several blocks of one
// long request).
inline constexpr int kStripes = 64;
inline size_t stripe_of(uint64_t block) { return (block * 0x9E3779B97F4A7C15ull) >> 58; }
// The stripes of blocks first..last as a bit set (bit i: stripe i), each once however many of
// the blocks share it: a request that holds several blocks takes these in ascending bit order,
// the one order every taker of more than one stripe uses (no deadlock).
inline uint64_t stripe_mask(uint64_t first, uint64_t last) {
  uint64_t m = 0;
  for (uint64_t b = first; b <= last && m != ~uint64_t(0); ++b) m |= uint64_t(1) << stripe_of(b);
  return m;
}

// block number -> value, fixed capacity (a power of two at least twice the entries it holds).
class BlockTable {
 public:
  explicit BlockTable(size_t max_entries);
  // The value for block, or kNoSlot.
  uint32_t find(uint64_t block) const;
  // Inserts or replaces.
  void put(uint64_t block, uint32_t value);
  // Removes; returns whether it was there.
  bool erase(uint64_t block);
  size_t size() const { return size_; }

 private:
  size_t home(uint64_t block) const { return (block * 0x9E3779B97F4A7C15ull) >> shift_; }
  std::vector<uint64_t> keys_;  // kNoBlock: empty
  std::vector<uint32_t> vals_;
  int shift_ = 0;
  size_t mask_ = 0;
  size_t size_ = 0;
};

class BlockMap {
 public:
  enum class Queue : uint8_t { Free, Small, Main };

  explicit BlockMap(uint32_t slots);

  uint32_t slots() const { return static_cast<uint32_t>(slot_.size()); }
  // The slot holding block, or kNoSlot. A hit raises the block's counter (lookup does not).
  uint32_t find(uint64_t block) const { return table_.find(block); }
  uint32_t hit(uint64_t block);
  // Raises a slot's counter (a hit found by find()); safe under a shared hold of the lock.
  void touch(uint32_t slot) const {
    std::atomic<uint8_t>& f = freq_[slot];
    const uint8_t v = f.load(std::memory_order_relaxed);
    if (v < 3) f.store(v + 1, std::memory_order_relaxed);
  }

  // Gives block a slot: a free one, else an evicted clean unpinned one. *evicted is the block
  // that slot held (kNoBlock when it was free). kNoSlot when every slot is dirty or pinned.
  uint32_t insert(uint64_t block, uint64_t* evicted);
  // Places block in a given free slot (replay of a persistent cache at open). False when the
  // slot is not free or the block is already mapped.
  bool place(uint64_t block, uint32_t slot);
  // Forgets block; its slot becomes free. The slot must not be pinned.
  void erase(uint64_t block);

  void pin(uint32_t slot) const { pins_[slot].fetch_add(1, std::memory_order_relaxed); }
  void unpin(uint32_t slot) const { pins_[slot].fetch_sub(1, std::memory_order_release); }
  uint32_t pins(uint32_t slot) const { return pins_[slot].load(std::memory_order_acquire); }
  void set_dirty(uint32_t slot, bool d);
  bool dirty(uint32_t slot) const { return slot_[slot].dirty; }
  uint64_t block_of(uint32_t slot) const { return slot_[slot].block; }
  Queue queue_of(uint32_t slot) const { return slot_[slot].queue; }
  uint8_t freq(uint32_t slot) const { return freq_[slot].load(std::memory_order_relaxed); }

  uint32_t used() const { return used_; }
  uint32_t dirty_count() const { return dirty_; }
  uint32_t small_size() const { return small_.size; }
  uint32_t main_size() const { return main_.size; }
  bool in_ghost(uint64_t block) const { return ghost_table_.find(block) != kNoSlot; }

 private:
  struct Slot {
    uint64_t block = kNoBlock;
    uint32_t prev = kNoSlot, next = kNoSlot;  // in its queue; head is newest
    bool dirty = false;
    Queue queue = Queue::Free;
  };
  struct List {
    uint32_t head = kNoSlot, tail = kNoSlot, size = 0;
  };
  List& list(Queue q) { return q == Queue::Small ? small_ : q == Queue::Main ? main_ : free_; }
  void push_head(Queue q, uint32_t s);
  void unlink(uint32_t s);
  bool evictable(uint32_t s) const { return !slot_[s].dirty && pins(s) == 0; }
  void set_freq(uint32_t s, uint8_t v) { freq_[s].store(v, std::memory_order_relaxed); }
  // Frees one slot by the S3-FIFO walk; kNoSlot when none can be.
  uint32_t evict(uint64_t* evicted);
  void ghost_add(uint64_t block);

  std::vector<Slot> slot_;
  // Per slot, apart from Slot because hits and pins change them under the shared lock.
  std::unique_ptr<std::atomic<uint8_t>[]> freq_;
  std::unique_ptr<std::atomic<uint32_t>[]> pins_;
  List small_, main_, free_;
  uint32_t small_target_;
  uint32_t used_ = 0, dirty_ = 0;
  BlockTable table_;
  // Ghost FIFO: block numbers recently evicted from the small queue (as many as main holds).
  std::vector<uint64_t> ghost_ring_;
  size_t ghost_pos_ = 0;
  BlockTable ghost_table_;  // block -> its position in ghost_ring_
};

}  // namespace iofilterfs::cache
