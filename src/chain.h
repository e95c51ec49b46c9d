// Chain: a disk's filters, stacked in class order above a bottom layer.
//
// The order is the framework's, never the policy's: filters are kept in one slot per class,
// and the stack is read off the slots from replicate down to encrypt. A policy that names two
// filters of one class is refused before anything is instantiated.
//
// Re-plumbing (a policy change or reload) is prepare / commit / abort, as QEMU's reopen:
//   plan()    instantiates the filters that are new or whose parameters changed and marks the
//             unchanged ones to be kept (with their state); nothing running is touched, and
//             dropping the plan is the abort;
//   retune()  offers each filter whose parameters changed (same filter, new parameters) the
//             new ones in place (Filter::reconfigure), while requests keep flowing; one that
//             takes them stays, with its state and the requests it holds, and the plan keeps it
//             instead of its fresh replacement. untune() gives them back their old parameters
//             (the abort of a plan that retune() left with other changes, which then failed);
//   leaving() lists the filters the plan removes — the disk drains them before committing;
//   commit()  swaps the slots and relinks every filter's child (and each filter's
//             may_defer(): true when every filter above it passes deferral); the caller holds
//             the disk's plumbing lock exclusively, so no request is inside the chain meanwhile,
//             and commit() itself waits until no filter's own thread is below a filter (see
//             Filter::below()), fresh ones included (open_arriving() links each fresh filter
//             to the layer planned below it before opening it, so its open() and its threads
//             may already call below); a removed filter's threads find nothing below from then
//             on; whoever drops a plan with opened fresh filters retires them
//             (release_below(true)) before closing them.
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

class Chain;

class ChainPlan {
 public:
  // Fresh filters, bottom first (the order to open them in).
  std::vector<Filter*> arriving() const;
  bool changes() const { return changes_; }

 private:
  friend class Chain;
  struct Fresh {
    const FilterInfo* info = nullptr;
    std::unique_ptr<Filter> filter;
    std::string key;
  };
  struct Retuned {
    bool done = false;
    std::string old_key;
  };
  std::array<Fresh, kFilterClassCount> fresh_{};
  std::array<bool, kFilterClassCount> keep_{};
  std::array<Retuned, kFilterClassCount> retuned_{};
  bool changes_ = false;
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

  // Prepares a change to `specs` (see above). On error nothing is changed.
  Status plan(const Registry& registry, const std::vector<FilterSpec>& specs, ChainPlan* out, std::string* err) const;
  // Offers the filters the plan would replace by a filter of the same name their new
  // parameters in place (see above); afterwards the plan's changes() says whether anything is
  // left to commit. Needs the disk's control lock only.
  void retune(ChainPlan* plan);
  // Undoes retune(): the retuned filters get their old parameters back.
  void untune(ChainPlan* plan);
  // Filters the plan removes or replaces, top first (the order to drain them in).
  std::vector<Filter*> leaving(const ChainPlan& plan) const;
  // Filters the plan removes without a successor of their class, top first.
  std::vector<Filter*> removed_outright(const ChainPlan& plan) const;
  // Opens the plan's fresh filters bottom first, each already linked to the layer that will be
  // below it in the chain the plan makes (`bottom` under the lowest), so that its open() may
  // read below, and told (DiskInfo::at_rest) of the at-rest protection the nearest filter below
  // it offers there. The caller holds the plumbing lock exclusively. The ones opened are
  // appended to *opened (for the caller's undo); on failure *err names the filter.
  Status open_arriving(const ChainPlan& plan, Layer* bottom, const DiskInfo& base, std::vector<Filter*>* opened,
                       std::string* err) const;
  // Opens every filter bottom first, with the same at-rest propagation; closes the opened ones
  // again when one fails.
  Status open_all(const DiskInfo& base, std::string* err) const;
  // Applies the plan above `bottom`; the filters it removes are moved to *removed.
  void commit(ChainPlan&& plan, Layer* bottom, std::vector<std::unique_ptr<Filter>>* removed);

  // The layer requests enter: the first filter, or the bottom when the chain is empty.
  Layer* top() const { return top_; }
  // A filter of the chain declares FilterInfo::defers: requests are offered a Deferrer.
  bool defers() const { return defers_; }
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
    std::string key;  // name and parameters, to tell an unchanged filter
  };
  std::array<Slot, kFilterClassCount> slots_{};
  Layer* top_ = nullptr;
  bool defers_ = false;
  size_t count_ = 0;
};

}  // namespace iofilterfs
