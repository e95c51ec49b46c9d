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

void RefMap::add(uint64_t seq, uint64_t off, uint64_t len, bool landed) {
  Rec& r = recs_[seq];
  r.off = off;
  r.len = len;
  r.landed = landed;
  if (len == 0) return;
  const uint64_t end = off + len < off ? UINT64_MAX : off + len;
  erase(off, end, 0);
  owners_.emplace(off, Owned{end, seq});
}

void RefMap::landed(uint64_t seq) {
  auto it = recs_.find(seq);
  if (it != recs_.end()) it->second.landed = true;
}

bool RefMap::is_landed(uint64_t seq) const {
  auto it = recs_.find(seq);
  return it == recs_.end() || it->second.landed;
}

bool RefMap::attach(uint64_t seq, const Piece& p) {
  auto it = recs_.find(seq);
  if (it == recs_.end()) return false;
  it->second.pieces.push_back(p);
  return true;
}

void RefMap::drop(uint64_t off, uint64_t len) {
  if (len == 0) return;
  erase(off, off + len < off ? UINT64_MAX : off + len, 0);
}

void RefMap::pieces(uint64_t seq, std::vector<Piece>* out) const {
  auto it = recs_.find(seq);
  if (it != recs_.end()) out->insert(out->end(), it->second.pieces.begin(), it->second.pieces.end());
}

void RefMap::forget_before(uint64_t seq) {
  for (auto it = recs_.begin(); it != recs_.end();) {
    if (it->first >= seq) {
      ++it;
      continue;
    }
    if (it->second.len) erase(it->second.off, it->second.off + it->second.len, it->first);
    it = recs_.erase(it);
  }
}

void RefMap::clear() {
  owners_.clear();
  recs_.clear();
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
