#include "chain.h"

#include <atomic>
#include <cstring>

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

// ---- background calls below a filter (filter.h, BelowGuard) ----------------------------------

Filter::BelowGuard Filter::below() {
  std::unique_lock<std::mutex> g(below_mu_);
  below_cv_.wait(g, [&] { return !below_held_ || below_retired_; });
  if (below_retired_) return BelowGuard(nullptr, nullptr);
  ++below_calls_;
  return BelowGuard(this, next_);
}

Filter::BelowGuard::~BelowGuard() {
  if (!f_) return;
  std::lock_guard<std::mutex> g(f_->below_mu_);
  if (--f_->below_calls_ == 0) f_->below_cv_.notify_all();
}

void Filter::hold_below() {
  std::unique_lock<std::mutex> g(below_mu_);
  below_held_ = true;
  below_cv_.wait(g, [&] { return below_calls_ == 0; });
}

void Filter::release_below(bool retired) {
  std::lock_guard<std::mutex> g(below_mu_);
  below_held_ = false;
  if (retired) below_retired_ = true;
  below_cv_.notify_all();
}

namespace {

// Identity of a configured filter: its name and its parameters in canonical YAML.
std::string spec_key(const FilterSpec& s) {
  YAML::Emitter e;
  e << YAML::Flow << s.params;
  return s.name + " " + e.c_str();
}

// The parameters back from a key (slots keep no YAML nodes: yaml-cpp's assignment would
// rewrite the policy's own node when a slot is reused).
YAML::Node key_params(const std::string& key) { return YAML::Load(key.substr(key.find(' ') + 1)); }

}  // namespace

std::vector<Filter*> ChainPlan::arriving() const {
  std::vector<Filter*> out;
  for (int c = kFilterClassCount - 1; c >= 0; --c)
    if (fresh_[c].filter) out.push_back(fresh_[c].filter.get());
  return out;
}

Status Chain::plan(const Registry& registry, const std::vector<FilterSpec>& specs, ChainPlan* out,
                   std::string* err) const {
  ChainPlan p;
  std::array<const FilterSpec*, kFilterClassCount> wanted{};
  std::array<const FilterInfo*, kFilterClassCount> infos{};
  for (const FilterSpec& s : specs) {
    const FilterInfo* info = registry.find(s.name);
    if (!info) {
      *err = "unknown filter '" + s.name + "'";
      return Status::Error(EINVAL);
    }
    const int c = static_cast<int>(info->cls);
    if (wanted[c]) {
      *err = "two filters of class " + std::string(to_string(info->cls)) + ": '" + wanted[c]->name + "' and '" +
             s.name + "'";
      return Status::Error(EINVAL);
    }
    if (info->validate) {
      YAML::Node where = s.params;
      std::string msg = info->validate(s.params, &where);
      if (!msg.empty()) {
        *err = s.name + ": " + msg;
        return Status::Error(EINVAL);
      }
    }
    wanted[c] = &s;
    infos[c] = info;
  }
  for (int c = 0; c < kFilterClassCount; ++c) {
    const Slot& cur = slots_[c];
    if (!wanted[c]) {
      if (cur.filter) p.changes_ = true;  // removed
      continue;
    }
    std::string key = spec_key(*wanted[c]);
    if (cur.filter && cur.key == key) {
      p.keep_[c] = true;  // unchanged: keeps its state
      continue;
    }
    std::unique_ptr<Filter> f = infos[c]->create(wanted[c]->params);
    if (!f) {
      *err = wanted[c]->name + ": could not be created";
      return Status::Error(EINVAL);
    }
    p.fresh_[c] = ChainPlan::Fresh{infos[c], std::move(f), std::move(key)};
    p.changes_ = true;
  }
  *out = std::move(p);
  return Status::Ok();
}

void Chain::retune(ChainPlan* plan) {
  for (int c = 0; c < kFilterClassCount; ++c) {
    Slot& s = slots_[c];
    ChainPlan::Fresh& f = plan->fresh_[c];
    if (!s.filter || !f.filter || s.info != f.info) continue;
    if (!s.filter->reconfigure(key_params(f.key))) continue;
    plan->retuned_[c] = ChainPlan::Retuned{true, s.key};
    s.key = std::move(f.key);
    f.filter.reset();  // the fresh instance was never opened: dropped
    f.info = nullptr;
    plan->keep_[c] = true;
  }
  plan->changes_ = false;
  for (int c = 0; c < kFilterClassCount; ++c)
    if (plan->fresh_[c].filter || (slots_[c].filter && !plan->keep_[c])) plan->changes_ = true;
}

void Chain::untune(ChainPlan* plan) {
  for (int c = 0; c < kFilterClassCount; ++c) {
    ChainPlan::Retuned& r = plan->retuned_[c];
    if (!r.done) continue;
    Slot& s = slots_[c];
    (void)s.filter->reconfigure(key_params(r.old_key));  // took the new ones, so takes these back
    s.key = std::move(r.old_key);
    r = ChainPlan::Retuned{};
  }
}

std::vector<Filter*> Chain::leaving(const ChainPlan& plan) const {
  std::vector<Filter*> out;
  for (int c = 0; c < kFilterClassCount; ++c)
    if (slots_[c].filter && !plan.keep_[c]) out.push_back(slots_[c].filter.get());
  return out;
}

std::vector<Filter*> Chain::removed_outright(const ChainPlan& plan) const {
  std::vector<Filter*> out;
  for (int c = 0; c < kFilterClassCount; ++c)
    if (slots_[c].filter && !plan.keep_[c] && !plan.fresh_[c].filter) out.push_back(slots_[c].filter.get());
  return out;
}

namespace {

Status open_one(Filter& f, const FilterInfo& fi, const DiskInfo& base, std::shared_ptr<const AtRest>* at,
                std::string* err) {
  DiskInfo info = base;
  info.at_rest = *at;
  Status s = f.open(info);
  if (!s.ok()) {
    *err = fi.name + ": " + (s.what ? s.what : std::strerror(s.err));
    return s;
  }
  if (auto a = f.at_rest()) *at = std::move(a);
  return s;
}

}  // namespace

Status Chain::open_arriving(const ChainPlan& plan, Layer* bottom, const DiskInfo& base, std::vector<Filter*>* opened,
                            std::string* err) const {
  std::shared_ptr<const AtRest> at = base.at_rest;
  Layer* below = bottom;  // the layer below the next slot up, in the chain the plan makes
  for (int c = kFilterClassCount - 1; c >= 0; --c) {
    if (plan.keep_[c] && slots_[c].filter) {
      if (auto a = slots_[c].filter->at_rest()) at = std::move(a);
      below = slots_[c].filter.get();
    } else if (plan.fresh_[c].filter) {
      Filter& f = *plan.fresh_[c].filter;
      f.set_next(below);  // its open() may read below (a size, a header); commit() links it the same way
      Status s = open_one(f, *plan.fresh_[c].info, base, &at, err);
      if (!s.ok()) return s;
      opened->push_back(&f);
      below = &f;
    }
  }
  return Status::Ok();
}

Status Chain::open_all(const DiskInfo& base, std::string* err) const {
  std::shared_ptr<const AtRest> at = base.at_rest;
  std::vector<Filter*> opened;
  for (int c = kFilterClassCount - 1; c >= 0; --c) {
    if (!slots_[c].filter) continue;
    Status s = open_one(*slots_[c].filter, *slots_[c].info, base, &at, err);
    if (!s.ok()) {
      for (auto it = opened.rbegin(); it != opened.rend(); ++it) (*it)->close();
      return s;
    }
    opened.push_back(slots_[c].filter.get());
  }
  return Status::Ok();
}

void Chain::commit(ChainPlan&& plan, Layer* bottom, std::vector<std::unique_ptr<Filter>>* removed) {
  // No request is inside the chain (the caller holds the plumbing lock exclusively); the
  // filters' own threads may be, so wait until none is below any filter before relinking. The
  // ones that stay go on afterwards; the leaving ones never call below again.
  // That includes the plan's fresh filters: open_arriving() linked and opened them, and a
  // call of theirs may be passing through a kept filter whose child is about to change.
  for (Slot& s : slots_)
    if (s.filter) s.filter->hold_below();
  for (auto& f : plan.fresh_)
    if (f.filter) f.filter->hold_below();
  const size_t first_removed = removed->size();
  count_ = 0;
  for (int c = 0; c < kFilterClassCount; ++c) {
    Slot& s = slots_[c];
    if (plan.keep_[c]) {
      ++count_;
      continue;
    }
    if (s.filter) removed->push_back(std::move(s.filter));
    s = Slot{};
    if (plan.fresh_[c].filter) {
      s.info = plan.fresh_[c].info;
      s.filter = std::move(plan.fresh_[c].filter);
      s.key = std::move(plan.fresh_[c].key);
      ++count_;
    }
  }
  // Relink bottom-up: each filter's child is the next occupied slot below it.
  Layer* below = bottom;
  for (int c = kFilterClassCount - 1; c >= 0; --c) {
    if (!slots_[c].filter) continue;
    slots_[c].filter->set_next(below);
    below = slots_[c].filter.get();
  }
  top_ = below;
  // Deferral reaches a filter only through filters that pass it (filter.h, "Deferring").
  bool above_pass = true;
  defers_ = false;
  for (int c = 0; c < kFilterClassCount; ++c) {
    if (!slots_[c].filter) continue;
    slots_[c].filter->set_may_defer(above_pass);
    above_pass = above_pass && slots_[c].info->passes_deferral;
    defers_ = defers_ || slots_[c].info->defers;
  }
  for (size_t i = first_removed; i < removed->size(); ++i) (*removed)[i]->release_below(true);
  for (Slot& s : slots_)
    if (s.filter) s.filter->release_below(false);  // the fresh ones too
}

Status Chain::build(const Registry& registry, const std::vector<FilterSpec>& specs, Layer* bottom, Chain* out,
                    std::string* err) {
  Chain c;
  ChainPlan plan;
  Status s = c.plan(registry, specs, &plan, err);
  if (!s.ok()) return s;
  std::vector<std::unique_ptr<Filter>> none;
  c.commit(std::move(plan), bottom, &none);
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

namespace {
std::atomic<uint64_t> g_congestion_latency_ns{DatastoreSettings{}.congestion_latency_ns};
}  // namespace

DatastoreSettings datastore_settings() {
  DatastoreSettings s;
  s.congestion_latency_ns = g_congestion_latency_ns.load(std::memory_order_relaxed);
  return s;
}

void set_datastore_settings(const DatastoreSettings& s) {
  g_congestion_latency_ns.store(s.congestion_latency_ns, std::memory_order_relaxed);
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
