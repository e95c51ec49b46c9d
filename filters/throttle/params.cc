#include "params.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <string>

#include "param_walk.h"
#include "suggest.h"
#include "units.h"

namespace iofilterfs::throttle {
namespace {

enum class Kind { Ops, Bytes, Duration, Size, Name, Shares };
enum class Field { Avg, Max, Length, IopsSize, Group, Shares, Reservation, QosLimit };

struct KeyDef {
  std::string_view name;
  Kind kind;
  int bucket;  // -1 for the keys that are not a bucket's (iops-size and the QoS keys)
  Field field;
};

// The one table of keys. Order: the listing, describe() and the order of cross-key checks.
constexpr KeyDef kKeys[] = {
    {"iops", Kind::Ops, kOpsTotal, Field::Avg},
    {"iops-max", Kind::Ops, kOpsTotal, Field::Max},
    {"iops-max-length", Kind::Duration, kOpsTotal, Field::Length},
    {"read-iops", Kind::Ops, kOpsRead, Field::Avg},
    {"read-iops-max", Kind::Ops, kOpsRead, Field::Max},
    {"read-iops-max-length", Kind::Duration, kOpsRead, Field::Length},
    {"write-iops", Kind::Ops, kOpsWrite, Field::Avg},
    {"write-iops-max", Kind::Ops, kOpsWrite, Field::Max},
    {"write-iops-max-length", Kind::Duration, kOpsWrite, Field::Length},
    {"bps", Kind::Bytes, kBpsTotal, Field::Avg},
    {"bps-max", Kind::Bytes, kBpsTotal, Field::Max},
    {"bps-max-length", Kind::Duration, kBpsTotal, Field::Length},
    {"read-bps", Kind::Bytes, kBpsRead, Field::Avg},
    {"read-bps-max", Kind::Bytes, kBpsRead, Field::Max},
    {"read-bps-max-length", Kind::Duration, kBpsRead, Field::Length},
    {"write-bps", Kind::Bytes, kBpsWrite, Field::Avg},
    {"write-bps-max", Kind::Bytes, kBpsWrite, Field::Max},
    {"write-bps-max-length", Kind::Duration, kBpsWrite, Field::Length},
    {"iops-size", Kind::Size, -1, Field::IopsSize},
    {"group", Kind::Name, -1, Field::Group},
    {"shares", Kind::Shares, -1, Field::Shares},
    {"reservation", Kind::Ops, -1, Field::Reservation},
    {"limit", Kind::Ops, -1, Field::QosLimit},
};
constexpr int kKeyCount = sizeof kKeys / sizeof kKeys[0];

constexpr uint64_t kMaxIopsSize = uint64_t(1) << 40;   // 1 TiB
constexpr uint64_t kMaxLengthUs = 1'000'000'000'000'000;  // 10^9 s, in us (10^18 ns fits 64 bits)
constexpr size_t kMaxGroupName = 64;

// SIOC's share levels.
constexpr std::pair<std::string_view, uint64_t> kShareLevels[] = {{"low", 500}, {"normal", 1000}, {"high", 2000}};

int key_index(std::string_view name) {
  for (int i = 0; i < kKeyCount; ++i)
    if (kKeys[i].name == name) return i;
  return -1;
}

int index_of(int bucket, Field f) {
  for (int i = 0; i < kKeyCount; ++i)
    if (kKeys[i].bucket == bucket && kKeys[i].field == f) return i;
  return -1;
}

std::string q(std::string_view s) { return quoted(s); }

// ---- unknown keys: QEMU's spellings and near misses ----

// QEMU's names (throttling.iops-total, iops_rd_max, bps-write-max-length ...) in ours.
std::string from_qemu(std::string_view key) {
  std::string s;
  for (char c : key) s += c == '_' ? '-' : static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s.rfind("throttling.", 0) == 0) s.erase(0, 11);
  std::vector<std::string> words;
  std::string dir;
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find('-', i);
    if (j == std::string::npos) j = s.size();
    std::string w = s.substr(i, j - i);
    if (w == "rd") w = "read";
    if (w == "wr") w = "write";
    if (w == "read" || w == "write") dir = w;
    else if (w != "total" && !w.empty()) words.push_back(w);
    i = j + 1;
  }
  std::string out = dir;
  for (const std::string& w : words) out += (out.empty() ? "" : "-") + w;
  return out;
}

std::string unknown_key(std::string_view key) {
  std::string msg = "unknown key " + q(key);
  std::string qemu = from_qemu(key);
  if (key_index(qemu) >= 0) return msg + " (did you mean " + q(qemu) + "?)";
  static const std::vector<std::string> known(throttle_keys().begin(), throttle_keys().end());
  std::string close = closest_name(key, known);
  if (!close.empty()) return msg + " (did you mean " + q(close) + "?)";
  return msg +
         " (known keys: iops, read-iops, write-iops, bps, read-bps, write-bps, each also with -max and -max-length, "
         "iops-size, group, shares, reservation and limit)";
}

// ---- values ----

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

// "20.5 MiB" -> "20.5", "MiB"; false without a leading digit.
bool split_number(std::string_view s, std::string_view* num, std::string_view* unit) {
  size_t i = 0;
  bool dot = false;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || (s[i] == '.' && !dot))) {
    if (s[i] == '.') dot = true;
    ++i;
  }
  if (i == 0 || !std::isdigit(static_cast<unsigned char>(s[0]))) return false;
  *num = s.substr(0, i);
  *unit = trim(s.substr(i));
  return true;
}

bool negative(std::string_view s) { return s.size() > 1 && s[0] == '-' && (std::isdigit(static_cast<unsigned char>(s[1])) || s[1] == '.'); }

// A rate may end in "/s".
std::string_view strip_per_second(std::string_view s) {
  if (s.size() >= 2 && s.substr(s.size() - 2) == "/s") return trim(s.substr(0, s.size() - 2));
  return s;
}

const char* none_hint(Field f) {
  switch (f) {
    case Field::Max: return " (leave it out for no burst)";
    case Field::Avg:
    case Field::QosLimit: return " (leave it out for no limit)";
    case Field::Reservation: return " (leave it out for none)";
    default: return "";
  }
}

std::string format_bytes(uint64_t v) {
  static const std::pair<const char*, uint64_t> units[] = {
      {"TiB", uint64_t(1) << 40}, {"GiB", uint64_t(1) << 30}, {"MiB", uint64_t(1) << 20}, {"KiB", uint64_t(1) << 10},
      {"TB", 1'000'000'000'000},  {"GB", 1'000'000'000},     {"MB", 1'000'000},         {"KB", 1000},
  };
  for (auto [name, mult] : units)
    if (v >= mult && v % mult == 0) return std::to_string(v / mult) + name;
  return std::to_string(v) + "B";
}

std::string format_ns(uint64_t ns) {
  static const std::pair<const char*, uint64_t> units[] = {
      {"h", 3600 * kNsPerSec}, {"m", 60 * kNsPerSec}, {"s", kNsPerSec}, {"ms", 1'000'000}, {"us", 1000}};
  for (auto [name, mult] : units)
    if (ns >= mult && ns % mult == 0) return std::to_string(ns / mult) + name;
  return std::to_string(ns) + "ns";
}

std::string format_value(Kind kind, uint64_t v) {
  switch (kind) {
    case Kind::Ops:
    case Kind::Shares:
    case Kind::Name: return std::to_string(v);
    case Kind::Bytes: return format_bytes(v) + "/s";
    case Kind::Size: return format_bytes(v);
    case Kind::Duration: return format_ns(v);
  }
  return {};
}

// Each parser returns an empty string or the whole message.
std::string parse_ops(const KeyDef& k, std::string_view text, uint64_t* out) {
  std::string_view s = trim(text);
  if (negative(s)) return q(k.name) + " cannot be negative (" + std::string(s) + ")";
  s = strip_per_second(s);
  bool digits = !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
  if (!digits)
    return q(k.name) + " must be a whole number of operations per second (e.g. 500), not " + q(text);
  if (s.size() > 16) return q(k.name) + " is too large (at most " + std::to_string(kValueMax) + ")";
  uint64_t v = std::stoull(std::string(s));
  if (v == 0) return q(k.name) + " must be greater than 0" + none_hint(k.field);
  if (v > kValueMax) return q(k.name) + " is too large (at most " + std::to_string(kValueMax) + ")";
  *out = v;
  return {};
}

std::string parse_shares(const KeyDef& k, std::string_view text, uint64_t* out) {
  std::string_view s = trim(text);
  for (auto [name, v] : kShareLevels)
    if (s == name) {
      *out = v;
      return {};
    }
  const std::string expect = q(k.name) + " must be a whole number from 1 to " + std::to_string(kMaxShares) +
                             ", or low, normal or high (500, 1000, 2000), not " + q(text);
  bool digits = !s.empty() && s.size() <= 16 &&
                std::all_of(s.begin(), s.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
  if (!digits) return expect;
  uint64_t v = std::stoull(std::string(s));
  if (v == 0 || v > kMaxShares) return expect;
  *out = v;
  return {};
}

std::string parse_name(const KeyDef& k, std::string_view text, std::string* out) {
  bool ok = !text.empty() && text.size() <= kMaxGroupName &&
            std::all_of(text.begin(), text.end(), [](char c) {
              return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
            });
  if (!ok)
    return q(k.name) + " must be a name of letters, digits, '-', '_' and '.' (at most " +
           std::to_string(kMaxGroupName) + "), not " + q(text);
  *out = std::string(text);
  return {};
}

// Bytes per second (rate) or bytes (size).
std::string parse_bytes(const KeyDef& k, std::string_view text, uint64_t* out) {
  const bool rate = k.kind == Kind::Bytes;
  std::string_view s = trim(text);
  if (negative(s)) return q(k.name) + " cannot be negative (" + std::string(s) + ")";
  if (rate) s = strip_per_second(s);
  std::string_view num, unit;
  if (!split_number(s, &num, &unit)) {
    if (rate) return q(k.name) + " must be a rate in bytes per second (e.g. 20MiB/s or 1048576), not " + q(text);
    return q(k.name) + " must be a size in bytes (e.g. 4096 or 4KiB), not " + q(text);
  }
  uint64_t mult = 0;
  if (!parse_size("1" + std::string(unit), &mult).empty())
    return q(k.name) + " has an unknown unit " + q(unit) + " in " + q(text) +
           (rate ? " (use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB, optionally followed by /s)"
                 : " (use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB)");
  const uint64_t top = rate ? kValueMax : kMaxIopsSize;
  const std::string too_large = q(k.name) + " is too large (at most " +
                                (rate ? std::to_string(kValueMax) + " bytes per second)" : std::string("1TiB)"));
  if (num.size() > 24 || std::stod(std::string(num)) * static_cast<double>(mult) > static_cast<double>(top))
    return too_large;
  uint64_t v = 0;
  if (!parse_size(std::string(num) + std::string(unit), &v).empty())
    return q(k.name) + " must be a whole number of bytes" + (rate ? " per second" : "") + ", not " + q(text);
  if (v == 0) return q(k.name) + " must be greater than 0" + none_hint(k.field);
  if (v > top) return too_large;
  *out = v;
  return {};
}

std::string parse_length(const KeyDef& k, std::string_view text, uint64_t* out_ns) {
  std::string_view s = trim(text);
  if (negative(s)) return q(k.name) + " cannot be negative (" + std::string(s) + ")";
  std::string_view num, unit;
  if (!split_number(s, &num, &unit))
    return q(k.name) + " must be a duration (e.g. 2s, 500ms, 1m; a plain number is seconds), not " + q(text);
  uint64_t mult = 0, us = 0;
  if (!parse_duration("1" + std::string(unit), &mult).empty())
    return q(k.name) + " has an unknown unit " + q(unit) + " in " + q(text) +
           " (use us, ms, s, m, h, d; a plain number is seconds)";
  // Checked before parse_duration, whose conversion to 64 bits must not overflow.
  const std::string too_long = q(k.name) + " is too long (at most 1000000000s)";
  if (num.size() > 24 || std::stod(std::string(num)) * static_cast<double>(mult) > static_cast<double>(kMaxLengthUs))
    return too_long;
  if (!parse_duration(std::string(num) + std::string(unit), &us).empty())
    return q(k.name) + " must be a duration, not " + q(text);
  if (us == 0) return q(k.name) + " must be greater than 0";
  if (us > kMaxLengthUs) return too_long;
  *out_ns = us * 1000;
  return {};
}

const char* kind_noun(Kind kind) {
  switch (kind) {
    case Kind::Ops:
    case Kind::Shares: return "a number";
    case Kind::Name: return "a name";
    case Kind::Bytes: return "a rate";
    case Kind::Duration: return "a duration";
    case Kind::Size: return "a size";
  }
  return "a value";
}

// The key names in kKeys order, for walk_params().
const std::vector<std::string>& throttle_key_names() {
  static const std::vector<std::string> names(throttle_keys().begin(), throttle_keys().end());
  return names;
}

struct Seen {
  bool set = false;
  YAML::Node key, value;
  uint64_t v = 0;
  std::string name;  // the group's
};


std::string check(const YAML::Node& params, ThrottleParams* out, YAML::Node* where) {
  static const std::string kNoLimit =
      "no limit given; set at least one of iops, read-iops, write-iops, bps, read-bps, write-bps, or of the "
      "datastore QoS keys shares, reservation, limit";
  if (!params.IsDefined() || params.IsNull()) return kNoLimit;
  if (std::string e = require_mapping(params, where); !e.empty()) return e;

  Seen seen[kKeyCount];
  WalkOptions how;
  how.unknown = [](const std::string& name) { return unknown_key(name); };
  how.value_noun = [](size_t i) { return std::string(kind_noun(kKeys[i].kind)); };
  std::string e = walk_params(params, throttle_key_names(), where, [&](size_t i, const YAML::Node& key, const YAML::Node& value) -> std::string {
    const KeyDef& k = kKeys[i];
    uint64_t v = 0;
    std::string err, name;
    switch (k.kind) {
      case Kind::Ops: err = parse_ops(k, value.Scalar(), &v); break;
      case Kind::Bytes:
      case Kind::Size: err = parse_bytes(k, value.Scalar(), &v); break;
      case Kind::Duration: err = parse_length(k, value.Scalar(), &v); break;
      case Kind::Shares: err = parse_shares(k, value.Scalar(), &v); break;
      case Kind::Name: err = parse_name(k, value.Scalar(), &name); break;
    }
    if (!err.empty()) {
      blame(where, value);
      return err;
    }
    seen[i] = Seen{true, key, value, v, name};
    return "";
  }, how);
  if (!e.empty()) return e;

  // Across keys, in QEMU's order of checks.
  for (int total : {kOpsTotal, kBpsTotal}) {
    const Seen& t = seen[index_of(total, Field::Avg)];
    if (!t.set) continue;
    for (int dir : {total + 1, total + 2}) {
      int i = index_of(dir, Field::Avg);
      if (seen[i].set) {
        blame(where, seen[i].key);
        return q(kKeys[i].name) + " cannot be combined with " + q(kKeys[index_of(total, Field::Avg)].name) +
               ": a total limit excludes the read and write limits of the same kind";
      }
    }
  }
  for (const KeyDef& k : kKeys) {
    if (k.field != Field::Avg) continue;
    const int ia = index_of(k.bucket, Field::Avg), im = index_of(k.bucket, Field::Max),
              il = index_of(k.bucket, Field::Length);
    const Seen &avg = seen[ia], &max = seen[im], &len = seen[il];
    if (len.set && !max.set) {
      blame(where, len.key);
      return q(kKeys[il].name) + " needs " + q(kKeys[im].name) + " (the burst rate it applies to)";
    }
    if (max.set && !avg.set) {
      blame(where, max.key);
      return q(kKeys[im].name) + " needs " + q(kKeys[ia].name) + " (the limit a burst falls back to)";
    }
    if (max.set && max.v < avg.v) {
      blame(where, max.value);
      return q(kKeys[im].name) + " (" + format_value(k.kind, max.v) + ") is below " + q(kKeys[ia].name) + " (" +
             format_value(k.kind, avg.v) + "); a burst rate must be at least the limit";
    }
    if (len.set && u128(max.v) * len.v > u128(kValueMax) * kNsPerSec) {
      blame(where, len.value);
      return q(kKeys[im].name) + " times " + q(kKeys[il].name) + " is too large a burst (at most " +
             std::to_string(kValueMax) + (k.kind == Kind::Ops ? " operations)" : " bytes)");
    }
  }
  const int isz = key_index("iops-size");
  if (seen[isz].set && !seen[index_of(kOpsTotal, Field::Avg)].set && !seen[index_of(kOpsRead, Field::Avg)].set &&
      !seen[index_of(kOpsWrite, Field::Avg)].set) {
    blame(where, seen[isz].key);
    return "'iops-size' needs an iops limit ('iops', 'read-iops' or 'write-iops')";
  }
  bool any_limit = false;
  for (int i = 0; i < kKeyCount; ++i) any_limit |= seen[i].set && kKeys[i].field == Field::Avg;
  const Seen &group = seen[key_index("group")], &reservation = seen[key_index("reservation")],
             &limit = seen[key_index("limit")], &shares = seen[key_index("shares")];
  if (group.set && !any_limit) {
    blame(where, group.key);
    return "'group' needs the limits its disks share (iops, read-iops, write-iops, bps, read-bps or write-bps)";
  }
  if (reservation.set && limit.set && reservation.v > limit.v) {
    blame(where, reservation.value);
    return "'reservation' (" + std::to_string(reservation.v) + ") is above 'limit' (" + std::to_string(limit.v) +
           "); a disk cannot be guaranteed more than it may do";
  }
  const Seen& iops = seen[index_of(kOpsTotal, Field::Avg)];
  if (reservation.set && iops.set && reservation.v > iops.v) {
    blame(where, reservation.value);
    return "'reservation' (" + std::to_string(reservation.v) + ") is above 'iops' (" + std::to_string(iops.v) +
           "); a disk cannot be guaranteed more than it may do";
  }
  if (!any_limit && !reservation.set && !limit.set && !shares.set) {
    blame(where, params);
    return kNoLimit;
  }

  if (out) {
    ThrottleParams p;
    ThrottleConfig& c = p.limits;
    for (int i = 0; i < kKeyCount; ++i) {
      if (!seen[i].set) continue;
      const KeyDef& k = kKeys[i];
      switch (k.field) {
        case Field::Avg: c.limit[k.bucket].avg = seen[i].v; break;
        case Field::Max: c.limit[k.bucket].max = seen[i].v; break;
        case Field::Length: c.limit[k.bucket].max_length_ns = seen[i].v; break;
        case Field::IopsSize: c.iops_size = seen[i].v; break;
        case Field::Group: p.group = seen[i].name; break;
        case Field::Shares: p.shares = seen[i].v; break;
        case Field::Reservation: p.reservation = seen[i].v; break;
        case Field::QosLimit: p.limit = seen[i].v; break;
      }
    }
    *out = std::move(p);
  }
  return {};
}

}  // namespace

const std::vector<std::string_view>& throttle_keys() {
  static const std::vector<std::string_view> keys = [] {
    std::vector<std::string_view> v;
    for (const KeyDef& k : kKeys) v.push_back(k.name);
    return v;
  }();
  return keys;
}

std::string validate_throttle(const YAML::Node& params, YAML::Node* where) { return check(params, nullptr, where); }

std::string parse_throttle(const YAML::Node& params, ThrottleParams* out, YAML::Node* where) {
  return check(params, out, where);
}

std::string parse_throttle(const YAML::Node& params, ThrottleConfig* cfg, YAML::Node* where) {
  ThrottleParams p;
  std::string err = check(params, &p, where);
  if (err.empty()) *cfg = p.limits;
  return err;
}

std::string validate_throttle_policies(const std::vector<std::pair<std::string, YAML::Node>>& uses, YAML::Node* where) {
  struct First {
    std::string group, policy;
    ThrottleConfig limits;
  };
  std::vector<First> seen;
  for (const auto& [policy, params] : uses) {
    ThrottleParams p;
    if (!check(params, &p, nullptr).empty() || p.group.empty()) continue;
    auto it = std::find_if(seen.begin(), seen.end(), [&](const First& f) { return f.group == p.group; });
    if (it == seen.end()) {
      seen.push_back(First{p.group, policy, p.limits});
      continue;
    }
    if (it->limits == p.limits) continue;
    blame(where, params["group"]);
    return "group " + q(p.group) + " is given different limits by policy " + q(it->policy) + " (" +
           describe_throttle(it->limits) + ") and policy " + q(policy) + " (" + describe_throttle(p.limits) +
           "); every policy that names a group must give it the same limits";
  }
  return {};
}

std::string describe_throttle(const ThrottleParams& p) {
  std::string s = describe_throttle(p.limits);
  auto add = [&](const char* key, const std::string& v) { s += (s.empty() ? "" : " ") + std::string(key) + "=" + v; };
  if (!p.group.empty()) add("group", p.group);
  if (p.shares != kDefaultShares) add("shares", std::to_string(p.shares));
  if (p.reservation) add("reservation", std::to_string(p.reservation));
  if (p.limit) add("limit", std::to_string(p.limit));
  return s;
}

std::string describe_throttle(const ThrottleConfig& cfg) {
  std::string s;
  for (const KeyDef& k : kKeys) {
    uint64_t v = 0;
    if (k.bucket < 0 && k.field != Field::IopsSize) continue;  // not a limit
    if (k.field == Field::IopsSize) {
      v = cfg.iops_size;
    } else {
      const Limit& l = cfg.limit[k.bucket];
      if (k.field == Field::Avg) v = l.avg;
      if (k.field == Field::Max) v = l.max;
      if (k.field == Field::Length && l.max && l.max_length_ns != kNsPerSec) v = l.max_length_ns;
    }
    if (!v) continue;
    if (!s.empty()) s += ' ';
    s += std::string(k.name) + "=" + format_value(k.kind, v);
  }
  return s;
}

}  // namespace iofilterfs::throttle
