#include "throttle_filter.h"

#include <yaml-cpp/yaml.h>

#include <chrono>
#include <cstdio>

namespace iofilterfs {

using throttle::monotonic_ns;

ThrottleFilter::ThrottleFilter(const throttle::ThrottleParams& p)
    : params_(p),
      state_(p.group.empty() ? p.limits : throttle::ThrottleConfig{}),
      limit_(p.limit),
      describe_(throttle::describe_throttle(p)) {}

ThrottleFilter::ThrottleFilter(const throttle::ThrottleConfig& cfg)
    : ThrottleFilter([&] {
        throttle::ThrottleParams p;
        p.limits = cfg;
        return p;
      }()) {}

ThrottleFilter::~ThrottleFilter() { close(); }

Status ThrottleFilter::open(const DiskInfo&) {
  std::shared_ptr<throttle::GroupMember> member;
  throttle::ThrottleParams p;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (opened_) return Status::Ok();
    p = params_;
  }
  if (!p.group.empty()) member = std::make_shared<throttle::GroupMember>(throttle::Group::get(p.group, p.limits));
  const int client = throttle::QosDomain::instance().add({p.shares, p.reservation});
  std::lock_guard<std::mutex> g(mu_);
  member_ = std::move(member);
  client_.store(client);
  opened_ = true;
  return Status::Ok();
}

void ThrottleFilter::close() {
  std::shared_ptr<throttle::GroupMember> member;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (!opened_) return;
    opened_ = false;
    member = std::move(member_);
  }
  const int client = client_.exchange(-1);
  if (client >= 0) throttle::QosDomain::instance().remove(client);
  // `member` leaves the group here, or with the last of its requests still queued there.
}

bool ThrottleFilter::reconfigure(const YAML::Node& params) {
  throttle::ThrottleParams p;
  if (!throttle::parse_throttle(params, &p).empty()) return false;
  bool opened;
  std::string old_group;
  {
    std::lock_guard<std::mutex> g(mu_);
    opened = opened_;
    old_group = params_.group;
  }
  // Join the new group (or give the same group its new limits) before taking mu_.
  std::shared_ptr<throttle::GroupMember> member, old;
  if (opened && !p.group.empty()) {
    std::shared_ptr<throttle::Group> group = throttle::Group::get(p.group, p.limits);
    if (p.group != old_group) member = std::make_shared<throttle::GroupMember>(std::move(group));
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    if (p.group != old_group) {
      old = std::move(member_);
      member_ = std::move(member);
    }
    params_ = p;
    describe_ = throttle::describe_throttle(p);
    // As QEMU's throttle_config(): the new limits start with empty buckets. The requests
    // sleeping here are charged to them again, in their order, and woken to their new times.
    state_ = throttle::ThrottleState(p.group.empty() ? p.limits : throttle::ThrottleConfig{});
    limit_ = throttle::TagClock(p.limit);
    const uint64_t now = monotonic_ns();
    for (Sleeper* s = sleepers_; s; s = s->next) {
      s->start = start_for(s->is_write, s->bytes, now);
      s->cv.notify_one();
    }
  }
  const int client = client_.load();
  if (client >= 0) throttle::QosDomain::instance().set(client, {p.shares, p.reservation});
  return true;  // `old` leaves its group when its queued requests are through
}

uint64_t ThrottleFilter::start_for(bool is_write, uint64_t bytes, uint64_t now) {
  uint64_t t = limit_.on() ? limit_.next(now) : now;
  if (params_.group.empty()) t = state_.admit(is_write, bytes, t);
  if (limit_.on()) limit_.take(t);
  return t;
}

void ThrottleFilter::admit(bool is_write, uint64_t bytes, bool* waited) {
  std::shared_ptr<throttle::GroupMember> member;
  {
    std::unique_lock<std::mutex> lk(mu_);
    const uint64_t now = monotonic_ns();
    const uint64_t start = start_for(is_write, bytes, now);
    if (start > now) {
      *waited = true;
      Sleeper s{is_write, bytes, start};
      s.prev = sleepers_tail_;
      (sleepers_tail_ ? sleepers_tail_->next : sleepers_) = &s;
      sleepers_tail_ = &s;
      queued_.fetch_add(1, std::memory_order_relaxed);
      while (monotonic_ns() < s.start)
        s.cv.wait_until(lk, std::chrono::steady_clock::time_point(std::chrono::nanoseconds(s.start)));
      queued_.fetch_sub(1, std::memory_order_relaxed);
      (s.prev ? s.prev->next : sleepers_) = s.next;
      (s.next ? s.next->prev : sleepers_tail_) = s.prev;
    }
    member = member_;
  }
  if (member && member->group->pass(member->id, is_write, bytes, &queued_)) *waited = true;
  const int client = client_.load(std::memory_order_relaxed);
  if (client >= 0 && throttle::QosDomain::instance().enter(client, &queued_)) *waited = true;
}

void ThrottleFilter::done(bool is_write, uint64_t bytes, uint64_t t_down, bool waited, uint64_t t_arrival) {
  const uint64_t now = monotonic_ns();
  inflight_.fetch_sub(1, std::memory_order_relaxed);
  if (client_.load(std::memory_order_relaxed) >= 0) throttle::QosDomain::instance().leave(now - t_down);
  if (waited) {
    delayed_.fetch_add(1, std::memory_order_relaxed);
    wait_ns_.fetch_add(t_down - t_arrival, std::memory_order_relaxed);
  }
  (is_write ? writes_ : reads_).fetch_add(1, std::memory_order_relaxed);
  (is_write ? write_bytes_ : read_bytes_).fetch_add(bytes, std::memory_order_relaxed);
}

Status ThrottleFilter::read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) {
  const uint64_t t0 = monotonic_ns();
  bool waited = false;
  admit(false, len, &waited);
  const uint64_t t1 = monotonic_ns();
  {
    std::lock_guard<std::mutex> g(meter_mu_);
    meter_.add(t1, len);
  }
  inflight_.fetch_add(1, std::memory_order_relaxed);
  Status s = next_->read(io, buf, len, off, got);
  done(false, len, t1, waited, t0);
  return s;
}

Status ThrottleFilter::write(const Io& io, const void* buf, size_t len, uint64_t off) {
  const uint64_t t0 = monotonic_ns();
  bool waited = false;
  admit(true, len, &waited);
  const uint64_t t1 = monotonic_ns();
  {
    std::lock_guard<std::mutex> g(meter_mu_);
    meter_.add(t1, len);
  }
  inflight_.fetch_add(1, std::memory_order_relaxed);
  Status s = next_->write(io, buf, len, off);
  done(true, len, t1, waited, t0);
  return s;
}

std::string ThrottleFilter::describe() const {
  std::lock_guard<std::mutex> g(mu_);
  return describe_;
}

std::string ThrottleFilter::stats_json() const {
  auto u = [](const std::atomic<uint64_t>& a) { return static_cast<unsigned long long>(a.load(std::memory_order_relaxed)); };
  const uint64_t now = monotonic_ns();
  uint64_t iops, bps;
  {
    std::lock_guard<std::mutex> g(meter_mu_);
    iops = meter_.ops_per_sec(now);
    bps = meter_.bytes_per_sec(now);
  }
  std::string group;
  unsigned long long shares, reservation, limit;
  {
    std::lock_guard<std::mutex> g(mu_);
    group = params_.group;
    shares = params_.shares;
    reservation = params_.reservation;
    limit = params_.limit;
  }
  const bool qos = client_.load() >= 0;
  const throttle::QosDomain::Snapshot d = qos ? throttle::QosDomain::instance().snapshot() : throttle::QosDomain::Snapshot{};
  char b[768];
  std::snprintf(b, sizeof b,
                "{\"delayed\":%llu,\"wait_ns\":%llu,\"wait_us\":%llu,\"queued\":%llu,\"inflight\":%llu,\"reads\":%llu,"
                "\"writes\":%llu,\"read_bytes\":%llu,\"write_bytes\":%llu,\"iops\":%llu,\"bytes_per_s\":%llu,"
                "\"mb_per_s\":%.1f,\"group\":%s%s%s,\"shares\":%llu,\"reservation\":%llu,\"limit\":%llu,"
                "\"congested\":%s,\"window\":%s,\"datastore_latency_us\":%llu}",
                u(delayed_), u(wait_ns_), u(wait_ns_) / 1000, u(queued_), u(inflight_), u(reads_), u(writes_),
                u(read_bytes_), u(write_bytes_), static_cast<unsigned long long>(iops),
                static_cast<unsigned long long>(bps), bps / 1e6, group.empty() ? "null" : "\"", group.c_str(),
                group.empty() ? "" : "\"", shares, reservation, limit, d.congested ? "true" : "false",
                d.congested ? std::to_string(d.window).c_str() : "null",
                static_cast<unsigned long long>(d.latency_ns / 1000));
  return b;
}

void register_throttle(Registry& r) {
  r.add(FilterInfo{
      "throttle", FilterClass::Throttle, kFilterApiVersion,
      "per-disk IOPS and bandwidth limits with bursts (QEMU's throttling semantics), shared groups, and datastore "
      "QoS by shares, reservations and limits under congestion (SIOC/mClock)",
      [] {
        std::vector<std::string> keys;
        for (std::string_view k : throttle::throttle_keys()) keys.emplace_back(k);
        return keys;
      }(),
      [](const YAML::Node& params, YAML::Node* where) { return throttle::validate_throttle(params, where); },
      [](const YAML::Node& params) -> std::unique_ptr<Filter> {
        throttle::ThrottleParams p;
        if (!throttle::parse_throttle(params, &p).empty()) return nullptr;
        return std::make_unique<ThrottleFilter>(p);
      },
      [](const std::vector<std::pair<std::string, YAML::Node>>& uses, YAML::Node* where) {
        return throttle::validate_throttle_policies(uses, where);
      }});
}

}  // namespace iofilterfs
