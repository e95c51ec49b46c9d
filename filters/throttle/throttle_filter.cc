#include "throttle_filter.h"

#include <time.h>

#include <cerrno>
#include <cstdio>

#include "params.h"

namespace iofilterfs {
namespace {

uint64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * throttle::kNsPerSec + static_cast<uint64_t>(ts.tv_nsec);
}

void sleep_until(uint64_t t) {
  timespec ts;
  ts.tv_sec = static_cast<time_t>(t / throttle::kNsPerSec);
  ts.tv_nsec = static_cast<long>(t % throttle::kNsPerSec);
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
  }
}

}  // namespace

ThrottleFilter::ThrottleFilter(const throttle::ThrottleConfig& cfg)
    : state_(cfg), describe_(throttle::describe_throttle(cfg)) {}

void ThrottleFilter::admit(bool is_write, uint64_t bytes) {
  uint64_t now, start;
  {
    std::lock_guard<std::mutex> g(mu_);
    // Read under the lock so the scheduler sees arrival times in order.
    now = monotonic_ns();
    start = state_.admit(is_write, bytes, now);
  }
  if (start <= now) return;
  delayed_.fetch_add(1, std::memory_order_relaxed);
  wait_ns_.fetch_add(start - now, std::memory_order_relaxed);
  queued_.fetch_add(1, std::memory_order_relaxed);
  sleep_until(start);
  queued_.fetch_sub(1, std::memory_order_relaxed);
}

Status ThrottleFilter::read(const Io& io, void* buf, size_t len, uint64_t off, size_t* got) {
  admit(false, len);
  reads_.fetch_add(1, std::memory_order_relaxed);
  read_bytes_.fetch_add(len, std::memory_order_relaxed);
  return next_->read(io, buf, len, off, got);
}

Status ThrottleFilter::write(const Io& io, const void* buf, size_t len, uint64_t off) {
  admit(true, len);
  writes_.fetch_add(1, std::memory_order_relaxed);
  write_bytes_.fetch_add(len, std::memory_order_relaxed);
  return next_->write(io, buf, len, off);
}

std::string ThrottleFilter::stats_json() const {
  char b[320];
  auto u = [](const std::atomic<uint64_t>& a) { return static_cast<unsigned long long>(a.load(std::memory_order_relaxed)); };
  std::snprintf(b, sizeof b,
                "{\"delayed\":%llu,\"wait_ns\":%llu,\"queued\":%llu,\"reads\":%llu,\"writes\":%llu,"
                "\"read_bytes\":%llu,\"write_bytes\":%llu}",
                u(delayed_), u(wait_ns_), u(queued_), u(reads_), u(writes_), u(read_bytes_), u(write_bytes_));
  return b;
}

void register_throttle(Registry& r) {
  r.add(FilterInfo{
      "throttle", FilterClass::Throttle, kFilterApiVersion,
      "per-disk IOPS and bandwidth limits with bursts (QEMU's throttling semantics)",
      [] {
        std::vector<std::string> keys;
        for (std::string_view k : throttle::throttle_keys()) keys.emplace_back(k);
        return keys;
      }(),
      [](const YAML::Node& params, YAML::Node* where) { return throttle::validate_throttle(params, where); },
      [](const YAML::Node& params) -> std::unique_ptr<Filter> {
        throttle::ThrottleConfig cfg;
        if (!throttle::parse_throttle(params, &cfg).empty()) return nullptr;
        return std::make_unique<ThrottleFilter>(cfg);
      }});
}

}  // namespace iofilterfs
