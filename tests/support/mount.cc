#include "mount.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace testing {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/iofilterfs-test-XXXXXX";
  if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  // Never follow into a mount that is still up: detach it first.
  sh("for m in $(awk '{print $5}' /proc/self/mountinfo | grep -F " + q(path_) +
     " | sort -r); do fusermount3 -uz \"$m\" 2>/dev/null || umount -l \"$m\" 2>/dev/null; done; rm -rf " + q(path_));
}

int sh(const std::string& cmd, std::string* out) {
  std::string full = "bash -c " + q(cmd) + " 2>&1";
  FILE* p = ::popen(full.c_str(), "r");
  if (!p) return -1;
  std::string text;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, n);
  int st = ::pclose(p);
  if (out) *out = text;
  if (WIFEXITED(st)) return WEXITSTATUS(st);
  if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
  return -1;
}

std::string q(const std::string& s) {
  std::string r = "'";
  for (char c : s) {
    if (c == '\'') r += "'\\''";
    else r += c;
  }
  return r + "'";
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string get_xattr(const std::string& path, const std::string& name) {
  std::string buf(1 << 20, '\0');
  ssize_t n = ::getxattr(path.c_str(), name.c_str(), buf.data(), buf.size());
  if (n < 0) return std::string("ERR:") + std::strerror(errno);
  buf.resize(static_cast<size_t>(n));
  return buf;
}

int set_xattr(const std::string& path, const std::string& name, const std::string& value) {
  return ::setxattr(path.c_str(), name.c_str(), value.data(), value.size(), 0) == 0 ? 0 : errno;
}

void write_file(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
  if (!out) throw std::runtime_error("cannot write " + path);
}

bool is_mounted(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string a, b, c, d, mnt;
    if (ls >> a >> b >> c >> d >> mnt && mnt == path) return true;
  }
  return false;
}

std::string daemon_binary() {
  const char* e = std::getenv("IOFILTERFS_BIN");
  return e && *e ? e : IOFILTERFS_BIN;
}

std::string source_dir() { return IOFILTERFS_SOURCE_DIR; }

Mount::Mount(const std::string& backing, const std::string& mountpoint, Options opt)
    : backing_(backing), mountpoint_(mountpoint) {
  log_path_ = mountpoint + ".log";
  std::vector<std::string> args = {daemon_binary(), backing, mountpoint, "-f", "-l", "debug"};
  args.insert(args.end(), opt.args.begin(), opt.args.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  // fork+exec rather than posix_spawn, to ask for SIGTERM when the test process dies: even a
  // test that crashes (and so never runs this destructor) leaves no mount behind, because the
  // daemon unmounts itself on SIGTERM.
  const pid_t parent = ::getpid();
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("cannot fork");
  if (pid_ == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) _exit(127);  // the parent is already gone
    int fd = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) _exit(127);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::close(fd);
    ::execv(argv[0], argv.data());
    _exit(127);
  }
  if (opt.expect_failure) return;

  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!is_mounted(mountpoint_)) {
    int st;
    if (::waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      status_ = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
      throw std::runtime_error("daemon exited before mounting:\n" + log());
    }
    if (std::chrono::steady_clock::now() > deadline) {
      stop();
      throw std::runtime_error("daemon did not mount within 20 s:\n" + log());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Mount::~Mount() { stop(); }

bool Mount::mounted() const { return is_mounted(mountpoint_); }

std::string Mount::log() const { return read_file(log_path_); }

int Mount::stop() {
  if (pid_ < 0) return status_;
  // A clean unmount first; if something still holds the mount busy, SIGTERM makes the daemon
  // leave its loop and unmount itself; SIGKILL and a lazy detach are the last resort.
  if (is_mounted(mountpoint_)) sh("fusermount3 -u " + q(mountpoint_));
  auto wait_for = [&](int seconds) {
    for (int i = 0; i < seconds * 50; ++i) {
      int st;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        status_ = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        pid_ = -1;
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  };
  if (!wait_for(10)) {
    ::kill(pid_, SIGTERM);
    if (!wait_for(10)) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
      status_ = -1;
    }
  }
  if (is_mounted(mountpoint_)) sh("fusermount3 -uz " + q(mountpoint_));
  return status_;
}

}  // namespace testing
