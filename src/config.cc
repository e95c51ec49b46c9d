#include "config.h"

#include <fnmatch.h>

#include <algorithm>
#include <cstring>

#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "suggest.h"
#include "units.h"

namespace iofilterfs {
namespace {

const std::vector<std::string> kTopKeys = {"datastore", "policies", "rules"};
const std::vector<std::string> kDatastoreKeys = {"backing", "mountpoint", "images", "options", "threads",
                                                 "log-level", "default-policy", "congestion-latency",
                                                 "view"};
const std::vector<std::string> kRuleKeys = {"match", "policy"};
const std::vector<std::string> kLogLevels = {"trace", "debug", "info", "warn", "error", "critical", "off"};

// A validation failure at a node; unwound to parse_config, which formats it.
struct ConfigError {
  YAML::Mark mark;
  std::string message;
};

[[noreturn]] void fail(const YAML::Node& at, std::string message) { throw ConfigError{at.Mark(), std::move(message)}; }

std::string type_name(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Scalar: return "'" + n.Scalar() + "'";
    case YAML::NodeType::Null: return "nothing";
    default: return "an undefined value";
  }
}

void expect_map(const YAML::Node& n, const std::string& what) {
  if (!n.IsMap()) fail(n, what + " must be a mapping, not " + type_name(n));
}

std::string scalar(const YAML::Node& n, const std::string& what) {
  if (!n.IsScalar() || n.Scalar().empty()) fail(n, what + " must be a non-empty string, not " + type_name(n));
  return n.Scalar();
}

std::vector<std::string> string_list(const YAML::Node& n, const std::string& what, bool allow_comma_string) {
  std::vector<std::string> out;
  if (allow_comma_string && n.IsScalar()) {
    std::stringstream ss(n.Scalar());
    std::string item;
    while (std::getline(ss, item, ','))
      if (!item.empty()) out.push_back(item);
    return out;
  }
  if (!n.IsSequence()) fail(n, what + " must be a list of strings, not " + type_name(n));
  for (const auto& item : n) out.push_back(scalar(item, what + " entries"));
  return out;
}

// Checks a mapping's keys against `known`: unknown keys and duplicates are errors.
void check_keys(const YAML::Node& map, const std::vector<std::string>& known, const std::string& where) {
  std::set<std::string> seen;
  for (const auto& kv : map) {
    const std::string key = kv.first.Scalar();
    if (std::find(known.begin(), known.end(), key) == known.end())
      fail(kv.first, "unknown key '" + key + "' in " + where + did_you_mean(key, known));
    if (!seen.insert(key).second) fail(kv.first, "duplicate key '" + key + "' in " + where);
  }
}

void parse_datastore(const YAML::Node& n, DatastoreConfig* c) {
  expect_map(n, "datastore");
  check_keys(n, kDatastoreKeys, "datastore");
  if (auto v = n["backing"]) c->backing = scalar(v, "datastore.backing");
  if (auto v = n["mountpoint"]) c->mountpoint = scalar(v, "datastore.mountpoint");
  if (auto v = n["images"]) {
    c->images = string_list(v, "datastore.images", false);
    if (c->images.empty()) fail(v, "datastore.images must name at least one pattern");
  }
  if (auto v = n["options"]) c->options = string_list(v, "datastore.options", true);
  if (auto v = n["threads"]) {
    long t = -1;
    try {
      t = v.as<long>();
    } catch (const YAML::Exception&) {
      fail(v, "datastore.threads must be a whole number, not " + type_name(v));
    }
    if (t < 1 || t > 1024) fail(v, "datastore.threads must be from 1 to 1024, not " + v.Scalar());
    c->threads = static_cast<unsigned>(t);
  }
  if (auto v = n["log-level"]) {
    c->log_level = scalar(v, "datastore.log-level");
    if (std::find(kLogLevels.begin(), kLogLevels.end(), c->log_level) == kLogLevels.end())
      fail(v, "unknown log level '" + c->log_level + "' (trace, debug, info, warn, error, critical, off)" );
  }
  if (auto v = n["default-policy"]) c->default_policy = scalar(v, "datastore.default-policy");
  if (auto v = n["view"]) {
    c->view = scalar(v, "datastore.view");
    if (c->view != "native" && c->view != "raw") fail(v, "datastore.view must be 'native' or 'raw', not '" + c->view + "'");
  }
  if (auto v = n["congestion-latency"]) {
    uint64_t us = 0;
    const std::string text = scalar(v, "datastore.congestion-latency");
    if (!parse_duration(text, &us).empty())
      fail(v, "datastore.congestion-latency must be a duration (e.g. 30ms), not '" + text + "'");
    if (us < 1000 || us > 60'000'000)
      fail(v, "datastore.congestion-latency must be from 1ms to 60s, not '" + text + "'");
    c->congestion_latency_us = us;
  }
}

void parse_policies(const YAML::Node& n, const Registry& registry, DatastoreConfig* c) {
  if (n.IsNull()) return;
  expect_map(n, "policies");
  std::vector<std::string> filter_names;
  for (const FilterInfo& f : registry.all()) filter_names.push_back(f.name);
  std::set<std::string> names;
  std::map<const FilterInfo*, std::vector<std::pair<std::string, YAML::Node>>> uses;  // in file order
  for (const auto& kv : n) {
    PolicySpec p;
    p.name = scalar(kv.first, "a policy name");
    if (p.name == kNoPolicy) fail(kv.first, std::string("'") + kNoPolicy + "' is the built-in policy without filters; choose another name");
    if (!names.insert(p.name).second) fail(kv.first, "duplicate policy '" + p.name + "'");
    const YAML::Node& body = kv.second;
    if (body.IsNull()) {  // a policy with no filters
      c->policies.push_back(std::move(p));
      continue;
    }
    expect_map(body, "policy '" + p.name + "'");
    const FilterInfo* by_class[kFilterClassCount] = {};
    for (const auto& f : body) {
      const std::string fname = f.first.Scalar();
      if (fname == "view") {  // not a filter: how the policy's images are presented
        p.view = scalar(f.second, "policy '" + p.name + "' view");
        if (p.view != "native" && p.view != "raw")
          fail(f.second, "policy '" + p.name + "': view must be 'native' or 'raw', not '" + p.view + "'");
        continue;
      }
      const FilterInfo* info = registry.find(fname);
      if (!info) {
        std::string known;
        for (const auto& k : filter_names) known += (known.empty() ? "" : ", ") + k;
        fail(f.first, "unknown filter '" + fname + "' in policy '" + p.name + "'" + did_you_mean(fname, filter_names) +
                          (known.empty() ? " (no filters are installed)" : " (installed: " + known + ")"));
      }
      const FilterInfo*& slot = by_class[static_cast<int>(info->cls)];
      if (slot)
        fail(f.first, "policy '" + p.name + "' has two filters of class " + to_string(info->cls) + ": '" + slot->name +
                          "' and '" + fname + "'");
      slot = info;
      YAML::Node params = f.second;
      if (!params.IsNull() && !params.IsMap())
        fail(params, "the parameters of filter '" + fname + "' must be a mapping, not " + type_name(params));
      if (info->validate) {
        YAML::Node where = params.IsNull() ? YAML::Node(f.first) : params;
        std::string msg = info->validate(params, &where);
        if (!msg.empty()) fail(where, fname + ": " + msg);
      }
      p.filters.push_back(FilterSpec{fname, YAML::Clone(params)});
      uses[info].emplace_back(p.name, params);
    }
    c->policies.push_back(std::move(p));
  }
  // Settings that relate across policies, checked by their filter.
  for (const auto& [info, list] : uses) {
    if (!info->validate_policies) continue;
    YAML::Node where = n;
    std::string msg = info->validate_policies(list, &where);
    if (!msg.empty()) fail(where, info->name + ": " + msg);
  }
}

void parse_rules(const YAML::Node& n, DatastoreConfig* c) {
  if (n.IsNull()) return;
  if (!n.IsSequence()) fail(n, "rules must be a list of { match: GLOB, policy: NAME }, not " + type_name(n));
  for (const auto& r : n) {
    expect_map(r, "a rule");
    check_keys(r, kRuleKeys, "a rule");
    if (!r["match"]) fail(r, "a rule needs 'match'");
    if (!r["policy"]) fail(r, "a rule needs 'policy'");
    RuleSpec rule{scalar(r["match"], "match"), scalar(r["policy"], "policy")};
    if (!c->find_policy(rule.policy)) {
      std::vector<std::string> names{kNoPolicy};
      for (const auto& p : c->policies) names.push_back(p.name);
      fail(r["policy"], "rule for '" + rule.match + "' names unknown policy '" + rule.policy + "'" +
                            did_you_mean(rule.policy, names));
    }
    c->rules.push_back(std::move(rule));
  }
}

std::string where(const std::string& file, const YAML::Mark& m) {
  if (m.is_null()) return file + ":";
  return file + ":" + std::to_string(m.line + 1) + ":" + std::to_string(m.column + 1) + ":";
}

}  // namespace

const PolicySpec* DatastoreConfig::find_policy(const std::string& name) const {
  static const PolicySpec none{kNoPolicy, {}};
  if (name == kNoPolicy) return &none;
  for (const auto& p : policies)
    if (p.name == name) return &p;
  return nullptr;
}

bool glob_matches(const std::string& pattern, const std::string& relpath) {
  if (pattern.find('/') != std::string::npos) return fnmatch(pattern.c_str(), relpath.c_str(), FNM_PATHNAME) == 0;
  const std::string base = relpath.substr(relpath.rfind('/') + 1);
  return fnmatch(pattern.c_str(), base.c_str(), 0) == 0;
}

DatastoreSettings DatastoreConfig::settings() const {
  DatastoreSettings s;
  s.congestion_latency_ns = congestion_latency_us * 1000;
  return s;
}

bool DatastoreConfig::is_image(const std::string& relpath) const {
  for (const auto& p : images)
    if (glob_matches(p, relpath)) return true;
  return false;
}

std::string DatastoreConfig::policy_for(const std::string& relpath) const {
  for (const auto& r : rules)
    if (glob_matches(r.match, relpath)) return r.policy;
  return default_policy;
}

std::string DatastoreConfig::view_for(const std::string& policy) const {
  const PolicySpec* p = find_policy(policy);
  return p && !p->view.empty() ? p->view : view;
}

bool DatastoreConfig::any_raw_view() const {
  if (view == "raw") return true;
  for (const auto& p : policies)
    if (p.view == "raw") return true;
  return false;
}

std::string parse_config(const std::string& text, const std::string& file, const Registry& registry,
                         DatastoreConfig* out) {
  DatastoreConfig c;
  c.file = file;
  try {
    YAML::Node root = YAML::Load(text);
    if (root.IsNull()) {
      *out = std::move(c);
      return {};
    }
    expect_map(root, "the file");
    check_keys(root, kTopKeys, "the file");
    if (auto d = root["datastore"]) parse_datastore(d, &c);
    if (auto p = root["policies"]) parse_policies(p, registry, &c);
    if (auto r = root["rules"]) parse_rules(r, &c);
    // Checked last: the default may name any policy defined in the file.
    if (!c.find_policy(c.default_policy)) {
      std::vector<std::string> names{kNoPolicy};
      for (const auto& p : c.policies) names.push_back(p.name);
      fail(root["datastore"]["default-policy"],
           "default-policy names unknown policy '" + c.default_policy + "'" + did_you_mean(c.default_policy, names));
    }
  } catch (const ConfigError& e) {
    return where(file, e.mark) + " " + e.message;
  } catch (const YAML::Exception& e) {
    return where(file, e.mark) + " " + e.msg;
  }
  *out = std::move(c);
  return {};
}

std::string load_config(const std::string& file, const Registry& registry, DatastoreConfig* out) {
  std::ifstream in(file);
  if (!in) return file + ": " + std::strerror(errno);
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return file + ": read error";
  return parse_config(ss.str(), file, registry, out);
}

std::string describe_policy(const PolicySpec& policy, const Registry& registry) {
  std::vector<std::pair<int, std::string>> ordered;
  for (const auto& f : policy.filters) {
    const FilterInfo* info = registry.find(f.name);
    std::string d = f.name;
    if (f.params && f.params.IsMap() && f.params.size()) {
      std::string p;
      for (const auto& kv : f.params) p += (p.empty() ? "" : " ") + kv.first.Scalar() + "=" + (kv.second.IsScalar() ? kv.second.Scalar() : "...");
      d += "(" + p + ")";
    }
    ordered.emplace_back(info ? static_cast<int>(info->cls) : kFilterClassCount, d);
  }
  std::sort(ordered.begin(), ordered.end());
  std::string s;
  for (const auto& [cls, d] : ordered) s += (s.empty() ? "" : " -> ") + d;
  return s.empty() ? "(empty)" : s;
}

std::vector<std::string> config_keys() {
  std::vector<std::string> keys;
  for (const auto& k : kTopKeys) keys.push_back(k);
  for (const auto& k : kDatastoreKeys) keys.push_back("datastore." + k);
  for (const auto& k : kRuleKeys) keys.push_back("rules." + k);
  keys.push_back("policies.view");
  return keys;
}

}  // namespace iofilterfs
