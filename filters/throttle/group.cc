// A throttle group's round-robin queue; the idea is described in group.h.
#include "group.h"

namespace iofilterfs::throttle {

GroupQueue::GroupQueue(const ThrottleConfig& cfg) : state_(cfg) {}

void GroupQueue::configure(const ThrottleConfig& cfg) { state_ = ThrottleState(cfg); }

int GroupQueue::join() {
  for (size_t i = 0; i < members_.size(); ++i)
    if (!members_[i].used) {
      members_[i] = Member{};
      members_[i].used = true;
      return static_cast<int>(i);
    }
  members_.push_back(Member{});
  members_.back().used = true;
  return static_cast<int>(members_.size() - 1);
}

void GroupQueue::leave(int member) { members_[member].used = false; }

size_t GroupQueue::members() const {
  size_t n = 0;
  for (const Member& m : members_) n += m.used;
  return n;
}

void GroupQueue::arrive(int member, GroupRequest* r) {
  members_[member].idle = false;
  r->seq = seq_++;
  r->next = nullptr;
  Fifo& q = members_[member].q[r->is_write ? 1 : 0];
  if (q.tail) q.tail->next = r;
  else q.head = r;
  q.tail = r;
  ++waiting_;
}

void GroupQueue::replace(int member, GroupRequest* r, GroupRequest* with) {
  Fifo& q = members_[member].q[r->is_write ? 1 : 0];
  with->is_write = r->is_write;
  with->bytes = r->bytes;
  with->seq = r->seq;
  with->next = r->next;
  GroupRequest** link = &q.head;
  while (*link != r) link = &(*link)->next;
  *link = with;
  if (q.tail == r) q.tail = with;
  r->next = nullptr;
}

bool GroupQueue::remove(int member, GroupRequest* r) {
  if (member < 0 || static_cast<size_t>(member) >= members_.size()) return false;
  Fifo& q = members_[member].q[r->is_write ? 1 : 0];
  GroupRequest* prev = nullptr;
  for (GroupRequest* x = q.head; x; prev = x, x = x->next) {
    if (x != r) continue;
    (prev ? prev->next : q.head) = r->next;
    if (q.tail == r) q.tail = prev;
    r->next = nullptr;
    --waiting_;
    return true;
  }
  return false;
}

GroupRequest* GroupQueue::remove_all(int member) {
  if (member < 0 || static_cast<size_t>(member) >= members_.size()) return nullptr;
  GroupRequest *first = nullptr, **link = &first;
  for (Fifo& q : members_[member].q) {
    for (GroupRequest* r = q.head; r; r = r->next) --waiting_;
    *link = q.head;
    if (q.tail) link = &q.tail->next;
    q.head = q.tail = nullptr;
  }
  return first;
}

GroupRequest* GroupQueue::dispatch(uint64_t now, uint64_t* next_event) {
  GroupRequest *first = nullptr, *last = nullptr;
  const size_t n = members_.size();
  bool holding = false;
  while (waiting_) {
    // Readiness does not depend on the member or the size, only on the direction.
    const bool ready[2] = {state_.ready_at(false, now) <= now, state_.ready_at(true, now) <= now};
    if (!ready[0] && !ready[1]) break;
    GroupRequest* r = nullptr;
    size_t served = 0;
    for (size_t i = 0; i < n && !r; ++i) {
      const size_t m = (turn_ + i) % n;
      Member& mm = members_[m];
      Fifo* q = mm.q;
      GroupRequest* rd = ready[0] ? q[0].head : nullptr;
      GroupRequest* wr = ready[1] ? q[1].head : nullptr;
      if (rd && wr) r = rd->seq < wr->seq ? rd : wr;  // the member's older request first
      else r = rd ? rd : wr;
      served = m;
      if (!r && i == 0 && hold_turn(mm, now)) {
        holding = true;  // the member whose turn it is will be back in a moment: keep it
        break;
      }
    }
    if (holding || !r) break;  // (or only requests of a direction that must wait)
    Member& sm = members_[served];
    Fifo& q = sm.q[r->is_write ? 1 : 0];
    q.head = r->next;
    if (!q.head) q.tail = nullptr;
    --waiting_;
    state_.admit(r->is_write, r->bytes, now);  // starts now: it was ready
    sm.last_start = now;
    r->next = nullptr;
    if (last) last->next = r;
    else first = r;
    last = r;
    turn_ = (served + 1) % n;
    turn_since_ = 0;
  }
  *next_event = kNever;
  if (holding) {
    // The held budget stays in the buckets; the member's arrival runs dispatch again, and
    // if it does not come the turn passes at the end of the hold.
    *next_event = turn_since_ + kHoldNs;
  }
  for (int dir = 0; dir < 2; ++dir) {
    bool any = false;
    for (const Member& m : members_) any |= m.q[dir].head != nullptr;
    if (any) {
      uint64_t t = state_.ready_at(dir == 1, now);
      if (holding && t <= now) continue;  // ready, but held for the member whose turn it is
      if (t < *next_event) *next_event = t;
    }
  }
  return first;
}

bool GroupQueue::hold_turn(Member& m, uint64_t now) {
  // Only for a member that is away for a moment: nothing waiting of its own (a member waiting
  // for its own direction's limit is skipped as before), served recently, not given up on.
  if (!m.used || m.idle || m.q[0].head || m.q[1].head || now - m.last_start > kActiveNs) return false;
  if (!turn_since_) turn_since_ = now;
  if (now - turn_since_ < kHoldNs) return true;
  m.idle = true;  // it did not come back in time: no more holding for it until it arrives
  turn_since_ = 0;
  return false;
}

}  // namespace iofilterfs::throttle
