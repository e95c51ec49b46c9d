#include "replicate/refmap.h"

#include <algorithm>

namespace iofilterfs::replicate {

void RefMap::referenced(uint64_t off, uint64_t len, std::vector<Span>* out) const {
  if (len == 0 || owners_.empty()) return;
  const uint64_t end = off + len < off ? UINT64_MAX : off + len;
  auto it = owners_.upper_bound(off);
  if (it != owners_.begin()) --it;
  for (; it != owners_.end() && it->first < end; ++it) {
    const uint64_t a = std::max(off, it->first), b = std::min(end, it->second.end);
    if (a < b) out->push_back(Span{a, b - a, it->second.seq});
  }
}

void RefMap::erase(uint64_t off, uint64_t end, uint64_t seq) {
  auto it = owners_.upper_bound(off);
  if (it != owners_.begin()) --it;
  while (it != owners_.end() && it->first < end) {
    const uint64_t s = it->first;
    const Owned o = it->second;
    if (o.end <= off || (seq && o.seq != seq)) {
      ++it;
      continue;
    }
    it = owners_.erase(it);
    if (s < off) owners_.emplace(s, Owned{off, o.seq});
    if (o.end > end) it = owners_.emplace(end, Owned{o.end, o.seq}).first;
  }
}

RefMap::Rec* RefMap::find(uint64_t seq) {
  size_t lo = 0, hi = count_;
  while (lo < hi) {
    const size_t mid = lo + (hi - lo) / 2;
    if (at(mid).seq < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo < count_ && at(lo).seq == seq ? &at(lo) : nullptr;
}

RefMap::Rec& RefMap::insert(uint64_t seq) {
  if (count_ == ring_.size()) {
    // Full: a ring twice the size, the records moved to its start in order (piece lists move).
    std::vector<Rec> bigger(ring_.empty() ? 64 : ring_.size() * 2);
    for (size_t i = 0; i < count_; ++i) bigger[i] = std::move(at(i));
    ring_.swap(bigger);
    head_ = 0;
  }
  size_t i = count_++;
  // In order unless a caller added out of sequence: then the later ones shift back one slot.
  while (i > 0 && at(i - 1).seq > seq) {
    std::swap(at(i), at(i - 1));
    --i;
  }
  Rec& r = at(i);
  r.seq = seq;
  r.pieces.clear();  // keeps its capacity
  return r;
}

void RefMap::add(uint64_t seq, uint64_t off, uint64_t len, bool landed) {
  Rec* existing = find(seq);
  Rec& r = existing ? *existing : insert(seq);
  r.off = off;
  r.len = len;
  r.landed = landed;
  if (len == 0) return;
  const uint64_t end = off + len < off ? UINT64_MAX : off + len;
  erase(off, end, 0);
  owners_.emplace(off, Owned{end, seq});
}

void RefMap::landed(uint64_t seq) {
  if (Rec* r = find(seq)) r->landed = true;
}

bool RefMap::is_landed(uint64_t seq) const {
  const Rec* r = find(seq);
  return !r || r->landed;
}

bool RefMap::attach(uint64_t seq, const Piece& p) {
  Rec* r = find(seq);
  if (!r) return false;
  r->pieces.push_back(p);
  return true;
}

void RefMap::drop(uint64_t off, uint64_t len) {
  if (len == 0) return;
  erase(off, off + len < off ? UINT64_MAX : off + len, 0);
}

void RefMap::pieces(uint64_t seq, std::vector<Piece>* out) const {
  if (const Rec* r = find(seq)) out->insert(out->end(), r->pieces.begin(), r->pieces.end());
}

void RefMap::forget_before(uint64_t seq) {
  while (count_ && at(0).seq < seq) {
    Rec& r = at(0);
    if (r.len) erase(r.off, r.off + r.len < r.off ? UINT64_MAX : r.off + r.len, r.seq);
    r.pieces.clear();
    head_ = (head_ + 1) % ring_.size();
    --count_;
  }
  // After a burst: spare extent nodes beyond what the live ones could need again go back, and a
  // ring three quarters empty halves.
  if (pool_.spare() > 2 * owners_.size() + 1024) pool_.trim(owners_.size() + 1024);
  if (ring_.size() > 4096 && count_ * 4 < ring_.size()) {
    std::vector<Rec> smaller(ring_.size() / 2);
    for (size_t i = 0; i < count_; ++i) smaller[i] = std::move(at(i));
    ring_.swap(smaller);
    head_ = 0;
  }
}

void RefMap::clear() {
  owners_.clear();
  for (size_t i = 0; i < count_; ++i) at(i).pieces.clear();
  head_ = count_ = 0;
  pool_.trim(1024);
}

std::vector<std::pair<uint64_t, uint64_t>> gaps(uint64_t off, uint64_t len, std::vector<Piece> pieces) {
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.off < b.off; });
  std::vector<std::pair<uint64_t, uint64_t>> out;
  const uint64_t end = off + len;
  uint64_t at = off;
  for (const Piece& p : pieces) {
    const uint64_t a = std::max(at, p.off), b = std::min(end, p.off + p.len);
    if (b <= a) continue;
    if (a > at) out.emplace_back(at, a - at);
    at = b;
  }
  if (at < end) out.emplace_back(at, end - at);
  return out;
}

}  // namespace iofilterfs::replicate
