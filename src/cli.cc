#include "cli.h"

#include <dirent.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

namespace iofilterfs {
namespace {

// Generic mount options handed to the kernel as they are.
constexpr const char* kKernelOptions[] = {"nosuid", "suid", "nodev", "dev", "noexec", "exec",
                                          "noatime", "atime", "relatime", "strictatime", "sync", "async",
                                          "dirsync", "nodiratime"};
// fstab-only words that mount(8) and mount.fuse3 may pass along; they mean nothing here.
constexpr const char* kIgnoredOptions[] = {"auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "defaults"};

bool one_of(const std::string& s, const auto& list) {
  for (const char* x : list)
    if (s == x) return true;
  return false;
}

std::string realpath_of(const std::string& p) {
  char buf[PATH_MAX];
  if (!::realpath(p.c_str(), buf)) return {};
  return buf;
}

bool is_mountpoint(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string id, parent, devno, root, mnt;
    if (ls >> id >> parent >> devno >> root >> mnt) {
      // mountinfo escapes spaces and the like as \040 octal.
      std::string un;
      for (size_t i = 0; i < mnt.size(); ++i) {
        if (mnt[i] == '\\' && i + 3 < mnt.size() + 1 && i + 3 <= mnt.size()) {
          un += static_cast<char>(std::strtol(mnt.substr(i + 1, 3).c_str(), nullptr, 8));
          i += 3;
        } else {
          un += mnt[i];
        }
      }
      if (un == path) return true;
    }
  }
  return false;
}

bool under(const std::string& child, const std::string& parent) {
  return child == parent || (child.size() > parent.size() && child.compare(0, parent.size(), parent) == 0 &&
                             child[parent.size()] == '/');
}

}  // namespace

std::string apply_mount_options(const std::string& list, MountOptions* opt) {
  std::stringstream ss(list);
  std::string o;
  while (std::getline(ss, o, ',')) {
    if (o.empty()) continue;
    std::string key = o.substr(0, o.find('=')), val = o.find('=') == std::string::npos ? "" : o.substr(o.find('=') + 1);
    if (o == "ro") opt->read_only = true;
    else if (o == "rw") opt->read_only = false;
    else if (o == "allow_other") opt->allow_other = true;
    else if (o == "default_permissions") opt->default_permissions = true;
    else if (o == "fault_injection") opt->fault_injection = true;
    else if (key == "config" && !val.empty()) opt->config = val;
    else if (key == "threads" && !val.empty()) {
      char* end;
      long n = std::strtol(val.c_str(), &end, 10);
      if (*end || n < 1 || n > 1024) return "-o threads=" + val + ": expected a number from 1 to 1024";
      opt->threads = static_cast<unsigned>(n);
    } else if (key == "log_level" && !val.empty()) opt->log_level = val;
    else if (one_of(o, kKernelOptions)) opt->fuse_opts.push_back(o);
    else if (one_of(o, kIgnoredOptions)) continue;
    else return "unknown mount option '" + o + "'";
  }
  return {};
}

std::string check_paths(MountOptions* opt) {
  struct stat st;
  if (::stat(opt->backing.c_str(), &st) != 0) return "backing directory " + opt->backing + ": " + std::strerror(errno);
  if (!S_ISDIR(st.st_mode)) return "backing directory " + opt->backing + ": not a directory";
  opt->backing = realpath_of(opt->backing);

  if (::stat(opt->mountpoint.c_str(), &st) != 0) return "mountpoint " + opt->mountpoint + ": " + std::strerror(errno);
  if (!S_ISDIR(st.st_mode)) return "mountpoint " + opt->mountpoint + ": not a directory";
  opt->mountpoint = realpath_of(opt->mountpoint);
  if (is_mountpoint(opt->mountpoint)) return "mountpoint " + opt->mountpoint + ": already mounted";
  if (DIR* d = ::opendir(opt->mountpoint.c_str())) {
    bool empty = true;
    while (dirent* e = ::readdir(d))
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) empty = false;
    ::closedir(d);
    if (!empty) return "mountpoint " + opt->mountpoint + ": not empty";
  } else {
    return "mountpoint " + opt->mountpoint + ": " + std::strerror(errno);
  }
  if (under(opt->mountpoint, opt->backing) || under(opt->backing, opt->mountpoint))
    return "mountpoint " + opt->mountpoint + " and backing directory " + opt->backing + " must not contain each other";

  struct statvfs sv;
  if (::statvfs(opt->backing.c_str(), &sv) != 0) return "backing directory " + opt->backing + ": " + std::strerror(errno);
  if ((sv.f_flag & ST_RDONLY) && !opt->read_only)
    return "backing directory " + opt->backing + " is on a read-only filesystem; mount with -o ro";
  return {};
}

}  // namespace iofilterfs
