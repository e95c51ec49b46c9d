#include "datastore.h"

#include <fcntl.h>
#include <sys/xattr.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstring>

#include "json.h"
#include "units.h"

namespace iofilterfs {

Datastore::Datastore(MountOptions opt, std::shared_ptr<const DatastoreConfig> config)
    : opt_(std::move(opt)), config_(std::move(config)) {
  set_datastore_settings(config_->settings());
}

Datastore::~Datastore() {
  shutdown();
  for (auto& [key, inode] : inodes_)
    if (inode->fd >= 0) ::close(inode->fd);
  if (root_.fd >= 0) ::close(root_.fd);
}

bool Datastore::init(std::string* err) {
  root_.fd = ::open(opt_.backing.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root_.fd < 0) {
    *err = opt_.backing + ": " + std::strerror(errno);
    return false;
  }
  struct stat st {};
  if (fstat(root_.fd, &st) != 0) {
    *err = opt_.backing + ": " + std::strerror(errno);
    return false;
  }
  root_.dev = st.st_dev;
  root_.ino = st.st_ino;
  root_.type = S_IFDIR;
  root_.nlookup = 2;  // never forgotten
  return true;
}

int Datastore::lookup(Inode& parent, const char* name, fuse_entry_param* e) {
  std::memset(e, 0, sizeof *e);
  e->attr_timeout = 1.0;
  e->entry_timeout = 1.0;
  int fd = ::openat(parent.fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  // NAME.raw that is not a file of its own: the raw view of NAME, when NAME has it.
  bool raw_name = false;
  const size_t nlen = std::strlen(name), slen = std::strlen(kRawSuffix);
  if (fd < 0 && errno == ENOENT && nlen > slen && std::strcmp(name + nlen - slen, kRawSuffix) == 0) {
    const std::string base(name, nlen - slen);
    fd = ::openat(parent.fd, base.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return ENOENT;
    raw_name = true;
  }
  if (fd < 0) return errno;
  if (fstatat(fd, "", &e->attr, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) {
    int err = errno;
    ::close(fd);
    return err;
  }
  // Exactly one name per image: NAME.raw in the raw view, NAME otherwise.
  if (raw_name || S_ISREG(e->attr.st_mode)) {
    const bool raw = S_ISREG(e->attr.st_mode) && raw_view_fd(fd);
    if (raw != raw_name) {
      ::close(fd);
      return ENOENT;
    }
  }
  Inode* inode;
  {
    std::lock_guard<std::mutex> g(inodes_mu_);
    auto key = std::make_pair(e->attr.st_ino, e->attr.st_dev);
    if (key == std::make_pair(root_.ino, root_.dev)) {
      inode = &root_;  // ".." of a top-level directory, or a bind loop
    } else {
      auto it = inodes_.find(key);
      if (it == inodes_.end()) {
        auto n = std::make_unique<Inode>();
        n->fd = fd;
        fd = -1;
        n->dev = e->attr.st_dev;
        n->ino = e->attr.st_ino;
        n->type = e->attr.st_mode & S_IFMT;
        it = inodes_.emplace(key, std::move(n)).first;
      }
      inode = it->second.get();
    }
    ++inode->nlookup;
  }
  if (fd >= 0) ::close(fd);
  e->ino = ino_of(*inode);
  // An open image reports the size its chain presents.
  if (inode->type == S_IFREG) stat(*inode, &e->attr);
  return 0;
}

void Datastore::forget(Inode& i, uint64_t n) {
  if (&i == &root_) return;
  std::lock_guard<std::mutex> g(inodes_mu_);
  i.nlookup = n >= i.nlookup ? 0 : i.nlookup - n;
  if (i.nlookup == 0) {
    ::close(i.fd);
    inodes_.erase(std::make_pair(i.ino, i.dev));  // frees i
  }
}

std::string Datastore::relpath(const Inode& i) const {
  if (&i == &root_) return "";
  char link[64];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", i.fd);
  char buf[PATH_MAX + 1];
  ssize_t n = ::readlink(link, buf, PATH_MAX);
  if (n <= 0) return "";
  std::string p(buf, static_cast<size_t>(n));
  const std::string& root = opt_.backing;
  if (p.size() > root.size() && p.compare(0, root.size(), root) == 0 && p[root.size()] == '/')
    return p.substr(root.size() + 1);
  return "";
}

bool Datastore::is_image(const Inode& i) const {
  if (i.type != S_IFREG) return false;
  std::string rel = relpath(i);
  return !rel.empty() && config()->is_image(rel);
}

std::shared_ptr<const DatastoreConfig> Datastore::config() const {
  std::lock_guard<std::mutex> g(config_mu_);
  return config_;
}

namespace {

// The override stored on the backing file, or "".
std::string read_override(int path_fd) {
  char buf[256];
  std::string link = "/proc/self/fd/" + std::to_string(path_fd);
  ssize_t n = ::getxattr(link.c_str(), Datastore::kPolicyXattr, buf, sizeof buf);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

}  // namespace

std::string Datastore::policy_of(const Inode& i) const { return policy_for_fd(i.fd, relpath(i)); }

std::string Datastore::policy_for_fd(int fd, const std::string& rel) const {
  auto cfg = config();
  std::string o = read_override(fd);
  // An override naming a policy the file no longer defines falls back to the rules.
  if (!o.empty() && cfg->find_policy(o)) return o;
  if (!o.empty()) spdlog::warn("{}: assigned policy '{}' is not defined; using the rules", rel, o);
  return cfg->policy_for(rel);
}

namespace {

std::string relpath_of_fd(int fd, const std::string& root) {
  char link[64];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  char buf[PATH_MAX + 1];
  ssize_t n = ::readlink(link, buf, PATH_MAX);
  if (n <= 0) return "";
  std::string p(buf, static_cast<size_t>(n));
  if (p.size() > root.size() && p.compare(0, root.size(), root) == 0 && p[root.size()] == '/')
    return p.substr(root.size() + 1);
  return "";
}

}  // namespace

bool Datastore::raw_view_fd(int fd) const {
  auto cfg = config();
  if (!cfg->any_raw_view()) return false;
  const std::string rel = relpath_of_fd(fd, opt_.backing);
  if (rel.empty() || !cfg->is_image(rel)) return false;
  if (cfg->view_for(policy_for_fd(fd, rel)) != "raw") return false;
  // By content, as image.h detects formats: qcow2 and VMDK (a sparse extent or a descriptor).
  int rfd = ::open(("/proc/self/fd/" + std::to_string(fd)).c_str(), O_RDONLY | O_CLOEXEC | O_NOATIME);
  if (rfd < 0) rfd = ::open(("/proc/self/fd/" + std::to_string(fd)).c_str(), O_RDONLY | O_CLOEXEC);
  if (rfd < 0) return false;
  char m[21] = {};
  ssize_t n = ::pread(rfd, m, sizeof m, 0);
  ::close(rfd);
  return n >= 4 && (std::memcmp(m, "QFI\xfb", 4) == 0 || std::memcmp(m, "KDMV", 4) == 0 ||
                    (n == sizeof m && std::memcmp(m, "# Disk DescriptorFile", sizeof m) == 0));
}

std::string Datastore::display_name(Inode& dir, const char* name) const {
  if (!config()->any_raw_view() || std::strcmp(name, ".") == 0 || std::strcmp(name, "..") == 0) return name;
  int fd = ::openat(dir.fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return name;
  struct stat st {};
  bool raw = fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) && raw_view_fd(fd);
  ::close(fd);
  return raw ? std::string(name) + kRawSuffix : std::string(name);
}

std::vector<FilterSpec> Datastore::filters_of(const Inode& i) const {
  auto cfg = config();
  const PolicySpec* p = cfg->find_policy(policy_of(i));
  return p ? p->filters : std::vector<FilterSpec>{};
}

Status Datastore::attach_disk(Inode& i, bool writable, bool direct, std::shared_ptr<Disk>* out, std::string* err) {
  std::unique_lock<std::mutex> g(i.m);
  i.closed_cv.wait(g, [&] { return !i.closing; });
  bool created = false;
  if (!i.disk) {
    DiskOptions dopt;
    dopt.read_only = opt_.read_only;
    dopt.fault_injection = opt_.fault_injection;
    auto cfg = config();
    dopt.policy = policy_of(i);
    dopt.filters = cfg->find_policy(dopt.policy)->filters;
    if (raw_view(i)) {
      dopt.raw_view = true;
      dopt.image_path = opt_.backing + "/" + relpath(i);
      dopt.backing_root = opt_.backing;
    }
    Status s = Disk::open(i.fd, relpath(i), dopt, &i.disk, err);
    if (!s.ok()) return s;
    created = true;
  }
  Status s = i.disk->attach(writable, direct);
  if (!s.ok()) {
    *err = s.what ? s.what : std::strerror(s.err);
    if (created) {
      (void)i.disk->close();
      i.disk.reset();
    }
    return s;
  }
  if (created)
    spdlog::info("{}: opened ({}{} {}, policy {}, chain {})", i.disk->relpath(),
                 i.disk->raw_view() ? "raw view of " : "", i.disk->image().format,
                 format_size(i.disk->image().virtual_size), i.disk->policy(), i.disk->chain_description());
  *out = i.disk;
  return Status::Ok();
}

void Datastore::detach_disk(Inode& i) {
  std::shared_ptr<Disk> last;
  {
    std::lock_guard<std::mutex> g(i.m);
    if (!i.disk || !i.disk->detach()) return;
    last = std::move(i.disk);
    i.closing = true;
  }
  Status s = last->close();
  if (!s.ok()) spdlog::error("{}: closed with undrained data: {}", last->relpath(), std::strerror(s.err));
  else spdlog::info("{}: closed", last->relpath());
  last.reset();  // the backing file (and its lock) is released here
  {  // only now may a new open of the image proceed: it would meet the old lock
    std::lock_guard<std::mutex> g(i.m);
    i.closing = false;
  }
  i.closed_cv.notify_all();
}

std::shared_ptr<Disk> Datastore::find_open_disk(const std::string& relpath) {
  std::string want = relpath;
  while (!want.empty() && want.front() == '/') want.erase(0, 1);
  for (auto& d : open_disks())
    if (d->relpath() == want) return d;
  return nullptr;
}

std::vector<std::shared_ptr<Disk>> Datastore::open_disks() {
  std::vector<std::shared_ptr<Disk>> out;
  std::lock_guard<std::mutex> g(inodes_mu_);
  for (auto& [key, inode] : inodes_) {
    std::lock_guard<std::mutex> gi(inode->m);
    if (inode->disk) out.push_back(inode->disk);
  }
  return out;
}

std::string Datastore::status_json() {
  std::string s = "{\"backing\":" + json_str(opt_.backing) + ",\"mountpoint\":" + json_str(opt_.mountpoint) +
                  ",\"read_only\":" + (opt_.read_only ? "true" : "false");
  {
    std::lock_guard<std::mutex> g(config_mu_);
    s += ",\"config\":" + json_str(config_->file) + ",\"reloads\":" + std::to_string(reloads_) +
         ",\"config_error\":" + (reload_error_.empty() ? "null" : json_str(reload_error_));
  }
  s += ",\"disks\":[";
  bool first = true;
  for (const auto& d : open_disks()) {
    if (!first) s += ",";
    first = false;
    s += "{\"path\":" + json_str(d->relpath()) + ",\"policy\":" + json_str(d->policy()) +
         ",\"state\":" + json_str(d->state()) + ",\"format\":" + json_str(d->image().format) +
         ",\"virtual_size\":" + std::to_string(d->image().virtual_size) +
         ",\"dirty_bytes\":" + std::to_string(d->dirty_bytes()) + "}";
  }
  return s + "]}";
}

Status Datastore::reload(std::string* err) {
  std::lock_guard<std::mutex> serial(reload_mu_);
  if (opt_.config.empty()) {
    *err = "no policy file (start with --config)";
    return Status::Error(EINVAL);
  }
  auto next = std::make_shared<DatastoreConfig>();
  std::string e = load_config(opt_.config, Registry::instance(), next.get());
  if (!e.empty()) {
    spdlog::error("reload refused, the old policies stay in force: {}", e);
    std::lock_guard<std::mutex> g(config_mu_);
    reload_error_ = e;
    *err = e;
    return Status::Error(EINVAL);
  }
  {
    std::lock_guard<std::mutex> g(config_mu_);
    config_ = next;
    reload_error_.clear();
    ++reloads_;
  }
  set_datastore_settings(next->settings());  // before the disks are re-plumbed
  // Re-plumb every open disk; collect them under the table lock (an inode with an open disk
  // cannot be forgotten, but one could close meanwhile, so keep only the Disk and its policy).
  struct Job {
    std::shared_ptr<Disk> disk;
    std::string policy;
  };
  std::vector<Job> jobs;
  {
    std::lock_guard<std::mutex> g(inodes_mu_);
    for (auto& [key, inode] : inodes_) {
      std::shared_ptr<Disk> d;
      {
        std::lock_guard<std::mutex> gi(inode->m);
        d = inode->disk;
      }
      if (d) jobs.push_back({d, policy_of(*inode)});
    }
  }
  int failed = 0;
  for (auto& j : jobs) {
    std::string perr;
    Status s = j.disk->replumb(j.policy, next->find_policy(j.policy)->filters, Registry::instance(), &perr);
    if (!s.ok()) {
      ++failed;
      spdlog::error("{}: keeps its old chain, re-plumbing to policy {} failed: {}", j.disk->relpath(), j.policy, perr);
    }
  }
  spdlog::info("reloaded {}: {} policies, {} rules, {} open disks re-plumbed{}", opt_.config, next->policies.size(),
               next->rules.size(), jobs.size() - failed, failed ? fmt::format(", {} failed", failed) : "");
  if (failed) {
    *err = std::to_string(failed) + " disks could not be re-plumbed (see the log)";
    return Status::Error(EIO);
  }
  return Status::Ok();
}

Status Datastore::set_policy(Inode& i, const std::string& name, std::string* err) {
  std::lock_guard<std::mutex> serial(reload_mu_);
  auto cfg = config();
  if (!name.empty() && !cfg->find_policy(name)) {
    *err = "unknown policy '" + name + "'";
    return Status::Error(EINVAL);
  }
  const std::string link = "/proc/self/fd/" + std::to_string(i.fd);
  const std::string previous = read_override(i.fd);
  int r = name.empty() ? ::removexattr(link.c_str(), kPolicyXattr)
                       : ::setxattr(link.c_str(), kPolicyXattr, name.data(), name.size(), 0);
  if (r != 0 && !(name.empty() && errno == ENODATA)) {
    *err = std::string("cannot store the assignment on the backing file: ") + std::strerror(errno);
    return Status::Error(errno);
  }
  std::shared_ptr<Disk> d;
  {
    std::lock_guard<std::mutex> g(i.m);
    d = i.disk;
  }
  if (!d) return Status::Ok();
  const std::string policy = policy_of(i);
  Status s = d->replumb(policy, cfg->find_policy(policy)->filters, Registry::instance(), err);
  if (!s.ok()) {
    // Put the old assignment back so what is stored matches what runs.
    if (previous.empty()) ::removexattr(link.c_str(), kPolicyXattr);
    else ::setxattr(link.c_str(), kPolicyXattr, previous.data(), previous.size(), 0);
  }
  return s;
}

void Datastore::shutdown() {
  for (const auto& d : open_disks()) {
    Status s = d->close();
    if (!s.ok()) spdlog::error("{}: shutdown with undrained data: {}", d->relpath(), std::strerror(s.err));
  }
}

int Datastore::stat(Inode& i, struct stat* st) {
  if (fstatat(i.fd, "", st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) return errno;
  if (i.type == S_IFREG) {
    std::shared_ptr<Disk> d;
    {
      std::lock_guard<std::mutex> g(i.m);
      d = i.disk;
    }
    uint64_t size;
    if (d) {
      if (d->size(&size).ok()) st->st_size = static_cast<off_t>(size);
    } else if (raw_view(i)) {  // the guest disk's size, from the qcow2 header
      int fd = ::open(("/proc/self/fd/" + std::to_string(i.fd)).c_str(), O_RDONLY | O_CLOEXEC);
      if (fd >= 0) {
        st->st_size = static_cast<off_t>(detect_image_fd(fd, static_cast<uint64_t>(st->st_size)).virtual_size);
        ::close(fd);
      }
    } else {
      closed_image_size(i, st);
    }
  }
  return 0;
}

void Datastore::closed_image_size(Inode& i, struct stat* st) {
  // Only a filter that keeps a header in the file (FilterInfo::visible_size) changes the size;
  // most datastores have none, and then nothing more is read.
  auto cfg = config();
  const Registry& registry = Registry::instance();
  auto sizer = [&](const FilterSpec& f) {
    const FilterInfo* info = registry.find(f.name);
    return info && info->visible_size ? info : nullptr;
  };
  bool any = false;
  for (const PolicySpec& p : cfg->policies)
    for (const FilterSpec& f : p.filters) any = any || sizer(f);
  if (!any || !is_image(i)) return;
  const PolicySpec* policy = cfg->find_policy(policy_of(i));
  if (!policy) return;
  const FilterInfo* bottom = nullptr;
  for (const FilterSpec& f : policy->filters)
    if (const FilterInfo* info = sizer(f); info && (!bottom || info->cls > bottom->cls)) bottom = info;
  if (!bottom) return;
  char head[4096];
  ssize_t n = -1;
  int fd = ::open(("/proc/self/fd/" + std::to_string(i.fd)).c_str(), O_RDONLY | O_CLOEXEC | O_NOATIME);
  if (fd < 0) fd = ::open(("/proc/self/fd/" + std::to_string(i.fd)).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    n = ::pread(fd, head, sizeof head, 0);
    ::close(fd);
  }
  if (n < 0) return;  // unreadable: the backing size stands
  st->st_size = static_cast<off_t>(
      bottom->visible_size(std::string_view(head, static_cast<size_t>(n)), static_cast<uint64_t>(st->st_size)));
}

}  // namespace iofilterfs
