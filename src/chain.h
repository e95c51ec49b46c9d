// Chain: a disk's filters, stacked in class order above a bottom layer.
//
// The order is the framework's, never the policy's: filters are kept in one slot per class,
// and the stack is read off the slots from replicate down to encrypt. A policy that names two
// filters of one class is refused before anything is instantiated.
#pragma once

#include <array>
#include <memory>
#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "filter.h"

namespace iofilterfs {

struct FilterSpec {
  std::string name;
  YAML::Node params;
};

class Chain {
 public:
  Chain() = default;
  Chain(Chain&&) = default;
  Chain& operator=(Chain&&) = default;

  // Instantiates `specs` from `registry` and links them, in class order, above `bottom`.
  // On error nothing is kept and *err says which spec was wrong.
  static Status build(const Registry& registry, const std::vector<FilterSpec>& specs, Layer* bottom,
                      Chain* out, std::string* err);

  // The layer requests enter: the first filter, or the bottom when the chain is empty.
  Layer* top() const { return top_; }
  bool empty() const { return count_ == 0; }
  size_t size() const { return count_; }

  // Filters from the guest side down.
  template <typename F>
  void for_each(F&& f) const {
    for (int c = 0; c < kFilterClassCount; ++c)
      if (slots_[c].filter) f(*slots_[c].filter, *slots_[c].info);
  }
  template <typename F>
  void for_each_bottom_up(F&& f) const {
    for (int c = kFilterClassCount - 1; c >= 0; --c)
      if (slots_[c].filter) f(*slots_[c].filter, *slots_[c].info);
  }

  // "replicate(...) -> cache(...)" for the chain xattr and check-config.
  std::string describe() const;

 private:
  struct Slot {
    const FilterInfo* info = nullptr;
    std::unique_ptr<Filter> filter;
  };
  std::array<Slot, kFilterClassCount> slots_{};
  Layer* top_ = nullptr;
  size_t count_ = 0;
};

}  // namespace iofilterfs
