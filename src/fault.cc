#include "fault.h"

#include <fcntl.h>
#include <time.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "units.h"

namespace iofilterfs {
namespace {

struct ErrnoName { const char* name; int value; };
constexpr ErrnoName kErrnos[] = {
    {"EIO", EIO}, {"ENOSPC", ENOSPC}, {"EROFS", EROFS}, {"EPERM", EPERM}, {"EACCES", EACCES},
    {"EAGAIN", EAGAIN}, {"ETIMEDOUT", ETIMEDOUT}, {"ENOMEM", ENOMEM}, {"EDQUOT", EDQUOT},
    {"EINVAL", EINVAL}, {"ENXIO", ENXIO}, {"EBUSY", EBUSY},
};

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (true) {
    size_t p = s.find(sep, start);
    out.push_back(s.substr(start, p == std::string_view::npos ? std::string_view::npos : p - start));
    if (p == std::string_view::npos) break;
    start = p + 1;
  }
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\n')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\n')) s.remove_suffix(1);
  return s;
}

bool parse_int(std::string_view s, int64_t* v) {
  if (s.empty() || s.size() > 18) return false;
  int64_t r = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    r = r * 10 + (c - '0');
  }
  *v = r;
  return true;
}

std::string parse_ops(std::string_view s, unsigned* ops) {
  *ops = 0;
  for (std::string_view name : split(s, '+')) {
    if (name == "all") *ops |= kFaultAll;
    else if (name == "read") *ops |= kFaultRead;
    else if (name == "write") *ops |= kFaultWrite;
    else if (name == "sync") *ops |= kFaultSync;
    else if (name == "fallocate") *ops |= kFaultFallocate;
    else if (name == "resize") *ops |= kFaultResize;
    else return "unknown operation '" + std::string(name) + "' (all, read, write, sync, fallocate, resize)";
  }
  return {};
}

std::string parse_errno(std::string_view s, int* err) {
  for (const ErrnoName& e : kErrnos)
    if (s == e.name) {
      *err = e.value;
      return {};
    }
  int64_t v;
  if (parse_int(s, &v) && v > 0 && v < 4096) {
    *err = static_cast<int>(v);
    return {};
  }
  return "unknown errno '" + std::string(s) + "'";
}

void sleep_usec(uint64_t usec) {
  struct timespec ts {static_cast<time_t>(usec / 1000000), static_cast<long>((usec % 1000000) * 1000)};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

}  // namespace

std::string parse_fault_plan(std::string_view text, FaultPlan* out) {
  FaultPlan p;
  for (std::string_view clause : split(text, ';')) {
    clause = trim(clause);
    if (clause.empty()) continue;
    size_t eq = clause.find('=');
    std::string_view key = clause.substr(0, eq);
    std::string_view val = eq == std::string_view::npos ? std::string_view{} : clause.substr(eq + 1);
    if (key == "clear" && eq == std::string_view::npos) {
      p = FaultPlan{};
      p.clear = true;
    } else if (key == "track" && eq == std::string_view::npos) {
      p.track = true;
    } else if (key == "powercut" && eq == std::string_view::npos) {
      p.powercut = true;
    } else if (key == "fail") {
      auto parts = split(val, ':');
      if (parts.size() < 2 || parts.size() > 4) return "fail=OPS:ERRNO[:COUNT[:SKIP]] expected, got '" + std::string(clause) + "'";
      FaultPlan::Fail f;
      if (auto e = parse_ops(parts[0], &f.ops); !e.empty()) return e;
      if (auto e = parse_errno(parts[1], &f.err); !e.empty()) return e;
      if (parts.size() > 2 && !parse_int(parts[2], &f.count)) return "fail: COUNT '" + std::string(parts[2]) + "' is not a number";
      if (parts.size() > 3 && !parse_int(parts[3], &f.skip)) return "fail: SKIP '" + std::string(parts[3]) + "' is not a number";
      p.fails.push_back(f);
    } else if (key == "delay") {
      auto parts = split(val, ':');
      if (parts.size() != 2) return "delay=OPS:DURATION expected, got '" + std::string(clause) + "'";
      FaultPlan::Delay d;
      if (auto e = parse_ops(parts[0], &d.ops); !e.empty()) return e;
      if (auto e = parse_duration(parts[1], &d.usec); !e.empty()) return "delay: " + e;
      p.delays.push_back(d);
    } else {
      return "unknown fault clause '" + std::string(clause) + "' (fail=, delay=, track, powercut, clear)";
    }
  }
  *out = std::move(p);
  return {};
}

Status FaultLayer::apply(const FaultPlan& plan) {
  std::lock_guard<std::mutex> g(mu_);
  if (plan.clear) {
    plan_ = FaultPlan{};
    undo_.clear();
    dead_ = false;
  }
  plan_.fails.insert(plan_.fails.end(), plan.fails.begin(), plan.fails.end());
  plan_.delays.insert(plan_.delays.end(), plan.delays.begin(), plan.delays.end());
  if (plan.track) plan_.track = true;
  if (plan.powercut) {
    Status s = power_cut();
    if (!s.ok()) return s;
  }
  active_.store(!plan_.fails.empty() || !plan_.delays.empty() || plan_.track || dead_);
  return Status::Ok();
}

std::string FaultLayer::describe() const {
  std::lock_guard<std::mutex> g(mu_);
  std::string s = "fails=" + std::to_string(plan_.fails.size()) + " delays=" + std::to_string(plan_.delays.size());
  if (plan_.track) s += " track undo=" + std::to_string(undo_.size());
  if (dead_) s += " powered-off";
  return s;
}

Status FaultLayer::before(unsigned op) {
  uint64_t delay = 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (dead_) return Status::Error(EIO, "fault: disk powered off");
    for (const auto& d : plan_.delays)
      if (d.ops & op) delay += d.usec;
    for (auto& f : plan_.fails) {
      if (!(f.ops & op) || f.count == 0) continue;
      if (f.skip > 0) {
        --f.skip;
        continue;
      }
      if (f.count > 0) --f.count;
      return Status::Error(f.err, "fault: injected error");
    }
  }
  if (delay) sleep_usec(delay);
  return Status::Ok();
}

Status FaultLayer::record_undo(const Io& io, uint64_t off, uint64_t len) {
  // Caller holds mu_. Read what the write is about to overwrite.
  Undo u;
  u.off = off;
  Status s = next_->size(&u.old_size);
  if (!s.ok()) return s;
  if (off < u.old_size) {
    uint64_t n = std::min<uint64_t>(len, u.old_size - off);
    u.old.resize(n);
    size_t got = 0;
    Io buffered = io;
    buffered.direct = false;  // our vector is not aligned
    s = next_->read(buffered, u.old.data(), n, off, &got);
    if (!s.ok()) return s;
    u.old.resize(got);
  }
  undo_.push_back(std::move(u));
  return Status::Ok();
}

Status FaultLayer::power_cut() {
  // Caller holds mu_. Undo in reverse order, restoring the bytes and the size.
  Io io;
  for (auto it = undo_.rbegin(); it != undo_.rend(); ++it) {
    if (!it->old.empty()) {
      Status s = next_->write(io, it->old.data(), it->old.size(), it->off);
      if (!s.ok()) return s;
    }
    Status s = next_->resize(io, it->old_size);
    if (!s.ok()) return s;
  }
  undo_.clear();
  Status s = next_->sync(io, false);
  if (!s.ok()) return s;
  dead_ = true;
  return Status::Ok();
}

Status FaultLayer::read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) {
  if (active_.load(std::memory_order_relaxed)) {
    Status s = before(kFaultRead);
    if (!s.ok()) return s;
  }
  return next_->read(io, buf, len, off, got);
}

Status FaultLayer::write(const Io& io, const void* buf, size_t len, uint64_t off) {
  if (active_.load(std::memory_order_relaxed)) {
    Status s = before(kFaultWrite);
    if (!s.ok()) return s;
    std::lock_guard<std::mutex> g(mu_);
    if (plan_.track) {
      // Record and write under one lock so the undo log's order is the order writes landed.
      s = record_undo(io, off, len);
      if (!s.ok()) return s;
      return next_->write(io, buf, len, off);
    }
  }
  return next_->write(io, buf, len, off);
}

Status FaultLayer::sync(const Io& io, bool datasync) {
  if (active_.load(std::memory_order_relaxed)) {
    Status s = before(kFaultSync);
    if (!s.ok()) return s;
    std::lock_guard<std::mutex> g(mu_);
    s = next_->sync(io, datasync);
    if (s.ok()) undo_.clear();  // everything written so far is now durable
    return s;
  }
  return next_->sync(io, datasync);
}

Status FaultLayer::fallocate(const Io& io, int mode, uint64_t off, uint64_t len) {
  if (active_.load(std::memory_order_relaxed)) {
    Status s = before(kFaultFallocate);
    if (!s.ok()) return s;
    std::lock_guard<std::mutex> g(mu_);
    if (plan_.track && (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))) {
      s = record_undo(io, off, len);
      if (!s.ok()) return s;
    }
    return next_->fallocate(io, mode, off, len);
  }
  return next_->fallocate(io, mode, off, len);
}

Status FaultLayer::resize(const Io& io, uint64_t size) {
  if (active_.load(std::memory_order_relaxed)) {
    Status s = before(kFaultResize);
    if (!s.ok()) return s;
    std::lock_guard<std::mutex> g(mu_);
    if (plan_.track) {
      uint64_t cur = 0;
      s = next_->size(&cur);
      if (!s.ok()) return s;
      if (size < cur) s = record_undo(io, size, cur - size);
      else s = record_undo(io, cur, 0);
      if (!s.ok()) return s;
    }
    return next_->resize(io, size);
  }
  return next_->resize(io, size);
}

}  // namespace iofilterfs
