#include "cache/params.h"

#include <yaml-cpp/yaml.h>

#include "param_walk.h"
#include "units.h"  // parse_size

namespace iofilterfs::cache {
namespace {

std::string q(const std::string& s) { return quoted(s); }

// "64KiB", "1GiB", "1536" (exact: the largest binary unit that divides).
std::string size_text(uint64_t n) {
  const char* units[] = {"", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (u < 4 && n >= 1024 && n % 1024 == 0) {
    n /= 1024;
    ++u;
  }
  return std::to_string(n) + units[u];
}

// A percentage: "50" or "50%", 0..100.
bool parse_percent(std::string v, unsigned* out) {
  if (!v.empty() && v.back() == '%') v.pop_back();
  if (v.empty() || v.size() > 3) return false;
  unsigned n = 0;
  for (char c : v) {
    if (c < '0' || c > '9') return false;
    n = n * 10 + static_cast<unsigned>(c - '0');
  }
  if (n > 100) return false;
  *out = n;
  return true;
}

std::string check(const YAML::Node& params, CacheParams* out, YAML::Node* where) {
  if (!params.IsDefined() || params.IsNull())
    return "no cache storage given; set memory: SIZE, or device: DIRECTORY with size: SIZE";
  if (std::string e = require_mapping(params, where); !e.empty()) return e;
  CacheParams p;
  const std::vector<std::string>& keys = cache_keys();
  bool have_low_watermark = false;
  std::string e = walk_params(params, keys, where, [&](size_t, const YAML::Node& key, const YAML::Node& value) -> std::string {
    const std::string& name = key.Scalar();
    const std::string& v = value.Scalar();
    auto size_of = [&](uint64_t* n) -> std::string {
      std::string err = parse_size(v, n);
      if (!err.empty()) blame(where, value);
      return err.empty() ? "" : name + ": " + err;
    };
    if (name == "mode") {
      if (v == "write-through") p.mode = Mode::WriteThrough;
      else if (v == "write-back") p.mode = Mode::WriteBack;
      else if (v == "write-around") p.mode = Mode::WriteAround;
      else {
        blame(where, value);
        return "mode must be write-through, write-back or write-around, not " + q(v);
      }
    } else if (name == "memory" || name == "size") {
      uint64_t n = 0;
      std::string err = size_of(&n);
      if (!err.empty()) return err;
      if (n == 0 || n > kMaxCapacity) {
        blame(where, value);
        return name + " must be more than 0 and at most 1TiB, not " + q(v);
      }
      (name == "memory" ? p.memory : p.size) = n;
    } else if (name == "device") {
      if (v.empty() || v[0] != '/') {
        blame(where, value);
        return "device must be the absolute path of a directory for the cache files, not " + q(v);
      }
      p.device = v;
    } else if (name == "block") {
      uint64_t n = 0;
      std::string err = size_of(&n);
      if (!err.empty()) return err;
      if (n < 4096 || n > 1024 * 1024 || (n & (n - 1)) != 0) {
        blame(where, value);
        return "block must be a power of two from 4KiB to 1MiB, not " + q(v);
      }
      p.block = static_cast<uint32_t>(n);
    } else if (name == "sequential-cutoff") {
      std::string err = size_of(&p.sequential_cutoff);
      if (!err.empty()) return err;
    } else if (name == "high-watermark" || name == "low-watermark") {
      unsigned n = 0;
      if (!parse_percent(v, &n)) {
        blame(where, value);
        return name + " must be a percentage from 0 to 100, not " + q(v);
      }
      (name == "high-watermark" ? p.high_watermark : p.low_watermark) = n;
    } else if (name == "unsafe") {
      if (v == "true" || v == "yes" || v == "on") p.unsafe = true;
      else if (v == "false" || v == "no" || v == "off") p.unsafe = false;
      else {
        blame(where, value);
        return "unsafe must be true or false, not " + q(v);
      }
    }
    if (name == "low-watermark") have_low_watermark = true;
    return "";
  });
  if (!e.empty()) return e;
  auto at = [&](const char* k) { return params[k]; };
  if (p.memory && !p.device.empty()) {
    blame(where, at("device"));
    return "memory and device exclude each other; give one of them (a two-tier cache is not supported)";
  }
  if (!p.memory && p.device.empty()) {
    if (p.size) {
      blame(where, at("size"));
      return "size goes with device: DIRECTORY (for a RAM cache, give memory: SIZE)";
    }
    return "no cache storage given; set memory: SIZE, or device: DIRECTORY with size: SIZE";
  }
  if (p.memory && p.size) {
    blame(where, at("size"));
    return "size goes with device: DIRECTORY; a RAM cache's size is memory: SIZE";
  }
  if (!p.device.empty() && !p.size) {
    blame(where, at("device"));
    return "device needs size: SIZE (the cache file of each disk)";
  }
  const uint64_t cap = p.capacity();
  if (cap / p.block < kMinBlocks) {
    blame(where, at(p.memory ? "memory" : "size"));
    return std::string(p.memory ? "memory" : "size") + " must hold at least 16 blocks of " + size_text(p.block) +
           " (" + size_text(kMinBlocks * p.block) + "), not " + size_text(cap);
  }
  if (p.low_watermark >= p.high_watermark) {
    blame(where, have_low_watermark ? at("low-watermark") : at("high-watermark"));
    return "low-watermark (" + std::to_string(p.low_watermark) + "%) must be below high-watermark (" +
           std::to_string(p.high_watermark) + "%)";
  }
  if (p.mode == Mode::WriteBack && p.memory && !p.unsafe) {
    blame(where, at("mode"));
    return "write-back on memory loses every write the cache holds when the daemon stops unexpectedly; give a "
           "device: DIRECTORY, or accept the loss with unsafe: true";
  }
  if (p.unsafe && !(p.mode == Mode::WriteBack && p.memory)) {
    blame(where, at("unsafe"));
    return "unsafe applies only to write-back on memory; remove it";
  }
  if (out) *out = p;
  return "";
}

}  // namespace

const char* to_string(Mode m) {
  switch (m) {
    case Mode::WriteThrough: return "write-through";
    case Mode::WriteBack: return "write-back";
    case Mode::WriteAround: return "write-around";
  }
  return "?";
}

const std::vector<std::string>& cache_keys() {
  static const std::vector<std::string> k = {"mode",   "memory",          "device",         "size",
                                             "block",  "sequential-cutoff", "high-watermark", "low-watermark",
                                             "unsafe"};
  return k;
}

std::string validate_cache(const YAML::Node& params, YAML::Node* where) { return check(params, nullptr, where); }

std::string parse_cache(const YAML::Node& params, CacheParams* out, YAML::Node* where) {
  return check(params, out, where);
}

std::string describe_cache(const CacheParams& p) {
  std::string s = std::string("mode=") + to_string(p.mode);
  if (p.memory) s += " memory=" + size_text(p.memory);
  else s += " device=" + p.device + " size=" + size_text(p.size);
  s += " block=" + size_text(p.block);
  s += " sequential-cutoff=" + size_text(p.sequential_cutoff);
  if (p.mode == Mode::WriteBack)
    s += " watermarks=" + std::to_string(p.high_watermark) + "/" + std::to_string(p.low_watermark);
  if (p.unsafe) s += " unsafe";
  return s;
}

}  // namespace iofilterfs::cache
