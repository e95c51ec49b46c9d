#include "control.h"

#include <spdlog/spdlog.h>

#include <cstdlib>
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
  else if (key == "dirty")
    *value = "{\"backing_bytes\":" + std::to_string(d ? d->dirty_bytes() : 0) + ",\"replica_bytes\":" +
             std::to_string(d ? d->replica_lag_bytes() : 0) + "}";
  else return Status::Error(ENODATA);
  return Status::Ok();
}

Status control_set(Datastore& ds, Inode& inode, std::string_view name, std::string_view value, const fuse_ctx* ctx) {
  std::string_view key = name.substr(kControlPrefix.size());
  const bool root = &inode == &ds.root();
  const std::string path = root ? "/" : ds.relpath(inode);
  const bool image_verb = key == "flush" || key == "fault" || key == "policy" || key == "quiesce" ||
                          key == "resume" || key == "snapshot";
  if (!image_verb && key != "reload") {
    spdlog::warn("{}: unknown control {}", path, name);
    return Status::Error(EINVAL, "unknown control name");
  }
  if (ctx->uid != 0) {
    spdlog::warn("{}: {} refused for uid {}", path, name, ctx->uid);
    return Status::Error(EPERM, "control verbs need root");
  }
  // reload belongs to the root; resume to an image or to the root (value: the image's path in
  // the mount) — while a write is held the kernel holds the image's inode lock, so a setxattr
  // on the image itself would wait behind that write until the quiesce timed out.
  const bool applies = root ? (key == "reload" || key == "resume") : (key != "reload" && ds.is_image(inode));
  if (!applies) {
    spdlog::warn("{}: {} is not a verb of this file", path, name);
    return Status::Error(ENOTSUP, "not an image");
  }
  const std::string arg = trim(value);

  if (root && key == "resume") {
    std::shared_ptr<Disk> d = ds.find_open_disk(arg);
    if (!d || !d->quiesced()) {
      spdlog::warn("/: resume of '{}', which is not a quiesced open image", arg);
      return Status::Error(EINVAL, "not quiesced");
    }
    Status s = d->resume();
    if (s.ok()) spdlog::info("{}: resumed", arg);
    return s;
  }
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
  if (key == "quiesce") {
    // The value is the timeout in seconds (default 60): a stuck tool cannot hang a guest.
    long secs = 60;
    if (!arg.empty() && arg != "yes") {
      char* end = nullptr;
      secs = std::strtol(arg.c_str(), &end, 10);
      if (*end || secs < 1 || secs > 86400) {
        spdlog::warn("{}: quiesce timeout '{}' is not a number of seconds from 1 to 86400", path, arg);
        return Status::Error(EINVAL, "bad quiesce timeout");
      }
    }
    if (!d) {
      spdlog::warn("{}: quiesce of an image that is not open", path);
      return Status::Error(EBADF, "image not open");
    }
    Status s = d->quiesce(std::chrono::seconds(secs));
    if (s.ok()) spdlog::info("{}: quiesced (writes held for up to {}s)", path, secs);
    else spdlog::warn("{}: quiesce failed: {}", path, s.what ? s.what : std::strerror(s.err));
    return s;
  }
  if (key == "resume") {
    if (!d || !d->quiesced()) {
      spdlog::warn("{}: resume of an image that is not quiesced", path);
      return Status::Error(EINVAL, "not quiesced");
    }
    Status s = d->resume();
    if (s.ok()) spdlog::info("{}: resumed", path);
    return s;
  }
  if (key == "snapshot") {
    if (arg.empty() || arg.find('/') != std::string::npos || arg.size() > 200) {
      spdlog::warn("{}: snapshot needs a name (no '/', at most 200 characters)", path);
      return Status::Error(EINVAL, "bad snapshot name");
    }
    if (!d) {
      spdlog::warn("{}: snapshot of an image that is not open", path);
      return Status::Error(EBADF, "image not open");
    }
    Status s = d->snapshot(arg);
    if (!s.ok()) spdlog::warn("{}: snapshot '{}' failed: {}", path, arg, s.what ? s.what : std::strerror(s.err));
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
