#include "control.h"

#include <spdlog/spdlog.h>

#include <cstring>

#include "json.h"
#include "version.h"

namespace iofilterfs {
namespace {

std::shared_ptr<Disk> open_disk_of(Inode& i) {
  std::lock_guard<std::mutex> g(i.m);
  return i.disk;
}

std::string filters_json() {
  std::string s = "[";
  for (const FilterInfo& f : Registry::instance().all()) {
    if (s.size() > 1) s += ",";
    s += "{\"name\":" + json_str(f.name) + ",\"class\":" + json_str(to_string(f.cls)) +
         ",\"version\":" + std::to_string(f.api_version) + ",\"description\":" + json_str(f.description) + "}";
  }
  return s + "]";
}

std::string trim(std::string_view v) {
  while (!v.empty() && (v.back() == '\n' || v.back() == ' ' || v.back() == '\0' || v.back() == '\t')) v.remove_suffix(1);
  while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
  return std::string(v);
}

constexpr const char* kImageReadNames[] = {"stats", "state", "chain", "policy", "dirty"};
constexpr const char* kRootReadNames[] = {"status", "filters", "version"};

}  // namespace

Status control_get(Datastore& ds, Inode& inode, std::string_view name, std::string* value) {
  std::string_view key = name.substr(kControlPrefix.size());
  if (&inode == &ds.root()) {
    if (key == "status") *value = ds.status_json();
    else if (key == "filters") *value = filters_json();
    else if (key == "version") *value = kVersion;
    else return Status::Error(ENODATA);
    return Status::Ok();
  }
  if (!ds.is_image(inode)) return Status::Error(ENODATA);
  std::shared_ptr<Disk> d = open_disk_of(inode);
  if (key == "stats") *value = d ? d->stats_json() : "{\"path\":" + json_str(ds.relpath(inode)) + ",\"open\":false}";
  else if (key == "state") *value = d ? d->state() : "closed";
  else if (key == "chain") *value = d ? d->chain_description() : "(not open)";
  else if (key == "policy") *value = d ? d->policy() : ds.policy_of(inode);
  else if (key == "dirty") *value = std::to_string(d ? d->dirty_bytes() : 0);
  else return Status::Error(ENODATA);
  return Status::Ok();
}

Status control_set(Datastore& ds, Inode& inode, std::string_view name, std::string_view value, const fuse_ctx* ctx) {
  std::string_view key = name.substr(kControlPrefix.size());
  const bool root = &inode == &ds.root();
  const std::string path = root ? "/" : ds.relpath(inode);
  const bool image_verb = key == "flush" || key == "fault" || key == "policy";
  const bool root_verb = key == "reload";
  if (!image_verb && !root_verb) {
    spdlog::warn("{}: unknown control {}", path, name);
    return Status::Error(EINVAL, "unknown control name");
  }
  if (ctx->uid != 0) {
    spdlog::warn("{}: {} refused for uid {}", path, name, ctx->uid);
    return Status::Error(EPERM, "control verbs need root");
  }
  if (root_verb != root || (image_verb && !ds.is_image(inode))) {
    spdlog::warn("{}: {} is not a verb of this file", path, name);
    return Status::Error(ENOTSUP, "not an image");
  }
  const std::string arg = trim(value);

  if (key == "reload") {
    std::string err;
    Status s = ds.reload(&err);
    return s;  // reload logs its own outcome
  }
  if (key == "policy") {
    if (arg.empty()) {
      spdlog::warn("{}: {} needs a policy name", path, name);
      return Status::Error(EINVAL, "empty policy name");
    }
    std::string err;
    Status s = ds.set_policy(inode, arg, &err);
    if (s.ok()) spdlog::info("{}: policy {} assigned", path, arg);
    else spdlog::warn("{}: policy {} refused: {}", path, arg, err);
    return s;
  }
  std::shared_ptr<Disk> d = open_disk_of(inode);
  if (key == "flush") {
    if (!d) return Status::Ok();  // nothing is held for a closed image
    Status s = d->flush();
    if (!s.ok()) spdlog::error("{}: flush failed: {}", path, std::strerror(s.err));
    return s;
  }
  // fault
  FaultPlan plan;
  std::string err = parse_fault_plan(value, &plan);
  if (!err.empty()) {
    spdlog::warn("{}: bad fault plan: {}", path, err);
    return Status::Error(EINVAL, "bad fault plan");
  }
  if (!d) {
    spdlog::warn("{}: fault plan for an image that is not open", path);
    return Status::Error(EBADF, "image not open");
  }
  Status s = d->apply_fault_plan(plan);
  if (s.ok()) spdlog::info("{}: fault plan applied: {}", path, std::string(value));
  else spdlog::warn("{}: fault plan refused: {}", path, s.what ? s.what : std::strerror(s.err));
  return s;
}

Status control_remove(Datastore& ds, Inode& inode, std::string_view name, const fuse_ctx* ctx) {
  if (name.substr(kControlPrefix.size()) != "policy") return Status::Error(EPERM, "control names are not stored");
  const std::string path = ds.relpath(inode);
  if (ctx->uid != 0) {
    spdlog::warn("{}: removing {} refused for uid {}", path, name, ctx->uid);
    return Status::Error(EPERM);
  }
  if (&inode == &ds.root() || !ds.is_image(inode)) return Status::Error(ENOTSUP);
  std::string err;
  Status s = ds.set_policy(inode, "", &err);
  if (s.ok()) spdlog::info("{}: policy assignment removed; the rules apply", path);
  else spdlog::warn("{}: removing the policy assignment failed: {}", path, err);
  return s;
}

std::string control_list(Datastore& ds, Inode& inode) {
  std::string out;
  auto add = [&](const char* n) {
    out += kControlPrefix;
    out += n;
    out += '\0';
  };
  if (&inode == &ds.root()) {
    for (const char* n : kRootReadNames) add(n);
  } else if (ds.is_image(inode)) {
    for (const char* n : kImageReadNames) add(n);
  }
  return out;
}

}  // namespace iofilterfs
