// Test support: temporary directories, shell commands, and a real mount of the daemon that is
// always unmounted, even when the test fails (the destructor unmounts, then kills, then
// lazily detaches as a last resort).
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

namespace testing {

// A fresh directory under $TMPDIR (or /tmp), removed recursively with everything under it.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

// Runs `cmd` with bash; returns the exit status (or 128+signal), and stdout+stderr in *out.
int sh(const std::string& cmd, std::string* out = nullptr);
// Single-quotes a word for the shell.
std::string q(const std::string& s);

std::string read_file(const std::string& path);
// The value of an extended attribute, or "ERR:" and the errno's text.
std::string get_xattr(const std::string& path, const std::string& name);
// setxattr(2): 0 or the errno.
int set_xattr(const std::string& path, const std::string& name, const std::string& value);
void write_file(const std::string& path, const std::string& data);

// The daemon, mounted in the foreground on `mountpoint` over `backing`.
class Mount {
 public:
  struct Options {
    std::vector<std::string> args;  // extra command-line arguments
    bool expect_failure = false;    // do not wait for the mount (the daemon should refuse)
  };
  // Starts the daemon and waits (up to 20 s) until the mount answers; throws with the
  // daemon's log if it exits or times out first.
  Mount(const std::string& backing, const std::string& mountpoint, Options opt);
  Mount(const std::string& backing, const std::string& mountpoint) : Mount(backing, mountpoint, Options{}) {}
  ~Mount();
  Mount(const Mount&) = delete;
  Mount& operator=(const Mount&) = delete;

  const std::string& mountpoint() const { return mountpoint_; }
  std::string path(const std::string& rel) const { return mountpoint_ + "/" + rel; }
  std::string log() const;
  pid_t pid() const { return pid_; }
  // Unmounts and waits for the daemon; returns its exit status (-1 if it had to be killed).
  int stop();
  bool mounted() const;

 private:
  std::string backing_, mountpoint_, log_path_;
  pid_t pid_ = -1;
  int status_ = -1;
};

// True when `path` is a mountpoint (per /proc/self/mountinfo).
bool is_mounted(const std::string& path);

// The daemon binary and source tree under test.
std::string daemon_binary();
std::string source_dir();

}  // namespace testing
