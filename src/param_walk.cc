#include "param_walk.h"

#include "suggest.h"

namespace iofilterfs {

std::string quoted(std::string_view s) { return "'" + std::string(s) + "'"; }

void blame(YAML::Node* where, const YAML::Node& n) {
  if (where) where->reset(n);
}

const char* type_noun(const YAML::Node& n) {
  if (n.IsMap()) return "a mapping";
  if (n.IsSequence()) return "a list";
  return "a value";
}

std::string require_mapping(const YAML::Node& params, YAML::Node* where) {
  if (params.IsMap()) return "";
  blame(where, params);
  if (params.IsScalar()) return "parameters must be a mapping, not " + quoted(params.Scalar());
  return std::string("parameters must be a mapping, not ") + type_noun(params);
}

std::string walk_params(const YAML::Node& params, const std::vector<std::string>& keys, YAML::Node* where,
                        const std::function<std::string(size_t, const YAML::Node&, const YAML::Node&)>& visit,
                        const WalkOptions& options) {
  std::vector<YAML::Node> first(keys.size());  // the key node where each name first appeared
  std::vector<bool> seen(keys.size(), false);
  for (auto it = params.begin(); it != params.end(); ++it) {
    const YAML::Node key = it->first, value = it->second;
    if (!key.IsScalar()) {
      blame(where, key);
      return std::string("a key must be a plain name, not ") + type_noun(key);
    }
    const std::string& name = key.Scalar();
    size_t i = 0;
    while (i < keys.size() && keys[i] != name) ++i;
    if (i == keys.size()) {
      blame(where, key);
      if (options.unknown) return options.unknown(name);
      std::string hint = did_you_mean(name, keys);
      if (hint.empty()) {
        hint = " (known keys: ";
        for (size_t k = 0; k < keys.size(); ++k) hint += (k ? ", " : "") + keys[k];
        hint += ")";
      }
      return "unknown key " + quoted(name) + hint;
    }
    if (seen[i]) {
      blame(where, key);
      return "duplicate key " + quoted(name) + " (first on line " + std::to_string(first[i].Mark().line + 1) + ")";
    }
    seen[i] = true;
    first[i].reset(key);
    if (!value.IsDefined() || value.IsNull()) {
      blame(where, key);
      return quoted(name) + " has no value";
    }
    if (!value.IsScalar()) {
      blame(where, value);
      return quoted(name) + " must be " + (options.value_noun ? options.value_noun(i) : std::string("a single value")) +
             ", not " + type_noun(value);
    }
    std::string e = visit(i, key, value);
    if (!e.empty()) return e;
  }
  return "";
}

}  // namespace iofilterfs
