#include "chain.h"

namespace iofilterfs {

const char* to_string(FilterClass c) {
  switch (c) {
    case FilterClass::Replicate: return "replicate";
    case FilterClass::Cache: return "cache";
    case FilterClass::Throttle: return "throttle";
    case FilterClass::Encrypt: return "encrypt";
  }
  return "unknown";
}

Status Chain::build(const Registry& registry, const std::vector<FilterSpec>& specs, Layer* bottom,
                    Chain* out, std::string* err) {
  Chain c;
  for (const FilterSpec& s : specs) {
    const FilterInfo* info = registry.find(s.name);
    if (!info) {
      *err = "unknown filter '" + s.name + "'";
      return Status::Error(EINVAL);
    }
    Slot& slot = c.slots_[static_cast<int>(info->cls)];
    if (slot.filter) {
      *err = "two filters of class " + std::string(to_string(info->cls)) + ": '" + slot.info->name +
             "' and '" + s.name + "'";
      return Status::Error(EINVAL);
    }
    if (info->validate) {
      std::string msg = info->validate(s.params);
      if (!msg.empty()) {
        *err = s.name + ": " + msg;
        return Status::Error(EINVAL);
      }
    }
    std::unique_ptr<Filter> f = info->create(s.params);
    if (!f) {
      *err = s.name + ": could not be created";
      return Status::Error(EINVAL);
    }
    slot.info = info;
    slot.filter = std::move(f);
    ++c.count_;
  }
  // Link bottom-up: each filter's child is the next occupied slot below it.
  Layer* below = bottom;
  for (int i = kFilterClassCount - 1; i >= 0; --i) {
    if (!c.slots_[i].filter) continue;
    c.slots_[i].filter->set_next(below);
    below = c.slots_[i].filter.get();
  }
  c.top_ = below;
  *out = std::move(c);
  return Status::Ok();
}

std::string Chain::describe() const {
  std::string s;
  for_each([&](const Filter& f, const FilterInfo& info) {
    if (!s.empty()) s += " -> ";
    s += info.name;
    std::string d = f.describe();
    if (!d.empty()) s += "(" + d + ")";
  });
  return s.empty() ? "(empty)" : s;
}

bool Registry::add(FilterInfo info) {
  if (info.api_version != kFilterApiVersion || !info.create || find(info.name)) return false;
  filters_.push_back(std::move(info));
  return true;
}

const FilterInfo* Registry::find(std::string_view name) const {
  for (const FilterInfo& f : filters_)
    if (f.name == name) return &f;
  return nullptr;
}

Registry& Registry::instance() {
  static Registry* r = [] {
    auto* reg = new Registry();
    register_builtin_filters(*reg);
    return reg;
  }();
  return *r;
}

}  // namespace iofilterfs
