#include "cache/block_map.h"

namespace iofilterfs::cache {

BlockTable::BlockTable(size_t max_entries) {
  size_t cap = 16;
  int bits = 4;
  while (cap < 2 * max_entries) {
    cap <<= 1;
    ++bits;
  }
  keys_.assign(cap, kNoBlock);
  vals_.assign(cap, kNoSlot);
  shift_ = 64 - bits;
  mask_ = cap - 1;
}

uint32_t BlockTable::find(uint64_t block) const {
  for (size_t i = home(block);; i = (i + 1) & mask_) {
    if (keys_[i] == block) return vals_[i];
    if (keys_[i] == kNoBlock) return kNoSlot;
  }
}

void BlockTable::put(uint64_t block, uint32_t value) {
  size_t i = home(block);
  while (keys_[i] != kNoBlock && keys_[i] != block) i = (i + 1) & mask_;
  if (keys_[i] == kNoBlock) ++size_;
  keys_[i] = block;
  vals_[i] = value;
}

bool BlockTable::erase(uint64_t block) {
  size_t i = home(block);
  while (keys_[i] != block) {
    if (keys_[i] == kNoBlock) return false;
    i = (i + 1) & mask_;
  }
  // Backward-shift deletion: pull later entries of the probe run into the gap when their home
  // does not lie (cyclically) between the gap and them.
  size_t gap = i;
  for (size_t j = (gap + 1) & mask_; keys_[j] != kNoBlock; j = (j + 1) & mask_) {
    const size_t h = home(keys_[j]);
    const bool stays = gap <= j ? (gap < h && h <= j) : (gap < h || h <= j);
    if (stays) continue;
    keys_[gap] = keys_[j];
    vals_[gap] = vals_[j];
    gap = j;
  }
  keys_[gap] = kNoBlock;
  vals_[gap] = kNoSlot;
  --size_;
  return true;
}

BlockMap::BlockMap(uint32_t slots)
    : slot_(slots), freq_(new std::atomic<uint8_t>[slots]), pins_(new std::atomic<uint32_t>[slots]),
      small_target_(slots / 10 > 0 ? slots / 10 : 1), table_(slots), ghost_ring_(slots, kNoBlock),
      ghost_table_(slots) {
  for (uint32_t s = slots; s-- > 0;) {
    freq_[s].store(0, std::memory_order_relaxed);
    pins_[s].store(0, std::memory_order_relaxed);
    push_head(Queue::Free, s);
  }
}

void BlockMap::push_head(Queue q, uint32_t s) {
  List& l = list(q);
  Slot& x = slot_[s];
  x.queue = q;
  x.prev = kNoSlot;
  x.next = l.head;
  if (l.head != kNoSlot) slot_[l.head].prev = s;
  l.head = s;
  if (l.tail == kNoSlot) l.tail = s;
  ++l.size;
}

void BlockMap::unlink(uint32_t s) {
  Slot& x = slot_[s];
  List& l = list(x.queue);
  if (x.prev != kNoSlot) slot_[x.prev].next = x.next;
  else l.head = x.next;
  if (x.next != kNoSlot) slot_[x.next].prev = x.prev;
  else l.tail = x.prev;
  x.prev = x.next = kNoSlot;
  --l.size;
}

uint32_t BlockMap::hit(uint64_t block) {
  const uint32_t s = table_.find(block);
  if (s != kNoSlot) touch(s);
  return s;
}

void BlockMap::ghost_add(uint64_t block) {
  uint64_t& at = ghost_ring_[ghost_pos_];
  if (at != kNoBlock && ghost_table_.find(at) == ghost_pos_) ghost_table_.erase(at);
  at = block;
  ghost_table_.put(block, static_cast<uint32_t>(ghost_pos_));
  ghost_pos_ = (ghost_pos_ + 1) % ghost_ring_.size();
}

uint32_t BlockMap::evict(uint64_t* evicted) {
  if (dirty_ >= used_ && used_ == slots()) return kNoSlot;  // all dirty: nothing to walk for
  // Each step either evicts or moves one entry; a counter falls at most 3 times, so 5 passes
  // over every slot suffice unless nothing is evictable.
  for (size_t steps = 5ull * slots() + 8; steps > 0; --steps) {
    if (small_.size > 0 && (small_.size >= small_target_ || main_.size == 0)) {
      const uint32_t t = small_.tail;
      Slot& x = slot_[t];
      unlink(t);
      if (freq(t) >= 1 || !evictable(t)) {
        if (evictable(t)) set_freq(t, 0);
        push_head(Queue::Main, t);
        continue;
      }
      *evicted = x.block;
      ghost_add(x.block);
      table_.erase(x.block);
      return t;
    }
    if (main_.size == 0) return kNoSlot;
    const uint32_t t = main_.tail;
    Slot& x = slot_[t];
    unlink(t);
    const uint8_t f = freq(t);
    if (!evictable(t) || f > 0) {
      if (f > 0) set_freq(t, f - 1);
      push_head(Queue::Main, t);
      continue;
    }
    *evicted = x.block;
    table_.erase(x.block);
    return t;
  }
  return kNoSlot;
}

uint32_t BlockMap::insert(uint64_t block, uint64_t* evicted) {
  *evicted = kNoBlock;
  uint32_t s = free_.tail;
  if (s != kNoSlot) {
    unlink(s);
    ++used_;
  } else {
    s = evict(evicted);
    if (s == kNoSlot) return kNoSlot;
  }
  Slot& x = slot_[s];
  x.block = block;
  x.dirty = false;
  set_freq(s, 0);
  const uint32_t g = ghost_table_.find(block);
  if (g != kNoSlot) {
    ghost_table_.erase(block);
    push_head(Queue::Main, s);
  } else {
    push_head(Queue::Small, s);
  }
  table_.put(block, s);
  return s;
}

bool BlockMap::place(uint64_t block, uint32_t slot) {
  if (slot >= slots() || slot_[slot].queue != Queue::Free || table_.find(block) != kNoSlot) return false;
  unlink(slot);
  ++used_;
  Slot& x = slot_[slot];
  x.block = block;
  x.dirty = false;
  set_freq(slot, 0);
  push_head(Queue::Main, slot);
  table_.put(block, slot);
  return true;
}

void BlockMap::erase(uint64_t block) {
  const uint32_t s = table_.find(block);
  if (s == kNoSlot) return;
  set_dirty(s, false);
  unlink(s);
  table_.erase(block);
  slot_[s] = Slot{};
  set_freq(s, 0);
  push_head(Queue::Free, s);
  --used_;
}

void BlockMap::set_dirty(uint32_t slot, bool d) {
  Slot& x = slot_[slot];
  if (x.dirty == d) return;
  x.dirty = d;
  if (d) ++dirty_;
  else --dirty_;
}

}  // namespace iofilterfs::cache
