// The checks every filter makes the same way on its `params:` mapping, so that each filter's
// own parser (filters/*/params.cc) holds only what its keys mean.
//
//     if (std::string e = require_mapping(params, where); !e.empty()) return e;
//     return walk_params(params, my_keys(), where, [&](size_t i, const YAML::Node& key, const YAML::Node& value) {
//       ...   // value is a present, single scalar; return "" or the message (blaming as it likes)
//     });
//
// Messages (the unit tests of every filter hold them):
//   parameters must be a mapping, not 'x' | not a list
//   a key must be a plain name, not a mapping
//   unknown key 'x' (did you mean 'y'?)  |  unknown key 'x' (known keys: a, b, c)
//   duplicate key 'x' (first on line N)
//   'x' has no value
//   'x' must be a single value, not a list        (the noun is the filter's to choose)
// *where is pointed (reset(), never assigned) at the node to blame.
#pragma once

#include <yaml-cpp/yaml.h>

#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace iofilterfs {

// 'x'
std::string quoted(std::string_view s);
// Points *where at n (when where is given). reset(), not operator=: assigning one yaml-cpp
// node to another rewrites the node it refers to, i.e. the policy document.
void blame(YAML::Node* where, const YAML::Node& n);
// "a mapping", "a list" or "a value".
const char* type_noun(const YAML::Node& n);

// "" when params is a mapping, else the message (params blamed). Absent or null params are
// the filter's to judge first (each says which keys it needs).
std::string require_mapping(const YAML::Node& params, YAML::Node* where);

struct WalkOptions {
  // The message for a key not in `keys`; default: "unknown key 'x'" and a did-you-mean hint,
  // or the list of known keys when no name is close.
  std::function<std::string(const std::string& name)> unknown;
  // What the value of key i must be, for "'x' must be NOUN, not a list"; default "a single value".
  std::function<std::string(size_t index)> value_noun;
};

// Walks a mapping's keys in file order: each must be a plain name, one of `keys`, not repeated,
// with a value that is a single scalar; then visit(index in keys, key node, value node) judges
// the value. Returns "" or the first message.
std::string walk_params(const YAML::Node& params, const std::vector<std::string>& keys, YAML::Node* where,
                        const std::function<std::string(size_t index, const YAML::Node& key, const YAML::Node& value)>& visit,
                        const WalkOptions& options = {});

}  // namespace iofilterfs
