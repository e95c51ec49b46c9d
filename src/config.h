// The datastore's policy file: its settings, named storage policies and the rules that assign
// policies to images.
//
//   datastore:
//     backing: /srv/images          # BACKING on the command line overrides it
//     mountpoint: /srv/filtered     # and MOUNTPOINT this
//     images: ["*.raw", "*.img", "*.qcow2", "*.vmdk"]
//     options: [allow_other]        # mount options, as -o takes them
//     threads: 64
//     log-level: info
//     default-policy: bronze        # for images no rule matches (default: none)
//     congestion-latency: 30ms      # datastore QoS engages above this latency (default 30ms)
//   policies:
//     gold:
//       throttle: { iops: 5000 }    # FILTER: { parameters }, at most one filter per class
//   rules:
//     - { match: "db/*.qcow2", policy: gold }   # first match wins
//
// Loading is all-or-nothing: the result is either a complete, validated DatastoreConfig or one
// message "FILE:LINE:COLUMN: what is wrong" (YAML syntax, unknown keys with a suggestion,
// wrong types, bad units, unknown filters or policies, two filters of one class, and each
// filter's own parameter checks, which the filter does itself in a pure function).
//
// A loaded DatastoreConfig is immutable and shared (std::shared_ptr<const>): a reload builds a
// new one and swaps it in.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "chain.h"
#include "options.h"

namespace iofilterfs {

struct PolicySpec {
  std::string name;
  std::vector<FilterSpec> filters;  // in the file's order; the chain orders them by class
  std::string view;                 // "native", "raw", or "" (the datastore's view)
};

struct RuleSpec {
  std::string match;   // glob, relative to the datastore root (no '/': any directory)
  std::string policy;
};

// The name of the built-in policy with no filters; always defined.
inline constexpr const char* kNoPolicy = "none";

struct DatastoreConfig {
  std::string file;
  std::string backing, mountpoint;
  std::vector<std::string> options;  // mount options
  std::optional<unsigned> threads;
  std::string log_level;
  std::vector<std::string> images = kDefaultImagePatterns;
  std::string default_policy = kNoPolicy;
  uint64_t congestion_latency_us = 30'000;
  std::string view = "native";  // datastore.view: how images whose policy names no view appear
  std::vector<PolicySpec> policies;
  std::vector<RuleSpec> rules;

  // The policy named `name` (kNoPolicy gives an empty one), or null.
  const PolicySpec* find_policy(const std::string& name) const;
  // Whether `relpath` is an image, by the image patterns.
  bool is_image(const std::string& relpath) const;
  // The policy name the rules give `relpath`: the first matching rule's, else the default.
  std::string policy_for(const std::string& relpath) const;
  // The view ("native" or "raw") of images under `policy`: the policy's, else the datastore's.
  std::string view_for(const std::string& policy) const;
  // Whether any image can have the raw view (when not, lookups skip the check).
  bool any_raw_view() const;
  // The settings filters read (filter.h).
  DatastoreSettings settings() const;
};

// Parses `text` (named `file` in messages). Returns "" on success.
std::string parse_config(const std::string& text, const std::string& file, const Registry& registry,
                         DatastoreConfig* out);
// Reads and parses a file.
std::string load_config(const std::string& file, const Registry& registry, DatastoreConfig* out);

// Whether `pattern` selects `relpath` (a pattern without '/' matches the file name anywhere).
bool glob_matches(const std::string& pattern, const std::string& relpath);

// The filters of `policy` in chain order, e.g. "throttle(iops=500) -> encrypt", or "(empty)".
std::string describe_policy(const PolicySpec& policy, const Registry& registry);

// Every key the parser accepts outside filter parameters, as "section.key" (for the man-page test).
std::vector<std::string> config_keys();

}  // namespace iofilterfs
