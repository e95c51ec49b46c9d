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
  else if (key == "policy") *value = d ? d->policy() : "none";
  else if (key == "dirty") *value = std::to_string(d ? d->dirty_bytes() : 0);
  else return Status::Error(ENODATA);
  return Status::Ok();
}

Status control_set(Datastore& ds, Inode& inode, std::string_view name, std::string_view value, const fuse_ctx* ctx) {
  std::string_view key = name.substr(kControlPrefix.size());
  std::string path = &inode == &ds.root() ? "/" : ds.relpath(inode);
  const bool known = key == "flush" || key == "fault";
  if (!known) {
    spdlog::warn("{}: unknown control {}", path, name);
    return Status::Error(EINVAL, "unknown control name");
  }
  if (ctx->uid != 0) {
    spdlog::warn("{}: {} refused for uid {}", path, name, ctx->uid);
    return Status::Error(EPERM, "control verbs need root");
  }
  if (&inode == &ds.root() || !ds.is_image(inode)) {
    spdlog::warn("{}: {} on a file that is not an image", path, name);
    return Status::Error(ENOTSUP, "not an image");
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
