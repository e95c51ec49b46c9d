// The bookkeeping of the journal by reference (async mode, no retention, no sealing).
//
// A Write record by reference holds no data: only (offset, length, sequence). The shipper reads
// the bytes from the image when it reaches the record. That is right as long as nothing has
// overwritten them since; a later change that would (a write, a zero-range, a shrink) first
// copies the old bytes into the journal (copy-before-write: a Preserve record) and attaches
// them to the older record as a piece. So every byte of the disk is referenced by at most one
// unshipped record, the latest that wrote it (its owner); older records got pieces instead.
//
//      journal:  R1 ref [0,8)   ...   W2 ref [4,12)   P(R1) [4,8) old bytes
//      owners:   [0,4) R1   [4,12) W2          R1's pieces: [4,8) -> journal offset of P's bytes
//
// Shipping R1: the parts of [0,8) not covered by its pieces are copied from the image, then
// shipped(R1) gives its pieces (all of them: one attached while the copy ran is among them, and
// its bytes win over what the copy read); the pieces go last. Pieces of one record are disjoint
// (a byte is preserved for its owner, and then has a new owner).
//
// A shipped record keeps its references (later writes still preserve for it) until the target
// has flushed it and the journal's ship point is past it: forget_before(). A reconnect rewinds
// shipping to that ship point (the old connection may have lost unflushed writes), and the
// records shipped again must still find their bytes.
//
// The shipper never reads the image for a record whose local write has not landed yet (the
// record is committed to the journal before the image write, for crash safety): landed() says
// when it has. After a restart every record in the journal counts as landed (the image holds
// whatever the crash left, and the preserved pieces found by the scan say the rest).
//
// The writer's order: its range locked, the old bytes read, then (under the journal lock) its
// own record and the Preserve records reserved and add(); both written; the pieces attached;
// only then the image write, and landed(). A crash before the image write leaves the image with
// the old bytes, which is what the pieces hold, so replay ships the same either way.
//
// Pure: no I/O, no locks (the filter holds its own mutex around every call).
//
// Storage, for the hot path (every write calls add() and landed(), under the filter's mutex):
// records sit in a ring in sequence order (they are added in that order: the journal hands out
// sequence numbers under the lock the writer holds for add()), found by binary search and
// forgotten from the front, so forget_before() costs what it forgets, not what is kept; a slot's
// piece list keeps its capacity for the next record. The owner extents are a map whose nodes
// come from a free list. So the steady state allocates nothing.
#pragma once

#include <cstdint>
#include <cstddef>
#include <functional>
#include <map>
#include <new>
#include <vector>

namespace iofilterfs::replicate {

// Old bytes preserved for a record: [off, off+len) of the disk, stored at journal offset `at`.
struct Piece {
  uint64_t off = 0, len = 0, at = 0;
};
// [off, off+len) is still read from the image by unshipped record `seq`.
struct Span {
  uint64_t off = 0, len = 0, seq = 0;
};

// Nodes of one size (a std::map's) handed out from, and returned to, a free list. trim() gives
// the spare ones back to the allocator (after a burst of extents).
class NodePool {
 public:
  NodePool() = default;
  NodePool(const NodePool&) = delete;
  NodePool& operator=(const NodePool&) = delete;
  ~NodePool() { trim(0); }
  void* get(size_t size) {
    if (free_ && size == size_) {
      Free* f = free_;
      free_ = f->next;
      --spare_;
      return f;
    }
    if (!size_) size_ = size;
    return ::operator new(size);
  }
  void put(void* p, size_t size) {
    if (size != size_ || size < sizeof(Free)) return ::operator delete(p);
    free_ = new (p) Free{free_};
    ++spare_;
  }
  // Keeps at most `keep` spare nodes.
  void trim(size_t keep) {
    while (free_ && spare_ > keep) {
      Free* f = free_;
      free_ = f->next;
      --spare_;
      ::operator delete(f);
    }
  }
  size_t spare() const { return spare_; }

 private:
  struct Free {
    Free* next;
  };
  Free* free_ = nullptr;
  size_t size_ = 0, spare_ = 0;
};

template <class T>
struct PoolAllocator {
  using value_type = T;
  NodePool* pool;
  explicit PoolAllocator(NodePool* p) : pool(p) {}
  template <class U>
  PoolAllocator(const PoolAllocator<U>& o) : pool(o.pool) {}  // NOLINT: rebinding, as allocators do
  T* allocate(size_t n) {
    return static_cast<T*>(n == 1 ? pool->get(sizeof(T)) : ::operator new(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) {
    if (n == 1) pool->put(p, sizeof(T));
    else ::operator delete(p);
  }
  template <class U>
  bool operator==(const PoolAllocator<U>& o) const { return pool == o.pool; }
  template <class U>
  bool operator!=(const PoolAllocator<U>& o) const { return pool != o.pool; }
};

class RefMap {
 public:
  // Appends to *out, in offset order, the parts of [off, off+len) an unshipped record references.
  void referenced(uint64_t off, uint64_t len, std::vector<Span>* out) const;
  // A new by-reference record: it owns [off, off+len) from now on (not landed yet).
  void add(uint64_t seq, uint64_t off, uint64_t len, bool landed = false);
  // Its image write is done (or failed: then the region is resent anyway).
  void landed(uint64_t seq);
  bool is_landed(uint64_t seq) const;
  // Old bytes of record seq's range; false (nothing kept) when seq was forgotten meanwhile.
  bool attach(uint64_t seq, const Piece& p);
  // Nothing references [off, off+len) any more (zeroed or cut off, its owners got pieces).
  void drop(uint64_t off, uint64_t len);
  // The pieces known now for seq (the shipper's first look), appended to *out.
  void pieces(uint64_t seq, std::vector<Piece>* out) const;
  // The shipper is done reading the image for seq: its pieces (all so far) appended to *out.
  void shipped(uint64_t seq, std::vector<Piece>* out) const { pieces(seq, out); }
  // The target has flushed every record before seq and the journal says so: they are gone,
  // with their references.
  void forget_before(uint64_t seq);
  void clear();
  size_t records() const { return count_; }
  size_t extents() const { return owners_.size(); }

 private:
  struct Owned {
    uint64_t end = 0, seq = 0;
  };
  struct Rec {
    uint64_t seq = 0, off = 0, len = 0;
    bool landed = false;
    std::vector<Piece> pieces;
  };
  // Cuts the owner extents at off and at end, removes those inside [off, end) (owned by seq,
  // or by anyone with seq 0).
  void erase(uint64_t off, uint64_t end, uint64_t seq);
  Rec& at(size_t i) { return ring_[(head_ + i) % ring_.size()]; }
  const Rec& at(size_t i) const { return ring_[(head_ + i) % ring_.size()]; }
  // The record seq, or null.
  Rec* find(uint64_t seq);
  const Rec* find(uint64_t seq) const { return const_cast<RefMap*>(this)->find(seq); }
  // A slot for seq at its place in sequence order (the back, unless a caller broke the order).
  Rec& insert(uint64_t seq);

  NodePool pool_;  // before owners_: its nodes are returned to it when the map goes
  using Owners = std::map<uint64_t, Owned, std::less<uint64_t>, PoolAllocator<std::pair<const uint64_t, Owned>>>;
  Owners owners_{Owners::key_compare(), Owners::allocator_type(&pool_)};  // disjoint extents by start
  std::vector<Rec> ring_;  // records in sequence order: count_ of them from head_, wrapping
  size_t head_ = 0, count_ = 0;
};

// The parts of [off, off+len) not covered by `pieces` (disjoint, any order), in offset order.
std::vector<std::pair<uint64_t, uint64_t>> gaps(uint64_t off, uint64_t len, std::vector<Piece> pieces);

}  // namespace iofilterfs::replicate
