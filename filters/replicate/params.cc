#include "replicate/params.h"

#include <yaml-cpp/yaml.h>

#include <set>

#include "param_walk.h"
#include "units.h"

namespace iofilterfs::replicate {
namespace {

std::string q(const std::string& s) { return quoted(s); }

bool starts_with(const std::string& s, const char* p) { return s.rfind(p, 0) == 0; }

// "" or why `t` is not a target.
std::string check_target(const std::string& t, bool* nbd) {
  *nbd = false;
  if (t.empty()) return "'target' is empty";
  for (const char* scheme : {"nbd://", "nbds://", "nbd+unix://", "nbds+unix://"}) {
    if (!starts_with(t, scheme)) continue;
    *nbd = true;
    const std::string rest = t.substr(std::string(scheme).size());
    const bool unix_socket = std::string(scheme).find("unix") != std::string::npos;
    if (unix_socket) {
      if (rest.empty() || rest[0] != '/')
        return "'target' " + q(t) + ": a unix-socket NBD URI has no host (" + scheme + "/EXPORT?socket=PATH)";
      if (t.find("socket=") == std::string::npos)
        return "'target' " + q(t) + ": a unix-socket NBD URI needs ?socket=PATH";
    } else if (rest.empty() || rest[0] == '/' || rest[0] == ':') {
      return "'target' " + q(t) + ": the NBD URI has no host (" + scheme + "HOST[:PORT]/EXPORT)";
    }
    for (char c : t)
      if (static_cast<unsigned char>(c) < 0x21) return "'target' " + q(t) + ": spaces and control characters are not allowed";
    return "";
  }
  if (t.find("://") != std::string::npos)
    return "'target' " + q(t) +
           ": unknown scheme (use a directory, nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, or nbds:// for "
           "TLS)";
  if (t[0] != '/') return "'target' must be an absolute directory or an NBD URI, not " + q(t);
  return "";
}

}  // namespace

const std::vector<std::string>& replicate_keys() {
  static const std::vector<std::string> k = {"target",          "mode",        "journal",      "max-lag", "on-overflow",
                                             "on-target-error", "region-size", "reconnect-max", "retention"};
  return k;
}

std::string parse_replicate(const YAML::Node& params, ReplicateParams* out, YAML::Node* where) {
  if (!params.IsDefined() || params.IsNull()) return "'target' and 'journal' are required";
  if (std::string e = require_mapping(params, where); !e.empty()) return e;
  ReplicateParams p;
  std::set<std::string> seen;
  std::string err = walk_params(params, replicate_keys(), where, [&](size_t, const YAML::Node& key, const YAML::Node& val) -> std::string {
    const std::string& k = key.Scalar();
    seen.insert(k);
    const std::string v = val.Scalar();
    if (v.empty()) {
      blame(where, key);
      return q(k) + " has no value";
    }
    blame(where, val);
    if (k == "target") {
      std::string e = check_target(v, &p.target_is_nbd);
      if (!e.empty()) return e;
      p.target = v;
    } else if (k == "mode") {
      if (v == "sync") p.mode = Mode::Sync;
      else if (v == "async") p.mode = Mode::Async;
      else return "'mode' must be sync or async, not " + q(v);
    } else if (k == "journal") {
      if (v[0] != '/') return "'journal' must be an absolute directory, not " + q(v);
      p.journal = v;
    } else if (k == "max-lag") {
      uint64_t b = 0;
      std::string e = parse_size(v, &b);
      if (!e.empty()) return "'max-lag' must be a size (e.g. 1GiB), not " + q(v);
      if (b < (uint64_t(1) << 20)) return "'max-lag' must be at least 1MiB, not " + q(v);
      p.max_lag = b;
    } else if (k == "on-overflow") {
      if (v == "bitmap") p.on_overflow = Overflow::Bitmap;
      else if (v == "backpressure") p.on_overflow = Overflow::Backpressure;
      else return "'on-overflow' must be bitmap or backpressure, not " + q(v);
    } else if (k == "on-target-error") {
      if (v == "degrade") p.on_error = OnError::Degrade;
      else if (v == "fail") p.on_error = OnError::Fail;
      else return "'on-target-error' must be degrade or fail, not " + q(v);
    } else if (k == "region-size") {
      uint64_t b = 0;
      std::string e = parse_size(v, &b);
      if (!e.empty()) return "'region-size' must be a size (e.g. 64KiB), not " + q(v);
      if (b < 4096 || b > (uint64_t(64) << 20) || (b & (b - 1)))
        return "'region-size' must be a power of two from 4KiB to 64MiB, not " + q(v);
      p.region_shift = static_cast<uint32_t>(__builtin_ctzll(b));
    } else if (k == "reconnect-max") {
      uint64_t us = 0;
      std::string e = parse_duration(v, &us);
      if (!e.empty()) return "'reconnect-max' must be a duration (e.g. 5s), not " + q(v);
      if (us < 100'000 || us > 600'000'000) return "'reconnect-max' must be from 100ms to 10m, not " + q(v);
      p.reconnect_max_us = us;
    } else if (k == "retention") {
      uint64_t us = 0;
      std::string e = parse_duration(v, &us);
      if (!e.empty()) return "'retention' must be a duration (e.g. 1h), not " + q(v);
      if (us < 1'000'000 || us > 365ull * 86400 * 1'000'000) return "'retention' must be from 1s to 365d, not " + q(v);
      p.retention_us = us;
    }
    return "";
  });
  if (!err.empty()) return err;
  if (where) where->reset(params);
  if (p.target.empty()) return "'target' is required (a directory or an NBD URI)";
  if (p.journal.empty()) return "'journal' is required (a directory for the image's journal and dirty bitmap)";
  if (p.mode == Mode::Sync && seen.count("on-overflow")) {
    if (where) where->reset(params["on-overflow"]);
    return "'on-overflow' applies to mode: async only";
  }
  if (p.mode == Mode::Sync && seen.count("max-lag")) {
    if (where) where->reset(params["max-lag"]);
    return "'max-lag' applies to mode: async only";
  }
  if (p.mode == Mode::Async && seen.count("on-target-error")) {
    if (where) where->reset(params["on-target-error"]);
    return "'on-target-error' applies to mode: sync only (async always keeps writing and catches up)";
  }
  if (!p.target_is_nbd && (p.target == p.journal || starts_with(p.journal, (p.target + "/").c_str()))) {
    if (where) where->reset(params["journal"]);
    return "'journal' must not be inside the target directory";
  }
  *out = std::move(p);
  return "";
}

std::string validate_replicate(const YAML::Node& params, YAML::Node* where) {
  ReplicateParams p;
  return parse_replicate(params, &p, where);
}

std::string describe_replicate(const ReplicateParams& p) {
  std::string s = "target=" + p.target + " mode=" + (p.mode == Mode::Sync ? "sync" : "async") + " journal=" + p.journal;
  if (p.mode == Mode::Async) {
    s += " max-lag=" + format_size(p.max_lag);
    s += std::string(" on-overflow=") + (p.on_overflow == Overflow::Bitmap ? "bitmap" : "backpressure");
  } else {
    s += std::string(" on-target-error=") + (p.on_error == OnError::Degrade ? "degrade" : "fail");
  }
  s += " region-size=" + format_size(uint64_t(1) << p.region_shift);
  if (p.retention_us) s += " retention=" + std::to_string(p.retention_us / 1'000'000) + "s";
  return s;
}

}  // namespace iofilterfs::replicate
