// The daemon's settings after the command line (and, later, the config file) are read.
#pragma once

#include <string>
#include <vector>

namespace iofilterfs {

inline const std::vector<std::string> kDefaultImagePatterns = {"*.raw", "*.img", "*.qcow2", "*.vmdk"};

struct MountOptions {
  std::string backing;      // absolute, resolved
  std::string mountpoint;   // absolute, resolved
  std::string config;       // policy file, empty for none
  bool foreground = false;
  bool read_only = false;
  bool allow_other = false;
  bool default_permissions = false;
  bool fault_injection = false;
  unsigned threads = 64;
  std::string log_level;    // empty: not set (info)
  std::vector<std::string> fuse_opts;  // generic mount options handed to the kernel (nosuid, ...)
};

}  // namespace iofilterfs
